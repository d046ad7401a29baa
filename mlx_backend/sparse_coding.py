"""Matching pursuit and OMP in MLX — the same algorithms, names and shapes as `csr_runtime.sparse_coding`.

Dictionaries hold atoms as rows, D: (N, d), unit l2 norm. x: (n, d) → idx: (n, s), coef: (n, s).
"""

from __future__ import annotations

import mlx.core as mx


def _mp_batch(x: mx.array, dictionary: mx.array, s: int, quantize=None) -> tuple[mx.array, mx.array]:
    """Matching pursuit, exactly s iterations: atom = argmax |⟨R, d⟩|, coefficient = ⟨R, d⟩ (rounded by
    `quantize` before the residual update, if given)."""
    residual, idx, coef = x, [], []
    for _ in range(s):
        scores = residual @ dictionary.T
        i = mx.argmax(mx.abs(scores), axis=-1)
        c = mx.take_along_axis(scores, i[:, None], axis=-1)[:, 0]
        if quantize is not None:
            c = quantize(c)
        residual = residual - c[:, None] * dictionary[i]
        idx.append(i)
        coef.append(c)
    return mx.stack(idx, axis=-1), mx.stack(coef, axis=-1)


def _omp_batch(x: mx.array, dictionary: mx.array, s: int, quantize=None) -> tuple[mx.array, mx.array]:
    """OMP: after each selection, least squares on the chosen atoms (normal equations, batched solve)."""
    n = x.shape[0]
    correlations = x @ dictionary.T
    scores = correlations
    chosen = mx.zeros(correlations.shape, dtype=mx.bool_)
    rows = mx.arange(n)
    idx = []
    for g in range(s):
        i = mx.argmax(mx.where(chosen, -1.0, mx.abs(scores)), axis=-1)
        chosen[rows, i] = True
        idx.append(i)
        support = mx.stack(idx, axis=-1)  # (n, g+1)
        atoms = dictionary[support]  # (n, g+1, d)
        gram = atoms @ atoms.transpose(0, 2, 1)
        rhs = mx.take_along_axis(correlations, support, axis=-1)[..., None]
        coef = mx.linalg.solve(gram, rhs, stream=mx.cpu)[..., 0]
        if g + 1 < s:
            residual = x - (coef[..., None] * atoms).sum(axis=1)
            scores = residual @ dictionary.T
    return mx.stack(idx, axis=-1), (coef if quantize is None else quantize(coef))


_KERNELS = {"mp": _mp_batch, "omp": _omp_batch}


def sparse_encode(x: mx.array, dictionary: mx.array, *, s: int, method: str = "mp", chunk_size: int = 8192,
                  quantize=None):
    """Code every row of x with s atoms of `dictionary` (chunked: peak memory ≈ chunk_size · N scores).
    `quantize` maps coefficients to their stored values, inside MP's loop (as in the torch kernel)."""
    if method not in _KERNELS:
        raise ValueError(f"method must be one of {sorted(_KERNELS)}, got {method!r}")
    if x.ndim != 2 or dictionary.ndim != 2 or x.shape[1] != dictionary.shape[1]:
        raise ValueError(f"x must be (n, d) and dictionary (N, d) with the same d; got {x.shape} and {dictionary.shape}")
    if s < 1 or s > dictionary.shape[0]:
        raise ValueError(f"sparsity s must be in 1..N = {dictionary.shape[0]}, got {s}")
    kernel = _KERNELS[method]
    parts = [kernel(x[i : i + chunk_size], dictionary, s, quantize) for i in range(0, x.shape[0], chunk_size)]
    if len(parts) == 1:
        return parts[0]
    return mx.concatenate([p[0] for p in parts]), mx.concatenate([p[1] for p in parts])


def sparse_decode(idx: mx.array, coef: mx.array, dictionary: mx.array) -> mx.array:
    """x̂ = Σ_g coef_g · D[idx_g].   idx, coef: (..., s) → (..., d)."""
    return (coef.astype(dictionary.dtype)[..., None] * dictionary[idx]).sum(axis=-2)


def residual_energy(x: mx.array, idx: mx.array, coef: mx.array, dictionary: mx.array) -> mx.array:
    """‖x − Σ_g coef_g · D[idx_g]‖² of every row: x (n, d), idx, coef (n, s) → (n,) (the refinement's ranking)."""
    return ((x - sparse_decode(idx, coef, dictionary)) ** 2).sum(-1)


def split_chunks(x: mx.array, s_n: int) -> mx.array:
    """(..., d_h) → (..., s_n, d_h / s_n)."""
    if x.shape[-1] % s_n:
        raise ValueError(f"head_dim {x.shape[-1]} is not divisible by s_n = {s_n}")
    return x.reshape(*x.shape[:-1], s_n, x.shape[-1] // s_n)
