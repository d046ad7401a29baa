"""Caches on bf16 / fp16 models: coding runs in fp32 inside, the attention gets the model's dtype back."""

import pytest
import torch
from transformers import DynamicCache

from csr_eval.kivi import KIVICache
from csr_runtime.cache import CSRCache
from tests.conftest import tiny_llama
from tests.test_cache import PACKED_FP16, complete_dictionary, random_dictionary

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU cases cover the same logic)")


@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16), ("cpu", torch.float16),
                                          pytest.param("cuda", torch.bfloat16, marks=[pytest.mark.cuda, CUDA])])
def test_exact_csr_cache_on_a_half_precision_model_matches_dynamic_cache(device, dtype):
    lm = tiny_llama(n_layers=2).to(device, dtype)
    ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(0)).to(device)
    cache = CSRCache(lm, complete_dictionary(lm), online_atoms=0, guard_atoms=0, window=3, sink_tokens=2, **PACKED_FP16)
    reference = DynamicCache()
    with torch.no_grad():
        for part in (ids[:, :12], ids[:, 12:13], ids[:, 13:]):
            expected = lm(part, past_key_values=reference).logits
            got = lm(part, past_key_values=cache).logits
            assert got.dtype == dtype
            # the reference's own K/V are half precision; the cache's fp32 round trip and fp16 coefficients
            # differ from them by about one half-precision ulp
            torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=0)
    keys, values = cache.layers[0].read_back()
    assert keys.dtype == values.dtype == dtype
    assert all(t.device.type == device for layer in cache.layers for t in layer.held_tensors())


@pytest.mark.parametrize("make", ["csr", "kivi"])
def test_lossy_caches_generate_on_a_bf16_model(make):
    lm = tiny_llama(n_layers=2, head_dim=32 if make == "kivi" else 16).to(torch.bfloat16)
    cache = CSRCache(lm, random_dictionary(lm), sparsity_keys=2, sparsity_values=1) if make == "csr" else \
        KIVICache(2, bits=2, group_size=32, residual_length=0)
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = lm(ids).logits.float()
        out = lm(ids[:, :39], past_key_values=cache)
        step = lm(ids[:, 39:], past_key_values=cache).logits.float()
    assert torch.isfinite(step).all() and out.logits.dtype == torch.bfloat16
    # the compressed past changes the last logits, but not beyond recognition: same scale as exact
    assert (step[0, -1] - full[0, -1]).abs().mean() < full[0, -1].abs().mean()
