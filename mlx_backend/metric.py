"""The attention metric's whitening at run time, in MLX (mirrors `csr_runtime.metric.apply`; the metric itself
is measured at training time and stored in the dictionary file)."""

from __future__ import annotations

import mlx.core as mx


def apply(transform: mx.array, x: mx.array) -> mx.array:
    """transform: (H, d, d), x: (B, H, T, d) → (B, H, T, d): x ↦ A_h x for each KV head h."""
    return x @ transform.astype(x.dtype).transpose(0, 2, 1)[None]
