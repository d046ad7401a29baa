"""CSR inference in MLX (Apple silicon; `mlx[cpu]` on Linux), as a KV cache for `mlx-lm` models.

Mirrors `csr_runtime` file for file, with the same class and field names: `sparse_coding.py`, `rope.py`,
`metric.py`, `code_packing.py`, `codebook.py`, `cache.py`; plus `prompt_cache.py` (saving and loading
CSR prompt caches, an mlx-lm feature), `convert.py`, `generate.py` and `evaluate.py` (CLIs). Stands on `csr_core` only and needs no torch at run time (the dictionary file reader
is numpy-only).
"""

try:
    import mlx.core  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "mlx_backend needs MLX: `pip install 'csr-neuraldict[mlx]'` on a Mac, "
        "or `pip install 'csr-neuraldict[mlx-linux]'` (mlx[cpu]) on Linux"
    ) from e
