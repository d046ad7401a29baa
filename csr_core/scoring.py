"""Score a model's next-token log-probabilities through any KV cache: the measurement `csr-eval` and
`neuraldict compare` share, and count the bytes any cache holds. Only tokens predicted from the cache count: the first `prefix` tokens are
prefilled, the rest decoded `chunk` tokens per step."""

from __future__ import annotations

import torch

from csr_core.models import with_cache


def tensor_bytes(t) -> int:
    """Bytes a tensor holds; quantised tensor subclasses (quanto's packed data, scales, shifts) summed part by part."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.nbytes


def cache_bytes(cache) -> int:
    """Every byte a cache holds for the sequence: ours report it; transformers' caches are summed here."""
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes()
    held = ("keys", "values", "_quantized_keys", "_quantized_values")  # DynamicLayer, QuantizedLayer (+ residual)
    return sum(tensor_bytes(t) for layer in cache.layers if layer.is_initialized
               for t in (getattr(layer, name, None) for name in held) if t is not None)


@torch.no_grad()
def chunked_log_probs(lm, ids: torch.Tensor, cache, *, prefix: int, chunk: int, memory_trace: list | None = None):
    """ids: (1, L) → log-probabilities (L − prefix, V) of tokens prefix..L−1, predicted from the cache."""
    L = ids.shape[1]
    out = lm(ids[:, :prefix], **with_cache(lm, cache))
    rows = [out.logits[0, -1:].float().log_softmax(-1)]
    for start in range(prefix, L - 1, chunk):
        out = lm(ids[:, start : min(start + chunk, L - 1)], **with_cache(lm, cache))
        rows.append(out.logits[0].float().log_softmax(-1))
        if memory_trace is not None:
            memory_trace.append((cache.get_seq_length(), cache_bytes(cache)))
    return torch.cat(rows)
