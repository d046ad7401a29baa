"""Bit-packed CSR codes in MLX — the same functions, names and bytes as `csr_runtime.code_packing`.

The layout itself (`CodeLayout`, pure Python) is shared with the torch runtime through
`csr_core.code_layout`, which imports no torch.
"""

from __future__ import annotations

import mlx.core as mx

from csr_core.code_layout import (
    COEF_BITS,
    COEF_FORMATS,
    E3M1_MAGNITUDES,
    FP8_MAX,
    CodeLayout,
    coefficient_scale,
    fp8_scale,
    index_bits_for,
)

__all__ = ["COEF_FORMATS", "COEF_BITS", "FP8_MAX", "CodeLayout", "coefficient_scale", "fp8_scale", "index_bits_for",
           "pack_fields", "unpack_fields", "quantize_coefficients", "pack_codes", "unpack_codes", "pack_bits", "unpack_bits"]

_E3M1_TABLE = mx.array(E3M1_MAGNITUDES, dtype=mx.float32)
_E3M1_MIDPOINTS = (_E3M1_TABLE[1:] + _E3M1_TABLE[:-1]) / 2


def e3m1_codes(coef: mx.array, scale: float) -> mx.array:
    """coef → int32 5-bit codes: sign in bit 4, the nearest of the 16 magnitudes of coef / scale in bits 0–3."""
    a = mx.abs(coef.astype(mx.float32) / scale)
    magnitude = mx.sum(a[..., None] > _E3M1_MIDPOINTS, axis=-1).astype(mx.int32)
    negative = mx.logical_and(coef < 0, magnitude > 0).astype(mx.int32)
    return mx.bitwise_or(magnitude, mx.left_shift(negative, 4))


def e3m1_values(codes: mx.array, scale: float) -> mx.array:
    """The inverse of `e3m1_codes`: 5-bit codes → float32 coefficients."""
    magnitude = _E3M1_TABLE[mx.bitwise_and(codes, 15)]
    return mx.where(mx.bitwise_and(mx.right_shift(codes, 4), 1) == 1, -magnitude, magnitude) * scale

def pack_fields(values: mx.array, layout: CodeLayout) -> mx.array:
    """values: (n, F) integers in [0, 2^width) → (n, index_bytes) uint8 little-endian bit stream (scatter-add
    of each field's three byte contributions: the fields' bits never overlap)."""
    byte, shift = layout.field_offsets()
    n, F = values.shape
    shifted = mx.left_shift(values.astype(mx.int32), mx.array(shift, dtype=mx.int32))
    out = mx.zeros((n, layout.index_bytes + 2), dtype=mx.int32)
    rows = mx.broadcast_to(mx.arange(n)[:, None], (n, F))
    for j in range(3):
        cols = mx.broadcast_to(mx.array(byte)[None] + j, (n, F))
        out = out.at[rows, cols].add(mx.bitwise_and(mx.right_shift(shifted, 8 * j), 0xFF))
    return out[:, : layout.index_bytes].astype(mx.uint8)


def unpack_fields(packed: mx.array, layout: CodeLayout) -> mx.array:
    """(n, index_bytes) uint8 → (n, F) int32: the inverse of `pack_fields`."""
    byte, shift = layout.field_offsets()
    b = packed.astype(mx.int32)
    last = layout.index_bytes - 1
    word = mx.zeros((packed.shape[0], len(byte)), dtype=mx.int32)
    for j in range(3):
        word = mx.bitwise_or(word, mx.left_shift(b[:, mx.array([min(o + j, last) for o in byte])], 8 * j))
    masks = mx.array([(1 << w) - 1 for w in layout.widths], dtype=mx.int32)
    return mx.bitwise_and(mx.right_shift(word, mx.array(shift, dtype=mx.int32)), masks)


def quantize_coefficients(coef: mx.array, coef_format: str, scale: float = 1.0) -> mx.array:
    """The values the stored coefficients decode to (float32); MP applies it inside its loop."""
    if coef_format == "fp16":
        return coef.astype(mx.float16).astype(mx.float32)
    if coef_format == "fp8":
        return mx.from_fp8(mx.to_fp8(mx.clip(coef / scale, -FP8_MAX, FP8_MAX)), dtype=mx.float32) * scale
    if coef_format == "e3m1":
        return e3m1_values(e3m1_codes(coef, scale), scale)
    raise ValueError(f"coefficients in {coef_format!r} are quantised per vector after coding, not one by one")


