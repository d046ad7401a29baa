"""Rotary position embedding (RoPE) in both directions.

CSR codes keys **before** RoPE (paper §"Where the vectors come from": pre-RoPE keys of different
positions share one distribution). The attention of `transformers` and `mlx-lm` hands the cache
rotated keys, so the cache un-rotates them, codes them, and rotates the reconstruction again.
cos/sin come from the model's own rotary module, so every RoPE variant it supports is honoured.
"""

from __future__ import annotations

import torch


def rope_cos_sin(rotary_emb: torch.nn.Module, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32):
    """position_ids: (B, T) → cos, sin: (B, T, d_h), from the model's `rotary_emb` module."""
    probe = torch.empty(0, dtype=dtype, device=position_ids.device)
    return rotary_emb(probe, position_ids)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE. k: (B, H, T, d_h), cos/sin: (B, T, d_h) → (B, H, T, d_h)."""
    cos, sin = cos[:, None], sin[:, None]
    return k * cos + _rotate_half(k) * sin


def rotate_into(out: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotate` written into `out` (same shape as k, any float dtype) without temporaries of k's size:
    first half k₁·cos − k₂·sin, second half k₂·cos + k₁·sin (what k·cos + rotate_half(k)·sin computes)."""
    if out.shape != k.shape:
        raise ValueError(f"rotate_into: out has shape {tuple(out.shape)}, k has {tuple(k.shape)}")
    cos, sin = cos[:, None], sin[:, None]
    half = k.shape[-1] // 2
    torch.mul(k, cos, out=out)
    out[..., :half].addcmul_(k[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(k[..., :half], sin[..., half:])
    return out


def unrotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Invert `rotate`. Each channel pair is scaled by α and turned by θ, with cos = α·cos θ and
    sin = α·sin θ (α ≠ 1 for YaRN-style scaling), so the inverse turns by −θ and divides by α²."""
    cos, sin = cos[:, None], sin[:, None]
    return (k * cos - _rotate_half(k) * sin) / (cos * cos + sin * sin)
