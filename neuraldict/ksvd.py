"""K-SVD dictionary learning (Aharon, Elad & Bruckstein 2006), in its approximate form (Rubinstein,
Zibulevsky & Elad 2008, "Efficient implementation of the K-SVD algorithm using batch OMP").

Each iteration alternates
1. sparse coding of every training vector with OMP over the current dictionary (`sparse_coding.py`);
2. a pass over the atoms: for atom j, with I_j the vectors that use it and E the residual X − DΓ
   without atom j's contribution on I_j,
       d_j ← normalise(E_Iᵀ g),   g ← E_I d_j          (g = atom j's coefficients on I_j)
   which is one step of the power iteration for the leading singular pair of E_I (exact K-SVD takes
   the full SVD). Unused atoms are replaced by the worst-represented training vector.
The residual E is kept up to date in place, so an atom update costs O(|I_j| · d). Runs on the device
of the input (CPU or CUDA).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from csr_runtime.sparse_coding import sparse_decode, sparse_encode


@torch.no_grad()
def ksvd_dictionary(
    x: torch.Tensor,
    init: torch.Tensor,
    *,
    s: int,
    iterations: int = 10,
    power_iterations: int = 1,
    duplicate_cosine: float = 0.99,
    progress: bool = False,
    history: list | None = None,
) -> torch.Tensor:
    """x: (n, d) training vectors, init: (N, d) unit rows → learned (N, d) unit rows.

    The coding stage keeps a vector's previous code when OMP's new one is worse, so the training error
    never increases. `power_iterations = 1` is approximate K-SVD; more iterations approach the exact
    rank-1 SVD update of the original K-SVD. Atoms that no vector uses, or within |cos| > `duplicate_cosine` of an earlier
    atom, are replaced by the worst-represented training vectors (the usual K-SVD clean-up). With
    `history`, the relative training error after each iteration is appended.
    """
    if x.ndim != 2 or init.ndim != 2 or x.shape[1] != init.shape[1]:
        raise ValueError(f"x (n, d) and init (N, d) must share d; got {tuple(x.shape)} and {tuple(init.shape)}")
    if len(x) == 0:
        raise ValueError("K-SVD needs at least one training vector")
    D = torch.nn.functional.normalize(init.to(x.dtype).clone(), dim=-1)
    norm = (x**2).sum()
    idx = coef = None
    for _ in tqdm(range(iterations), desc="K-SVD", disable=not progress, dynamic_ncols=True):
        new_idx, new_coef = sparse_encode(x, D, s=s, method="omp")
        E = x - sparse_decode(new_idx, new_coef, D)
        if idx is not None:  # keep the previous code where it is still better under the updated D
            old_E = x - sparse_decode(idx, coef, D)
            keep = (old_E**2).sum(-1) < (E**2).sum(-1)
            new_idx[keep], new_coef[keep], E[keep] = idx[keep], coef[keep], old_E[keep]
        idx, coef = new_idx, new_coef
        _update_atoms(D, E, idx, coef, power_iterations)
        if history is not None:
            history.append(float((E**2).sum() / norm))
        _replace_bad_atoms(D, E, idx, x, duplicate_cosine)
    return D


def _update_atoms(D: torch.Tensor, E: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor, power_iterations: int) -> None:
    """One pass over the atoms, updating D, the residual E and the coefficients in place."""
    s = idx.shape[1]
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    bounds = torch.bincount(flat, minlength=D.shape[0]).cumsum(0).tolist()
    coef_flat = coef.view(-1)
    start = 0
    for j, end in enumerate(bounds):
        if end == start:
            continue
        pairs = order[start:end]  # OMP uses an atom at most once per vector: one pair per row
        rows = pairs // s
        start = end
        g = coef_flat[pairs]
        E_I = E[rows] + g[:, None] * D[j]  # the residual without atom j
        if not g.abs().sum():
            continue
        for _ in range(power_iterations):  # power iteration for the leading singular pair of E_I
            d = E_I.T @ g
            d = d / d.norm().clamp_min(1e-30)
            g = E_I @ d
        D[j], coef_flat[pairs], E[rows] = d, g, E_I - g[:, None] * d


def _replace_bad_atoms(D, E, idx, x, duplicate_cosine: float) -> None:
    used = torch.bincount(idx.flatten(), minlength=D.shape[0]) > 0
    gram = (D @ D.T).abs().triu(diagonal=1)
    duplicate = (gram > duplicate_cosine).any(0)
    bad = (~used | duplicate).nonzero().flatten()
    if len(bad):
        worst = (E**2).sum(-1).argsort(descending=True)[: len(bad)]
        D[bad[: len(worst)]] = torch.nn.functional.normalize(x[worst], dim=-1)
