"""The bottom layer every other part stands on: the dictionary file format (`dictionary_file.py`), the
bit layout of packed codes (`code_layout.py`), budget allocation (`allocation.py`), the runtime defaults
(`defaults.py`), model loading and fingerprints (`models.py`), the corpora (`corpus.py`), cache paths
(`paths.py`) and perplexity scoring with any cache (`scoring.py`).

Needs no Lightning, scikit-learn or MLX; only `models.py` and `scoring.py` import torch.
Layers, bottom to top: csr_core → csr_runtime, mlx_backend → neuraldict → csr_eval (tests/test_layering.py).
"""
