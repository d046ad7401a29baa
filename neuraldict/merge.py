"""Layer merging: layers whose KV distributions are close share one offline dictionary.

Paper §"Layer merging": per layer and per kind, normalise the vectors to unit norm, project them to
2-D with PCA, histogram them on a 200 × 200 grid, and compare layers by the Jensen–Shannon divergence
(JSD) of those histograms. Consecutive layers form a group Λ_i while every pair in it has JSD ≤ δ1
and the JSDs of adjacent pairs in it sum to ≤ δ2.

What the paper leaves open, and what we chose:
- the PCA is fit per compared pair, on both layers' vectors together (the paper: PCA "in pairs");
- the histogram covers the pair's projected range; JSD uses log base 2, so it lies in [0, 1];
- δ1, δ2 defaults come from measuring SmolLM2 (see BENCHMARKS.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _pca_2d(x: torch.Tensor) -> torch.Tensor:
    """x: (n, d) → (n, 2), the projection on the two leading principal axes."""
    centred = x - x.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def _histogram(points: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    cells = ((points - lo) / (hi - lo).clamp_min(1e-12) * bins).long().clamp(0, bins - 1)
    flat = torch.bincount(cells[:, 0] * bins + cells[:, 1], minlength=bins * bins).double()
    return flat / flat.sum()


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen–Shannon divergence (base 2) of two discrete distributions."""
    m = 0.5 * (p + q)

    def kl(a):
        mask = a > 0
        return float((a[mask] * (a[mask] / m[mask]).log2()).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def pair_divergence(a: torch.Tensor, b: torch.Tensor, *, bins: int = 200) -> float:
    """JSD between the 2-D PCA histograms of two layers' unit-normalised vectors (a: (n, d), b: (m, d))."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    projected = _pca_2d(torch.cat([a, b]))
    lo, hi = projected.min(0).values, projected.max(0).values
    return js_divergence(_histogram(projected[: len(a)], lo, hi, bins), _histogram(projected[len(a):], lo, hi, bins))


def divergence_matrix(layers: list[torch.Tensor], *, bins: int = 200) -> np.ndarray:
    """Symmetric (L, L) matrix of pairwise layer divergences; layers[l]: (n_l, d)."""
    n = len(layers)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = pair_divergence(layers[i], layers[j], bins=bins)
    return out


def group_layers(divergence: np.ndarray, *, delta1: float, delta2: float) -> list[int]:
    """Greedy grouping of consecutive layers → layer_to_group (one group index per layer).

    A layer joins the current group if its divergence to every member is ≤ δ1 and the group's sum of
    adjacent-pair divergences, this one included, stays ≤ δ2; otherwise it starts a new group.
    """
    if delta1 < 0 or delta2 < 0:
        raise ValueError(f"delta1 and delta2 must be >= 0, got {delta1} and {delta2}")
    layer_to_group, members, chain = [0], [0], 0.0
    for layer in range(1, len(divergence)):
        step = divergence[layer - 1, layer]
        if all(divergence[m, layer] <= delta1 for m in members) and chain + step <= delta2:
            members.append(layer)
            chain += step
        else:
            members, chain = [layer], 0.0
        layer_to_group.append(layer_to_group[-1] + (len(members) == 1))
    return layer_to_group


def plot_divergence(divergences: dict[str, np.ndarray], groups: dict[str, list[int]], path: str | Path) -> Path:
    """Heat-maps of the layer divergence matrices (one panel per kind), group borders drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(divergences), figsize=(5.5 * len(divergences), 4.8))
    for ax, (kind, matrix) in zip(np.atleast_1d(axes), divergences.items()):
        image = ax.imshow(matrix, cmap="viridis", origin="lower")
        bounds = [i - 0.5 for i in range(1, len(groups[kind])) if groups[kind][i] != groups[kind][i - 1]]
        for b in bounds:
            ax.axhline(b, color="white", lw=0.8)
            ax.axvline(b, color="white", lw=0.8)
        ax.set_title(f"{kind}: JSD of 2-D PCA histograms ({max(groups[kind]) + 1} groups)")
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
