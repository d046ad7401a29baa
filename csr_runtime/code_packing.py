"""CSR codes at the bits they need: (index, coefficient) pairs bit-packed per token.

The paper stores every atom of a code as an int16 index and an fp16 coefficient (32 bits). An index
into a row dictionary of M atoms (offline + online + guard) needs only ⌈log2 M⌉ bits, and a
coefficient survives 8 bits (Lexico stores FP8), so at d_h = 64 one bit per channel buys three
19-bit atoms instead of two 32-bit ones.

A `CodeLayout` (`code_layout.py`) says how one token's code of one kind (keys or values) is laid out:
the indices bit-packed little-endian, then the coefficients byte-aligned, so a token's code is
`nbytes` uint8 and the cache holds (B, T, nbytes). Coefficient formats:

- ``fp16``: IEEE half, the paper's layout with ``index_bits = 16`` (32 bits an atom, byte-aligned);
- ``fp8``: E4M3 of ``coef / scale`` with one power-of-two ``scale`` per layer and kind (set from the
  largest vector norm seen at prefill, so the first MP coefficient, |c| ≤ ‖x‖, never saturates);
- ``int8``: symmetric int8 with one fp16 scale per head chunk (max |c| / 127), counted in the stream;
- ``e3m1``: a 5-bit float (sign, 3 exponent bits, 1 mantissa bit) of ``coef / scale``, one power-of-two
  ``scale`` per layer and kind as for fp8, written into the bit stream after the indices.

`mlx_backend.code_packing` reads and writes the same bytes (a parity test checks it).
"""

from __future__ import annotations

import torch

from csr_core.code_layout import (
    COEF_BITS,
    COEF_FORMATS,
    E3M1_MAGNITUDES,
    FP8_MAX,
    CodeLayout,
    CoefFormat,
    coefficient_scale,
    fp8_scale,
    index_bits_for,
)

__all__ = ["COEF_FORMATS", "COEF_BITS", "FP8_MAX", "CodeLayout", "CoefFormat", "CoefficientRounding", "coefficient_scale",
           "fp8_scale", "e3m1_levels", "index_bits_for", "pack_fields", "unpack_fields", "quantize_coefficients",
           "pack_codes", "unpack_codes", "pack_bits", "append_bits", "count_bits", "unpack_bits"]

