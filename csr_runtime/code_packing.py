"""CSR codes at the bits they need: (index, coefficient) pairs bit-packed per token.

The paper stores every atom of a code as an int16 index and an fp16 coefficient (32 bits). An index
into a row dictionary of M atoms (offline + online + guard) needs only ⌈log2 M⌉ bits, and a
coefficient survives 8 bits (Lexico stores FP8), so at d_h = 64 one bit per channel buys three
19-bit atoms instead of two 32-bit ones.

A `CodeLayout` says how one token's code of one kind (keys or values) is laid out:

    for each KV head h, chunk j, atom g:   index (index_bits)  then  coefficient (coef bits)
    ["int8" only: one fp16 scale per head chunk, before its atoms]

fields written little-endian into one bit stream, padded to whole bytes: a token's code is
`nbytes` uint8, so the cache holds (B, T, nbytes). Coefficient formats:

- ``fp16``: IEEE half, the paper's layout with ``index_bits = 16`` (32 bits an atom, byte-aligned);
- ``fp8``: E4M3 of ``coef / scale`` with one power-of-two ``scale`` per layer and kind (set from the
  largest vector norm seen at prefill, so the first MP coefficient, |c| ≤ ‖x‖, never saturates);
- ``int8``: symmetric int8 with one fp16 scale per head chunk (max |c| / 127), counted in the stream.

`mlx_backend.code_packing` reads and writes the same bytes (a parity test checks it).
"""

from __future__ import annotations

import torch

from csr_runtime.code_layout import COEF_FORMATS, COEF_BITS, FP8_MAX, CodeLayout, CoefFormat, fp8_scale, index_bits_for

__all__ = ["COEF_FORMATS", "COEF_BITS", "FP8_MAX", "CodeLayout", "CoefFormat", "fp8_scale", "index_bits_for",
           "pack_fields", "unpack_fields", "quantize_coefficients", "pack_codes", "unpack_codes"]

def pack_fields(values: torch.Tensor, layout: CodeLayout) -> torch.Tensor:
    """values: (n, F) integers in [0, 2^width) per field → (n, nbytes) uint8 little-endian bit stream.

    A field of ≤ 16 bits starting at bit r of byte o spans bytes o..o+2; the fields' bits never
    overlap, so adding their byte contributions is the same as OR-ing them."""
    byte, shift = layout.field_offsets()
    n, F = values.shape
    byte_t = torch.tensor(byte, device=values.device)
    shifted = values.to(torch.int32) << torch.tensor(shift, dtype=torch.int32, device=values.device)
    out = torch.zeros(n, layout.nbytes + 2, dtype=torch.int32, device=values.device)
    for j in range(3):
        out.scatter_add_(1, (byte_t + j).expand(n, F), (shifted >> (8 * j)) & 0xFF)
    return out[:, : layout.nbytes].to(torch.uint8)


def unpack_fields(packed: torch.Tensor, layout: CodeLayout) -> torch.Tensor:
    """(n, nbytes) uint8 → (n, F) int32: the inverse of `pack_fields`.

    Reads each field's three bytes (indices clamped at the end: bytes past a field's span only add
    bits above its width, which the mask drops)."""
    byte, shift = layout.field_offsets()
    dev = packed.device
    b = packed.to(torch.int32)
    last = layout.nbytes - 1
    word = torch.zeros(packed.shape[0], len(byte), dtype=torch.int32, device=dev)
    for j in range(3):
        word |= b[:, torch.tensor([min(o + j, last) for o in byte], device=dev)] << (8 * j)
    masks = torch.tensor([(1 << w) - 1 for w in layout.widths], dtype=torch.int32, device=dev)
    return (word >> torch.tensor(shift, dtype=torch.int32, device=dev)) & masks


def quantize_coefficients(coef: torch.Tensor, coef_format: CoefFormat, scale: float = 1.0) -> torch.Tensor:
    """The values the stored coefficients will decode to (same shape, float32): the quantiser MP
    applies inside its loop so each residual accounts for the rounding of its coefficient."""
    if coef_format == "fp16":
        return coef.half().float()
    if coef_format == "fp8":
        q = (coef / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return q.float() * scale
    raise ValueError(f"coefficients in {coef_format!r} are quantised per vector after coding, not one by one")


def pack_codes(idx: torch.Tensor, coef: torch.Tensor, layout: CodeLayout, *, scale: float = 1.0) -> torch.Tensor:
    """idx, coef: (n, groups, k) → (n, nbytes) uint8. Indices must be < 2^index_bits."""
    n, G, k = idx.shape
    if (G, k) != (layout.groups, layout.k):
        raise ValueError(f"codes of shape (groups, k) = {(G, k)} do not match the layout's {(layout.groups, layout.k)}")
    if idx.numel() and int(idx.max()) >= 1 << layout.index_bits:
        raise ValueError(f"index {int(idx.max())} does not fit in index_bits = {layout.index_bits}")
    fmt = layout.coef_format
    if fmt == "fp16":
        c = coef.half().view(torch.int16).to(torch.int32) & 0xFFFF
    elif fmt == "fp8":
        c = (coef.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    else:
        group_scale = (coef.float().abs().amax(-1, keepdim=True) / 127).half()  # (n, G, 1)
        q = torch.round(coef.float() / group_scale.float().clamp_min(1e-30)).clamp(-127, 127).to(torch.int32)
        c = q & 0xFF
    fields = torch.stack([idx.to(torch.int32), c], dim=-1).flatten(2)  # (n, G, 2k): index, coef, index, coef, ...
    if fmt == "int8":
        s16 = group_scale.view(torch.int16).to(torch.int32) & 0xFFFF
        fields = torch.cat([s16, fields], dim=-1)
    return pack_fields(fields.flatten(1), layout)


def unpack_codes(packed: torch.Tensor, layout: CodeLayout, *, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, nbytes) uint8 → idx (n, groups, k) int64, coef (n, groups, k) float32."""
    fields = unpack_fields(packed, layout).view(packed.shape[0], layout.groups, -1)
    fmt = layout.coef_format
    if fmt == "int8":
        group_scale = fields[..., :1].to(torch.int16).view(torch.float16).float()
        fields = fields[..., 1:]
    pairs = fields.unflatten(-1, (layout.k, 2))
    idx, c = pairs[..., 0].long(), pairs[..., 1]
    if fmt == "fp16":
        coef = c.to(torch.int16).view(torch.float16).float()
    elif fmt == "fp8":
        coef = c.to(torch.uint8).view(torch.float8_e4m3fn).float() * scale
    else:
        coef = ((c ^ 0x80) - 0x80).float() * group_scale  # sign-extend the int8
    return idx, coef