def pack_codes(idx: mx.array, coef: mx.array, layout: CodeLayout, *, scale: float = 1.0) -> mx.array:
    """idx, coef: (n, groups, k) → (n, nbytes) uint8, byte for byte what the torch runtime writes."""
    n, G, k = idx.shape
    if (G, k) != (layout.groups, layout.k):
        raise ValueError(f"codes of shape (groups, k) = {(G, k)} do not match the layout's {(layout.groups, layout.k)}")
    if idx.size and mx.max(idx).item() >= 1 << layout.index_bits:
        raise ValueError(f"index {mx.max(idx).item()} does not fit in index_bits = {layout.index_bits}")
    fmt = layout.coef_format
    coef = coef.astype(mx.float32)
    if fmt == "e3m1":  # indices and coefficient codes share the bit stream
        return pack_fields(mx.concatenate([idx.reshape(n, -1), e3m1_codes(coef, scale).reshape(n, -1)], axis=1), layout)
    if fmt == "fp16":
        c = mx.contiguous(coef.astype(mx.float16)).view(mx.uint8)  # (n, G, 2k)
    elif fmt == "fp8":
        c = mx.to_fp8(mx.clip(coef / scale, -FP8_MAX, FP8_MAX))
    else:
        group_scale = (mx.max(mx.abs(coef), axis=-1, keepdims=True) / 127).astype(mx.float16)
        q = mx.clip(mx.round(coef / mx.maximum(group_scale.astype(mx.float32), 1e-30)), -127, 127).astype(mx.int8)
        c = mx.concatenate([mx.contiguous(group_scale).view(mx.uint8), q.view(mx.uint8)], axis=-1)
    return mx.concatenate([pack_fields(idx.reshape(n, -1), layout), c.reshape(n, -1)], axis=1)


def unpack_codes(packed: mx.array, layout: CodeLayout, *, scale: float = 1.0) -> tuple[mx.array, mx.array]:
    """(n, nbytes) uint8 → idx (n, groups, k) int32, coef (n, groups, k) float32."""
    n, G, k = packed.shape[0], layout.groups, layout.k
    fields = unpack_fields(packed[:, : layout.index_bytes], layout)
    idx = fields[:, : G * k].reshape(n, G, k)
    c = mx.contiguous(packed[:, layout.index_bytes :])
    fmt = layout.coef_format
    if fmt == "e3m1":
        coef = e3m1_values(fields[:, G * k :].reshape(n, G, k), scale)
    elif fmt == "fp16":
        coef = c.view(mx.float16).astype(mx.float32).reshape(n, G, k)
    elif fmt == "fp8":
        coef = mx.from_fp8(c, dtype=mx.float32).reshape(n, G, k) * scale
    else:
        c = c.reshape(n, G, 2 + k)
        coef = mx.contiguous(c[..., 2:]).view(mx.int8).astype(mx.float32) * mx.contiguous(c[..., :2]).view(mx.float16).astype(mx.float32)
    return idx, coef


_BIT_WEIGHTS = mx.array([1 << j for j in range(8)], dtype=mx.int32)


def pack_bits(mask: mx.array) -> mx.array:
    """(B, n) bool → (B, ⌈n / 8⌉) uint8, bit j of byte i = mask[:, 8 i + j] (little-endian, zero-padded)."""
    B, n = mask.shape
    padded = mx.concatenate([mask.astype(mx.int32), mx.zeros((B, -(-n // 8) * 8 - n), dtype=mx.int32)], axis=1)
    return (padded.reshape(B, -1, 8) * _BIT_WEIGHTS).sum(-1).astype(mx.uint8)


def unpack_bits(packed: mx.array, n: int) -> mx.array:
    """The inverse of `pack_bits`: (B, nbytes) uint8 → (B, n) bool."""
    bits = mx.bitwise_and(packed.astype(mx.int32)[..., None], _BIT_WEIGHTS) != 0
    return bits.reshape(packed.shape[0], -1)[:, :n]
