"""The byte layout of packed CSR codes: pure Python, shared by the torch and MLX runtimes (no torch here).

One token's code of one kind (keys or values) holds `groups · k` (index, coefficient) pairs, groups =
KV heads × chunks (s_n), k atoms per chunk, in two sections:

    bit stream    groups · k fields of `index_bits`, in (head, chunk, atom) order, then (e3m1 only)
                  groups · k 5-bit coefficient codes in the same order, written little-endian into one
                  bit stream padded to whole bytes;
    coefficients  byte-aligned, same order: fp8 (E4M3) one byte each; fp16 two bytes each
                  (little-endian); int8: per head chunk an fp16 scale (2 bytes) then its k int8;
                  e3m1: none (they are in the bit stream).

e3m1 is a 5-bit float: sign, 3 exponent bits, 1 mantissa bit, times one power-of-two scale per layer and
kind; code 0 of the magnitude is zero (`E3M1_MAGNITUDES`). fp8/fp16/int8 coefficients are byte-aligned
so a runtime reads them as one typed view, without bit arithmetic.
See `code_packing` (torch) and `mlx_backend.code_packing`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

CoefFormat = Literal["fp16", "fp8", "int8", "e3m1"]
COEF_FORMATS = ("fp16", "fp8", "int8", "e3m1")
COEF_BITS = {"fp16": 16, "fp8": 8, "int8": 8, "e3m1": 5}
FP8_MAX = 448.0  # largest finite E4M3 value
# the 16 magnitudes of an e3m1 code (sign in bit 4): 0, then (1 + m/2) · 2^(e − 7) for (e, m) ≠ (0, 0)
E3M1_MAGNITUDES = tuple([0.0] + [(1 + m / 2) * 2.0 ** (e - 7) for e in range(8) for m in range(2)][1:])
E3M1_MAX = E3M1_MAGNITUDES[-1]  # 1.5


def index_bits_for(n_atoms: int) -> int:
    """⌈log2 n_atoms⌉ (at least 1): the bits an index into n_atoms atoms needs."""
    if n_atoms < 1:
        raise ValueError(f"a row dictionary needs at least one atom, got {n_atoms}")
    return max(1, math.ceil(math.log2(n_atoms)))


def fp8_scale(max_norm: float) -> float:
    """Power-of-two scale with max_norm / scale ≤ 448 (E4M3's range): |c| ≤ ‖x‖ for unit atoms."""
    return coefficient_scale("fp8", max_norm)


def coefficient_scale(coef_format: str, max_norm: float) -> float:
    """The power-of-two scale of a layer and kind's coefficients: max_norm / scale ≤ the format's largest
    value (448 for fp8, 1.5 for e3m1), so the first MP coefficient, |c| ≤ ‖x‖ for unit atoms, never saturates.
    1 for fp16 and int8 (int8 scales each vector itself)."""
    top = {"fp8": FP8_MAX, "e3m1": E3M1_MAX}.get(coef_format)
    if top is None or not math.isfinite(max_norm) or max_norm <= 0:
        return 1.0
    return 2.0 ** math.ceil(math.log2(max_norm / top))


@dataclass(frozen=True)
class CodeLayout:
    """How the `groups · k` (index, coefficient) pairs of one token's code are packed.

    groups = KV heads × chunks (s_n); k = atoms per chunk."""

    groups: int
    k: int
    index_bits: int
    coef_format: CoefFormat

    def __post_init__(self):
        if self.coef_format not in COEF_FORMATS:
            raise ValueError(f"coef_format has to be one of {list(COEF_FORMATS)} but got {self.coef_format!r}")
        if not 1 <= self.index_bits <= 16:
            raise ValueError(f"index_bits has to be in 1..16 but got {self.index_bits}")
        if self.groups < 1 or self.k < 1:
            raise ValueError(f"groups and k must be positive, got groups={self.groups}, k={self.k}")

    @property
    def widths(self) -> list[int]:
        """Bit width of every field of one token's bit stream, in stream order (indices, then e3m1 coefficients)."""
        coefs = [COEF_BITS["e3m1"]] * (self.groups * self.k) if self.coef_format == "e3m1" else []
        return [self.index_bits] * (self.groups * self.k) + coefs

    @property
    def index_bytes(self) -> int:
        """Bytes of the bit stream (indices, and e3m1 coefficients), rounded up to whole bytes."""
        return (sum(self.widths) + 7) // 8

    @property
    def coef_bytes(self) -> int:
        """Bytes of the byte-aligned coefficient section (0 for e3m1: its codes are in the bit stream)."""
        if self.coef_format == "e3m1":
            return 0
        per_atom = COEF_BITS[self.coef_format] // 8
        scales = 2 * self.groups if self.coef_format == "int8" else 0
        return self.groups * self.k * per_atom + scales

    @property
    def nbytes(self) -> int:
        """Bytes one token's code takes."""
        return self.index_bytes + self.coef_bytes

    def field_offsets(self) -> tuple[list[int], list[int]]:
        """(byte offset, bit shift within that byte) of every index field."""
        starts, pos = [], 0
        for w in self.widths:
            starts.append(pos)
            pos += w
        return [p // 8 for p in starts], [p % 8 for p in starts]


def row_index_bits(index_bits: int | None, n_offline: int, online_atoms: int, guard_atoms: int) -> int:
    """The index width of a layer's codes: ⌈log2(offline + online + guard)⌉, or the given width if it
    can address them all (16 with fp16 coefficients is the paper's int16 + fp16 layout)."""
    capacity = n_offline + max(online_atoms, 0) + max(guard_atoms, 0)
    needed = index_bits_for(capacity)
    if index_bits is None:
        return needed
    if index_bits < needed:
        raise ValueError(
            f"index_bits = {index_bits} cannot address {capacity} atoms ({n_offline} offline + {online_atoms} online "
            f"+ {guard_atoms} guard): use index_bits >= {needed} or None"
        )
    return index_bits
