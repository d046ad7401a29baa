"""Sparse coding over a dictionary: matching pursuit (MP) and orthogonal matching pursuit (OMP).

The one implementation used by NeuralDict training, the baselines, evaluation and the runtime cache.
Dictionaries hold **atoms as rows**, D: (N, d), every row unit l2 norm. A vector x is coded as
s (index, coefficient) pairs with x ≈ Σ_g coef_g · D[idx_g].

Levels, as in scikit-learn: private batched kernels (`_mp_batch`, `_omp_batch`), the public tensor
function `sparse_encode` (chunked so memory stays bounded), and `sparse_decode`.

References: Mallat & Zhang 1993 (MP); Pati, Rezaiifar & Krishnaprasad 1993 (OMP);
CSR paper (Zhang et al. 2025) §"Sparse representation" for MP with exactly s iterations.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from csr_runtime import native

Method = Literal["mp", "omp"]
Quantizer = Callable[[torch.Tensor], torch.Tensor]  # coefficients → the values they are stored as


def _argmax_abs(scores: torch.Tensor, magnitude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the column of largest |score| and its (signed) score: (n, N) → (n,), (n,).

    `magnitude` is an (n, N) buffer for |scores|: written in place, it costs a third of a freshly allocated
    |scores| on CPU (first writes into new memory fault its pages in), and `max` reads it faster than `argmax`."""
    magnitude = torch.abs(scores, out=magnitude) if magnitude is not None else scores.abs()
    i = magnitude.max(dim=-1).indices
    return i, scores.gather(-1, i[:, None]).squeeze(-1)


def _mp_batch(x: torch.Tensor, dictionary: torch.Tensor, s: int, quantize: Quantizer | None = None):
    """Matching pursuit, exactly s iterations (an atom may be picked more than once).

    x: (n, d), dictionary: (N, d) → idx: (n, s) int64, coef: (n, s) in x.dtype.
    Differentiable in x and dictionary through coefficients and residuals; the argmax is not.
    With `quantize`, each coefficient is rounded to its stored value before the residual is updated,
    so the next atoms correct the rounding error (error feedback).
    """
    residual = x
    idx, coef = [], []
    # In training only the chosen atoms' coefficients carry gradient: the (n, N) scores are built without
    # autograd and each coefficient is recomputed as <R, D[i]>, so the backward pass is O(n·s·d), not O(n·N·d).
    differentiable = torch.is_grad_enabled() and (x.requires_grad or dictionary.requires_grad)
    # the s iterations' scores share two buffers (scores, |scores|): 1.2-1.5x faster MP on CPU than fresh tensors
    scores = x.new_empty(x.shape[0], dictionary.shape[0])
    magnitude = torch.empty_like(scores)
    atoms_t = dictionary.detach().T
    for _ in range(s):
        with torch.no_grad():
            torch.mm(residual.detach(), atoms_t, out=scores)
            i, c = _argmax_abs(scores, magnitude)  # largest |<R, d>|: negatively correlated atoms count too
        atoms = dictionary[i]
        if differentiable:
            c = (residual * atoms).sum(-1)
        if quantize is not None:
            c = quantize(c)
        residual = residual - c[:, None] * atoms
        idx.append(i)
        coef.append(c)
    return torch.stack(idx, dim=-1), torch.stack(coef, dim=-1)


def _mp_gram_batch(x: torch.Tensor, dictionary: torch.Tensor, s: int, quantize: Quantizer | None, gram: torch.Tensor,
                   scores: torch.Tensor | None = None):
    """Matching pursuit as `_mp_batch`, with one product with the dictionary instead of s: after an atom is chosen,
    the residual's scores follow from the Gram matrix, <R − c·d_i, d_j> = <R, d_j> − c·G[i, j] — an update of N
    scores per vector instead of N·d multiply-adds — in the CPU kernel (`native.mp_gram`), which chooses all s
    atoms of a vector while its scores stay in cache. The same choices as `_mp_batch` up to float rounding of the
    scores (near-ties may differ). No autograd (the caller checks); rounding: none or e3m1 (`_gram_pays`).
    `scores`: an (≥ n, N) float32 buffer for X Dᵀ, reused across chunks (fresh memory faults its pages in on
    every product: a third of the product's time at 2048 × 2048)."""
    scores = x @ dictionary.T if scores is None else torch.mm(x, dictionary.T, out=scores[: x.shape[0]])
    return native.mp_gram(scores, gram, s, quantize)


