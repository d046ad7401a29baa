"""Attention-aware coding metric: code keys and values where attention feels their error.

What attention sees of a cached key k is the logit q·k; of a value v, the head's share of the
output, W_o,h v. So the errors that matter are

    keys:   E_q,Δ[(qᵀ R(Δ) (k − k̂))²] = (k − k̂)ᵀ M_K (k − k̂),   M_K = E_Δ[R(Δ)ᵀ E[q qᵀ] R(Δ)]
    values: Σ_j ‖W_o,j (v − v̂)‖²      = (v − v̂)ᵀ M_V (v − v̂),   M_V = Σ_j W_o,jᵀ W_o,j

per layer and KV head (j runs over the query heads sharing it). Keys are coded before RoPE and q
before RoPE pairs with them through R(Δ), the rotation by the relative position Δ = n − m: q_m·k_n
after RoPE = qᵀ R(n − m) k. M_K averages that rotation over Δ = 0..max_distance−1 (uniformly; the
pre-RoPE second moment alone would pretend Δ = 0). With A = (M / mean eigenvalue)^{1/2}, the error in
the metric is the plain squared error of the whitened vectors A x, so MP, OMP and NeuralDict run
unchanged on A x, and the runtime decodes with A⁻¹.
"""

from __future__ import annotations

import torch


def value_metric(o_proj_weight: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """o_proj_weight: (hidden, n_heads · d_h) → M_V: (n_kv_heads, d_h, d_h) float64."""
    hidden, width = o_proj_weight.shape
    d = width // n_heads
    w = o_proj_weight.double().view(hidden, n_heads, d).transpose(0, 1)  # (n_heads, hidden, d)
    per_head = w.transpose(1, 2) @ w  # W_o,jᵀ W_o,j: (n_heads, d, d)
    return per_head.view(n_kv_heads, n_heads // n_kv_heads, d, d).sum(1)


def rope_rotations(inv_freq: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """R(Δ) of the `rotate_half` RoPE (channel i pairs with i + d/2): (n, d, d) float64 for n distances."""
    half = inv_freq.numel()
    angle = distances.double()[:, None] * inv_freq.double()[None]  # (n, d/2)
    cos, sin = angle.cos(), angle.sin()
    R = torch.zeros(len(distances), 2 * half, 2 * half, dtype=torch.float64)
    i = torch.arange(half)
    # rotated x = x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁)
    R[:, i, i], R[:, i + half, i + half] = cos, cos
    R[:, i, i + half], R[:, i + half, i] = -sin, sin
    return R


def key_metric(query_moment: torch.Tensor, inv_freq: torch.Tensor, max_distance: int = 2048, n_distances: int = 512):
    """query_moment: (n_kv_heads, d, d) = Σ_j E[q_j q_jᵀ] of pre-RoPE queries → M_K (n_kv_heads, d, d) float64,
    averaged over n_distances relative positions spread evenly over 0..max_distance−1."""
    distances = torch.linspace(0, max_distance - 1, n_distances).round()
    R = rope_rotations(inv_freq, -distances)  # key n = m + Δ earlier than the query: Δ ≤ 0
    M = query_moment.double()
    return torch.einsum("tji,hjk,tkl->hil", R, M, R) / len(distances)


def whitening(metric: torch.Tensor, floor: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """metric: (..., d, d) symmetric PSD → (A, A⁻¹) float32 with AᵀA ∝ metric, normalised to mean eigenvalue 1
    (so whitened vectors keep about their size). Eigenvalues below `floor` × the mean are raised to it."""
    M = 0.5 * (metric.double() + metric.double().transpose(-1, -2))
    eigenvalues, vectors = torch.linalg.eigh(M)
    eigenvalues = eigenvalues / eigenvalues.mean(-1, keepdim=True)
    root = eigenvalues.clamp_min(floor).sqrt()
    A = vectors @ torch.diag_embed(root) @ vectors.transpose(-1, -2)
    A_inv = vectors @ torch.diag_embed(1 / root) @ vectors.transpose(-1, -2)
    return A.float(), A_inv.float()


def apply(transform: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """transform: (H, d, d), x: (B, H, T, d) → (B, H, T, d): x ↦ A_h x for each KV head h."""
    return torch.einsum("hij,bhtj->bhti", transform.to(x.dtype), x)
