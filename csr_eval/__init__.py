"""Evaluation on top of everything: `csr-eval` (`evaluate.py`: perplexity, KL, passkey retrieval, memory)
and the KIVI baseline cache (`kivi.py`) it compares CSR with, next to transformers' quantized cache."""
