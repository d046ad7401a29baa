"""The PyTorch CSR runtime: `CSRCache` (`cache.py`), a transformers Cache that stores the KV cache as CSR
codes, on top of `csr_core` only. Its kernels and policies mirror `mlx_backend` file for file:
`sparse_coding.py`, `rope.py`, `metric.py`, `code_packing.py`, `codebook.py`, `cache.py`; plus
`attention.py` (the "csr_codes" attention of transformers' AttentionInterface, a transformers feature)."""