_E3M1_TABLE = torch.tensor(E3M1_MAGNITUDES, dtype=torch.float32)
_E3M1_MIDPOINTS = (_E3M1_TABLE[1:] + _E3M1_TABLE[:-1]) / 2
_E3M1_SIGNED = torch.cat([_E3M1_TABLE, -_E3M1_TABLE])  # value of every 5-bit code: sign in bit 4


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`, without a call when it is there already (the tables below live on the CPU)."""
    return t if t.device == device else t.to(device)


def _e3m1_magnitudes(coef: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """int64 index of the nearest e3m1 magnitude of |coef / scale| (the count of midpoints below it)."""
    return torch.bucketize((coef.float() / scale).abs().contiguous(), _on(_E3M1_MIDPOINTS, coef.device))


def e3m1_codes(coef: torch.Tensor, scale: float) -> torch.Tensor:
    """coef → int32 5-bit codes: sign in bit 4, the nearest of the 16 magnitudes of coef / scale in bits 0–3."""
    magnitude = _e3m1_magnitudes(coef, scale)
    return torch.where((coef < 0) & (magnitude > 0), magnitude + 16, magnitude).to(torch.int32)


def e3m1_values(codes: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """The inverse of `e3m1_codes`: 5-bit codes → float32 coefficients (one table lookup; a float scale is folded
    into the 32-entry table, a tensor one multiplies the result)."""
    table = _on(_E3M1_SIGNED, codes.device)
    if not isinstance(scale, torch.Tensor):
        return torch.index_select(table * scale, 0, codes.flatten()).view(codes.shape)
    return torch.index_select(table, 0, codes.flatten()).view(codes.shape) * scale


def e3m1_levels() -> tuple[torch.Tensor, torch.Tensor]:
    """The 16 e3m1 magnitudes and the 15 midpoints between them (float32): what `e3m1_round` rounds to, and by."""
    return _E3M1_TABLE, _E3M1_MIDPOINTS


def e3m1_round(coef: torch.Tensor, scale: float) -> torch.Tensor:
    """`e3m1_values(e3m1_codes(coef, scale), scale)` in fewer operations: MP calls it once per atom."""
    return (_on(_E3M1_TABLE, coef.device)[_e3m1_magnitudes(coef, scale)] * scale).copysign(coef.float())


def pack_fields(values: torch.Tensor, layout: CodeLayout) -> torch.Tensor:
    """values: (n, F) integers in [0, 2^width) per field → (n, index_bytes) uint8 little-endian bit stream.

    A field of ≤ 16 bits starting at bit r of byte o spans bytes o..o+2; the fields' bits never
    overlap, so adding their byte contributions is the same as OR-ing them."""
    n, F = values.shape
    byte_t, shift_t, _ = _field_tensors(layout, values.device)
    shifted = values.to(torch.int32) << shift_t
    out = torch.zeros(n, layout.index_bytes + 2, dtype=torch.int32, device=values.device)
    for j in range(3):
        out.scatter_add_(1, (byte_t + j).expand(n, F), (shifted >> (8 * j)) & 0xFF)
    return out[:, : layout.index_bytes].to(torch.uint8)


def unpack_fields(packed: torch.Tensor, layout: CodeLayout) -> torch.Tensor:
    """(n, index_bytes) uint8 → (n, F) int32: the inverse of `pack_fields`.

    Each field's three bytes b0 + 2⁸ b1 + 2¹⁶ b2 come out of one small matrix product with a 0 / 2⁸ʲ
    selection matrix (exact in float32: every partial sum is an integer below 2²⁴), ~10× faster on CPU
    than gathering byte columns; bytes past a field's span only add bits above its width, which the
    mask drops."""
    word = (packed.float() @ _byte_selection(layout, packed.device)).to(torch.int32)
    _, shift, masks = _field_tensors(layout, packed.device)
    return (word >> shift) & masks


_SELECTIONS: dict = {}
_FIELDS: dict = {}


def _field_tensors(layout: CodeLayout, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per field of the bit stream: byte offset (int64), bit shift and width mask (int32), made once per layout."""
    key = (layout, str(device))
    if key not in _FIELDS:
        byte, shift = layout.field_offsets()
        _FIELDS[key] = (torch.tensor(byte, device=device), torch.tensor(shift, dtype=torch.int32, device=device),
                        torch.tensor([(1 << w) - 1 for w in layout.widths], dtype=torch.int32, device=device))
    return _FIELDS[key]


def _byte_selection(layout: CodeLayout, device) -> torch.Tensor:
    """(index_bytes, F) float32 with 2⁸ʲ at (byte offset of field f + j, f), j = 0, 1, 2 (within the stream)."""
    key = (layout, str(device))
    if key not in _SELECTIONS:
        byte, _ = layout.field_offsets()
        S = torch.zeros(layout.index_bytes, len(byte))
        for f, o in enumerate(byte):
            for j in range(3):
                if o + j < layout.index_bytes:
                    S[o + j, f] = float(1 << (8 * j))
        _SELECTIONS[key] = S.to(device)
    return _SELECTIONS[key]


class CoefficientRounding:
    """`quantize_coefficients` with its format and scale fixed: what MP rounds each coefficient with (a callable that
    says what it is, so the Gram-matrix kernel can round e3m1 itself)."""

    def __init__(self, coef_format: CoefFormat, scale: float = 1.0):
        self.coef_format, self.scale = coef_format, scale

    def __call__(self, coef: torch.Tensor) -> torch.Tensor:
        return quantize_coefficients(coef, self.coef_format, self.scale)


def quantize_coefficients(coef: torch.Tensor, coef_format: CoefFormat, scale: float = 1.0) -> torch.Tensor:
    """The values the stored coefficients will decode to (same shape, float32): the quantiser MP
    applies inside its loop so each residual accounts for the rounding of its coefficient."""
    if coef_format == "fp16":
        return coef.half().float()
    if coef_format == "fp8":
        q = (coef / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return q.float() * scale
    if coef_format == "e3m1":
        return e3m1_round(coef, scale)
    raise ValueError(f"coefficients in {coef_format!r} are quantised per vector after coding, not one by one")


def pack_codes(idx: torch.Tensor, coef: torch.Tensor, layout: CodeLayout, *, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """idx, coef: (n, groups, k) → (n, nbytes) uint8. Indices must be < 2^index_bits. scale: a float, or (n, 1, 1)
    per code (fp8 / e3m1)."""
    n, G, k = idx.shape
    if (G, k) != (layout.groups, layout.k):
        raise ValueError(f"codes of shape (groups, k) = {(G, k)} do not match the layout's {(layout.groups, layout.k)}")
    if idx.numel() and int(idx.max()) >= 1 << layout.index_bits:
        raise ValueError(f"index {int(idx.max())} does not fit in index_bits = {layout.index_bits}")
    fmt = layout.coef_format
    coef = coef.float()
    if fmt == "e3m1":  # indices and coefficient codes share the bit stream
        return pack_fields(torch.cat([idx.reshape(n, -1), e3m1_codes(coef, scale).reshape(n, -1)], dim=1), layout)
    if fmt == "fp16":
        c = coef.half().contiguous().view(torch.uint8)  # (n, G, 2k), little-endian on every platform we run on
    elif fmt == "fp8":
        c = (coef / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        group_scale = (coef.abs().amax(-1, keepdim=True) / 127).half()  # (n, G, 1)
        q = torch.round(coef / group_scale.float().clamp_min(1e-30)).clamp(-127, 127).to(torch.int8)
        c = torch.cat([group_scale.view(torch.uint8), q.view(torch.uint8)], dim=-1)  # (n, G, 2 + k)
    return torch.cat([pack_fields(idx.reshape(n, -1), layout), c.reshape(n, -1)], dim=1)


def unpack_codes(packed: torch.Tensor, layout: CodeLayout, *, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, nbytes) uint8 → idx (n, groups, k) int32, coef (n, groups, k) float32."""
    n, G, k = packed.shape[0], layout.groups, layout.k
    fields = unpack_fields(packed[:, : layout.index_bytes], layout)
    idx = fields[:, : G * k].reshape(n, G, k)
    c = packed[:, layout.index_bytes :].contiguous()
    fmt = layout.coef_format
    if fmt == "e3m1":
        coef = e3m1_values(fields[:, G * k :].reshape(n, G, k), scale)
    elif fmt == "fp16":
        coef = c.view(torch.float16).float().view(n, G, k)
    elif fmt == "fp8":
        coef = c.view(torch.float8_e4m3fn).float().view(n, G, k) * scale
    else:
        c = c.view(n, G, 2 + k)
        coef = c[..., 2:].contiguous().view(torch.int8).float() * c[..., :2].contiguous().view(torch.float16).float()
    return idx, coef


_BIT_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.int32)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(B, n) bool → (B, ⌈n / 8⌉) uint8, bit j of byte i = mask[:, 8 i + j] (little-endian, zero-padded)."""
    B, n = mask.shape
    padded = torch.zeros(B, -(-n // 8) * 8, dtype=torch.int32, device=mask.device)
    padded[:, :n] = mask
    return (padded.view(B, -1, 8) * _on(_BIT_WEIGHTS, mask.device)).sum(-1).to(torch.uint8)


def append_bits(packed: torch.Tensor, n: int, mask: torch.Tensor) -> torch.Tensor:
    """`pack_bits` of [the n bits in `packed`, mask] (B, n + m), unpacking only the last partial byte of `packed`."""
    full = n // 8
    tail = unpack_bits(packed[:, full : full + 1], n % 8) if n % 8 else mask[:, :0]
    return torch.cat([packed[:, :full], pack_bits(torch.cat([tail, mask], dim=1))], dim=1)


_POPCOUNT = torch.tensor([i.bit_count() for i in range(256)], dtype=torch.int64)


def count_bits(packed: torch.Tensor) -> torch.Tensor:
    """(B, nbytes) uint8 → (B,) int64: the set bits of each row."""
    return _on(_POPCOUNT, packed.device)[packed.long()].sum(1)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_bits`: (B, nbytes) uint8 → (B, n) bool."""
    bits = (packed.to(torch.int32)[..., None] & _on(_BIT_WEIGHTS, packed.device)) != 0
    return bits.flatten(-2)[:, :n]
