"""RoPE in both directions for mlx-lm models (mirrors `csr_runtime.rope`).

mlx-lm rotates keys with the model's `nn.RoPE` at `offset = cache.offset` before the cache sees them.
`mx.fast.rope` turns position p by p · scale · θ_i, so the same call with `scale` negated turns it
back: un-rotation is exact (tested against mlx-lm's own module).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def _params(rope) -> dict:
    if type(rope) is not nn.RoPE:
        raise ValueError(
            f"CSR's MLX cache supports the plain nn.RoPE of Llama-family models; this model uses "
            f"{type(rope).__name__}: use the PyTorch runtime (csr_runtime) for it"
        )
    return dict(dims=rope.dims, traditional=rope.traditional, base=rope.base, scale=rope.scale)


def rotate(k: mx.array, rope, offset: int) -> mx.array:
    """k: (B, H, T, d_h) before RoPE → after, positions offset..offset+T-1."""
    p = _params(rope)
    return mx.fast.rope(k, p["dims"], traditional=p["traditional"], base=p["base"], scale=p["scale"], offset=offset)


def unrotate(k: mx.array, rope, offset: int) -> mx.array:
    """Invert `rotate`: the rotation by −θ at the same positions."""
    p = _params(rope)
    return mx.fast.rope(k, p["dims"], traditional=p["traditional"], base=p["base"], scale=-p["scale"], offset=offset)