def _mp_amx_batch(x: torch.Tensor, dictionary: "native.AmxDictionary", s: int, quantize: Quantizer | None):
    """`_mp_gram_batch` with the product X Dᵀ made in the kernel on the CPU's matrix unit (`native.mp_amx`: Intel AMX,
    float32 scores from three bf16 products, within ~2⁻¹⁷ |x| of float32's), 16 vectors at a time while their
    scores stay in L2 (no (n, N) tensor), updated through an int16 Gram matrix (within 2⁻¹⁶ |c|; half the bytes
    each update reads). The same choices as `_mp_gram_batch` but at near-ties. None where the kernel could not
    allocate its buffers. `dictionary`: `native.amx_dictionary(D)`."""
    return native.mp_amx(x, dictionary, s, quantize)


def _gram_pays(x: torch.Tensor, dictionary: torch.Tensor, s: int, method: str, quantize: Quantizer | None) -> bool:
    """Whether `_mp_gram_batch` applies (`_kernel_applies`) and pays: enough vectors that the Gram matrix
    (N · N · d multiply-adds) costs less than the s − 1 products it saves (each also a pass for |scores| and one
    for their maximum, which the kernel fuses), and N small enough that it stays cheap to hold (N ≤ 4096: 64 MiB)."""
    N = dictionary.shape[0]
    return s > 1 and x.shape[0] * (s - 1) > N and 256 <= N <= 4096 and _kernel_applies(x, dictionary, s, method, quantize)


def _mp_direct_batch(x: torch.Tensor, atoms_t: torch.Tensor, s: int, quantize: Quantizer | None):
    """Matching pursuit as `_mp_batch` in one call of the CPU kernel (`native.mp_direct`), which computes each
    residual's scores itself: for calls too small for the Gram matrix — a decode step's 24 new keys cost ~60 tensor
    operations on the torch path, bound by their count rather than by arithmetic. The same choices as `_mp_batch`
    up to float rounding of the scores (near-ties may differ). `atoms_t`: the dictionary transposed, (d, N)."""
    return native.mp_direct(x.contiguous(), atoms_t, s, quantize)


def _kernel_applies(x: torch.Tensor, dictionary: torch.Tensor, s: int, method: str, quantize: Quantizer | None) -> bool:
    """Whether the CPU MP kernels (`_mp_gram_batch`, `_mp_direct_batch`) can code this call: plain MP without
    autograd on CPU float32, the kernels built, coefficients kept as they are or rounded to e3m1 (which the kernels
    do themselves)."""
    return (method == "mp" and (quantize is None or getattr(quantize, "coef_format", None) == "e3m1")
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[1] <= 1024
            and not (torch.is_grad_enabled() and (x.requires_grad or dictionary.requires_grad)) and native.available())


