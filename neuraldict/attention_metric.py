"""The attention metric of a model, measured on calibration text (see `csr_runtime.metric` for the math).

Values need only the output projection; keys need the second moment of the pre-RoPE queries, which
one pass over `tokens` calibration tokens collects (q_proj's output, or q_norm's where a model
normalises queries per head before RoPE, as `pre_rope_key_modules` does for keys).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from csr_core.models import model_fingerprint
from csr_runtime.metric import key_metric, value_metric, whitening


@torch.no_grad()
def query_moments(lm: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """windows: (n, T) token ids → Σ_j E[q_j q_jᵀ] per layer and KV head: (n_layers, n_kv_heads, d_h, d_h) float64."""
    fp = model_fingerprint(lm, "")
    n_heads = lm.config.num_attention_heads
    sums = torch.zeros(fp.n_layers, n_heads, fp.head_dim, fp.head_dim, dtype=torch.float64)
    count = 0

    def accumulate(layer):
        def hook(_module, _inputs, output):
            q = output.reshape(-1, n_heads, fp.head_dim).double()  # (B·T, n_heads, d_h)
            sums[layer] += torch.einsum("nhi,nhj->hij", q, q)

        return hook

    hooks = []
    for l, layer in enumerate(lm.model.layers):
        attn = layer.self_attn
        hooks.append((getattr(attn, "q_norm", None) or attn.q_proj).register_forward_hook(accumulate(l)))
    try:
        for batch in tqdm(windows.split(batch_size), desc="Query statistics", dynamic_ncols=True):
            lm(input_ids=batch.to(lm.device), use_cache=False)
            count += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    group = n_heads // fp.n_kv_heads
    return (sums / count).view(fp.n_layers, fp.n_kv_heads, group, fp.head_dim, fp.head_dim).sum(2)


@torch.no_grad()
def attention_whitening(lm: torch.nn.Module, windows: torch.Tensor, *, max_distance: int = 2048) -> dict:
    """{"keys": (A, A⁻¹), "values": (A, A⁻¹)}, each (n_layers, n_kv_heads, d_h, d_h) float32."""
    fp = model_fingerprint(lm, "")
    n_heads = lm.config.num_attention_heads
    values = torch.stack([value_metric(layer.self_attn.o_proj.weight, n_heads, fp.n_kv_heads) for layer in lm.model.layers])
    moments = query_moments(lm, windows)
    inv_freq = lm.model.rotary_emb.inv_freq.detach().cpu()
    keys = torch.stack([key_metric(m, inv_freq, max_distance) for m in moments])
    return {"keys": whitening(keys), "values": whitening(values)}
