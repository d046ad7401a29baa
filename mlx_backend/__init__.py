"""CSR inference in MLX (Apple silicon; `mlx[cpu]` on Linux), as a KV cache for `mlx-lm` models.

Mirrors `csr_runtime` file for file: `sparse_coding.py`, `rope.py`, `cache.py`, `evaluate.py`, plus
`convert.py` and `generate.py`. Needs no torch at run time (the dictionary file reader is numpy-only).
"""

try:
    import mlx.core  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "mlx_backend needs MLX: `pip install 'csr-neuraldict[mlx]'` on a Mac, "
        "or `pip install 'csr-neuraldict[mlx-linux]'` (mlx[cpu]) on Linux"
    ) from e