def _omp_batch(x: torch.Tensor, dictionary: torch.Tensor, s: int, quantize: Quantizer | None = None):
    """Orthogonal matching pursuit: after each selection, refit all chosen coefficients by least squares.

    x: (n, d), dictionary: (N, d) → idx: (n, s) int64, coef: (n, s). The least-squares problem on the
    chosen atoms is solved through the Cholesky factor of their Gram matrix, updated by one row per
    iteration (the "Cholesky OMP" of Rubinstein, Zibulevsky & Elad 2008). Atoms already chosen are
    masked out, so supports have s distinct atoms as in scikit-learn's `orthogonal_mp`.
    """
    n = x.shape[0]
    correlations = x @ dictionary.T  # (n, N) = Dᵀx, fixed
    scores = correlations  # Dᵀ R, made afresh from the refitted residual each iteration
    idx = torch.empty(n, s, dtype=torch.long, device=x.device)
    L = torch.zeros(n, s, s, dtype=x.dtype, device=x.device)  # lower Cholesky factor of G[idx, idx]
    for g in range(s):
        i, _ = _argmax_abs(scores)
        if g > 0:  # a chosen atom wins only where every score is 0 (x already exact): take any other atom
            again = (idx[:, :g] == i[:, None]).any(-1)
            if again.any():
                first_free = (torch.arange(g + 1, device=x.device)[None, :, None] == idx[again, None, :g]).any(-1)
                i[again] = first_free.logical_not().int().argmax(-1)
        idx[:, g] = i
        if g == 0:
            L[:, 0, 0] = 1.0  # unit-norm atoms
        else:
            # New Gram row against the previous atoms: w solves L w = G[idx[:g], i].
            gram_row = (dictionary[idx[:, :g]] * dictionary[i][:, None, :]).sum(-1)  # (n, g)
            w = torch.linalg.solve_triangular(L[:, :g, :g], gram_row[..., None], upper=False).squeeze(-1)
            L[:, g, :g] = w
            L[:, g, g] = (1.0 - (w * w).sum(-1)).clamp_min(torch.finfo(x.dtype).eps).sqrt()
        rhs = correlations.gather(-1, idx[:, : g + 1])[..., None]  # (n, g+1, 1)
        c = torch.cholesky_solve(rhs, L[:, : g + 1, : g + 1], upper=False).squeeze(-1)  # (n, g+1)
        if g + 1 < s:
            residual = x - torch.einsum("ng,ngd->nd", c, dictionary[idx[:, : g + 1]])
            # the residual is orthogonal to the chosen atoms: zero their scores exactly so none is chosen twice
            scores = (residual @ dictionary.T).scatter_(-1, idx[:, : g + 1], 0.0)
    return idx, (c if quantize is None else quantize(c))  # least squares has no error feedback: round at the end


_KERNELS = {"mp": _mp_batch, "omp": _omp_batch}
# Rows per product in the Gram path: 512 rows' scores (4 MiB at N = 2048) stay in the L3 cache beside the Gram
# matrix (16 MiB); with 2048 rows and a fresh buffer per product, MP of 12288 vectors took 40-49 ms instead of 32-33.
_GRAM_CHUNK = 512


