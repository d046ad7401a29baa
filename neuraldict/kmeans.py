"""k-means dictionaries: NeuralDict's initialisation (paper: "cluster centroids of the data") and a baseline.

Matching pursuit scores atoms by |⟨R, d⟩|, so an atom is a direction up to sign. We therefore run
*spherical, sign-invariant* k-means: vectors are unit-normalised, each is assigned to the centroid of
largest |cosine|, and a centroid is the normalised sum of its members, each flipped to its side.
Assignment is chunked, so memory stays at chunk_size · N whatever the data size; it runs on the
device of the input (CPU or CUDA).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def kmeans_dictionary(
    x: torch.Tensor, n_atoms: int, *, iterations: int = 20, seed: int = 0, chunk_size: int = 2048
) -> torch.Tensor:
    """x: (n, d) → dictionary (n_atoms, d) with unit-norm rows (spherical sign-invariant k-means)."""
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"k-means needs a non-empty (n, d) tensor, got shape {tuple(x.shape)}")
    if n_atoms > len(x):
        raise ValueError(f"k-means needs at least n_atoms = {n_atoms} vectors, got {len(x)}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    centroids = unit[torch.randperm(len(unit), generator=generator)[:n_atoms].to(unit.device)].clone()
    for _ in range(iterations):
        sums = torch.zeros_like(centroids)
        counts = torch.zeros(n_atoms, device=unit.device)
        for chunk in unit.split(chunk_size):
            cos = chunk @ centroids.T
            best = cos.abs().argmax(-1)
            sign = cos.gather(-1, best[:, None]).sign().clamp_min(0) * 2 - 1  # ±1, +1 for ties at 0
            sums.index_add_(0, best, chunk * sign)
            counts += torch.bincount(best, minlength=n_atoms)
        empty = counts == 0
        if empty.any():  # re-seed empty clusters from random data points
            refill = torch.randint(len(unit), (int(empty.sum()),), generator=generator).to(unit.device)
            sums[empty] = unit[refill]
        centroids = torch.nn.functional.normalize(sums, dim=-1)
    return centroids.to(x.dtype)