def sparse_encode(
    x: torch.Tensor,
    dictionary: torch.Tensor,
    *,
    s: int,
    method: Method = "mp",
    chunk_size: int | None = None,
    quantize: Quantizer | None = None,
    gram_memo: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code every row of x with s atoms of `dictionary`.

    x: (n, d), dictionary: (N, d) with unit-norm rows → idx: (n, s) int64, coef: (n, s) in x.dtype.
    Works in x's dtype and device (float32 by default; pass float64 tensors for a float64 run).
    Rows are coded `chunk_size` at a time, so peak memory is about chunk_size · N scores. By default a
    chunk's scores take 16 MiB on CPU (they stay in cache: ~1.7× faster at N = 4096 than 8192 rows)
    and 256 MiB on a GPU. `quantize` maps coefficients to the values they will be stored as (e.g.
    FP8): MP then codes each residual against the rounded coefficients. Large calls without autograd on the
    CPU update the scores through the Gram matrix instead of a product per atom (`_mp_gram_batch`; on a CPU with
    Intel AMX the product X Dᵀ too is made in the kernel, `_mp_amx_batch`), smaller ones run in one kernel call
    (`_mp_direct_batch`); a caller that codes with the same dictionary again soon (a cache: the refinement, the next
    layer of a merged group) passes a dict as `gram_memo` to keep what they derive from the last dictionary there
    (its Gram matrix, its transpose, its AMX tiles and int16 Gram matrix; one of each at a time; the caller frees it).
    """
    if method not in _KERNELS:
        raise ValueError(f"method must be one of {sorted(_KERNELS)}, got {method!r}")
    if x.ndim != 2 or dictionary.ndim != 2:
        raise ValueError(f"x must be (n, d) and dictionary (N, d); got {tuple(x.shape)} and {tuple(dictionary.shape)}")
    if x.shape[1] != dictionary.shape[1]:
        raise ValueError(
            f"x has vectors of width {x.shape[1]} but the dictionary's atoms have width {dictionary.shape[1]}"
        )
    if not isinstance(s, int) or s < 1:
        raise ValueError(f"sparsity s must be a positive integer, got {s!r}")
    if method == "omp" and s > min(dictionary.shape):
        raise ValueError(f"OMP needs s <= min(N, d) = {min(dictionary.shape)}, got s = {s}")
    if s > dictionary.shape[0] and method == "mp":
        raise ValueError(f"sparsity s = {s} exceeds the number of atoms N = {dictionary.shape[0]}")
    dictionary = dictionary.to(dtype=x.dtype, device=x.device)
    if chunk_size is None:
        budget = 2**24 if x.device.type == "cpu" else 2**28
        chunk_size = max(256, budget // (dictionary.shape[0] * x.element_size()))
    kernel = _KERNELS[method]
    memo = {} if gram_memo is None else gram_memo
    if _gram_pays(x, dictionary, s, method, quantize):
        if native.amx_available():  # the product in the kernel, on AMX tiles (no (n, N) scores), the Gram matrix too
            held = memo.get("amx", (None, None, None))[1]  # the last dictionary's: its memory is reused
            amx = _memoized(memo, "amx", dictionary, lambda D: native.amx_dictionary(D, reuse=held))
            coded = None if amx is None else _mp_amx_batch(x, amx, s, quantize)
            if coded is not None:
                return coded
        gram = _memoized(memo, "gram", dictionary, lambda D: D @ D.T)
        chunk_size = min(chunk_size, _GRAM_CHUNK)
        buffer = x.new_empty(min(x.shape[0], chunk_size), dictionary.shape[0])
        kernel = lambda chunk, D, s, quantize: _mp_gram_batch(chunk, D, s, quantize, gram, buffer)
    elif _kernel_applies(x, dictionary, s, method, quantize):
        atoms_t = _memoized(memo, "atoms_t", dictionary, lambda D: D.T.contiguous())
        kernel = lambda chunk, D, s, quantize: _mp_direct_batch(chunk, atoms_t, s, quantize)
    if x.shape[0] <= chunk_size:
        return kernel(x, dictionary, s, quantize)
    parts = [kernel(chunk, dictionary, s, quantize) for chunk in x.split(chunk_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _memoized(memo: dict, name: str, dictionary: torch.Tensor, make: Callable[[torch.Tensor], torch.Tensor]):
    """make(dictionary), kept in memo[name] for the last dictionary it was made for (held: its memory is never
    reused while held; its version: not changed in place since)."""
    held, value, version = memo.get(name, (None, None, None))
    if held is not dictionary or version != dictionary._version:
        value = make(dictionary)
        memo[name] = (dictionary, value, dictionary._version)
    return value


def sparse_decode(idx: torch.Tensor, coef: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """x̂ = Σ_g coef_g · D[idx_g].   idx, coef: (..., s), dictionary: (N, d) → (..., d) in dictionary.dtype.

    A weighted `embedding_bag`: one fused gather-and-sum, ~20× faster on CPU than gathering (…, s, d)
    atoms and reducing them, and differentiable in coef and dictionary.
    """
    s = idx.shape[-1]
    idx = idx if idx.dtype in (torch.int32, torch.int64) else idx.long()  # embedding_bag takes both
    out = torch.nn.functional.embedding_bag(
        idx.reshape(-1, s), dictionary, per_sample_weights=coef.reshape(-1, s).to(dictionary.dtype), mode="sum"
    )
    return out.view(*idx.shape[:-1], dictionary.shape[-1])


def residual_energy(x: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """‖x − Σ_g coef_g · D[idx_g]‖² of every row: x (n, d), idx, coef (n, s) → (n,) in x.dtype. On the CPU in one
    kernel pass (`native.residual_energy`: no (n, d) decode or residual is stored), else as `sparse_decode`."""
    if native.available() and x.device.type == "cpu" and x.dtype == dictionary.dtype == torch.float32:
        return native.residual_energy(x, idx, coef, dictionary)
    return (x - sparse_decode(idx, coef, dictionary).to(x.dtype)).square().sum(-1)


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Σ‖x − x̂‖² / Σ‖x‖² over all rows, the error every report in this project uses."""
    x64 = x.double()
    return float(((x64 - x_hat.double()) ** 2).sum() / (x64**2).sum().clamp_min(1e-300))


def split_chunks(x: torch.Tensor, s_n: int) -> torch.Tensor:
    """(..., d_h) → (..., s_n, d_h / s_n): the paper's chunking of a head vector into s_n parts."""
    if x.shape[-1] % s_n:
        raise ValueError(f"head_dim {x.shape[-1]} is not divisible by s_n = {s_n}")
    return x.unflatten(-1, (s_n, x.shape[-1] // s_n))
