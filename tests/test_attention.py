"""The "csr_codes" attention: values aggregated as codes give the logits of the dense CSR path."""

import contextlib
import warnings

import torch
from transformers import DynamicCache

import csr_runtime.attention as attention
from csr_runtime import native
from csr_runtime.attention import CSR_ATTENTION, CodedValues
from csr_runtime.cache import CSRCache
from tests.conftest import tiny_llama
from tests.test_center import centered_complete_dictionary
from tests.test_cache import random_dictionary


@contextlib.contextmanager
def attention_implementation(lm, name):
    before = lm.config._attn_implementation
    lm.set_attn_implementation(name)
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


@torch.no_grad()
def run(lm, ids, make_cache, prefill: int):
    """Prefill, three one-token steps, a 4-token chunk (keys still scored from codes), then the rest as one chunk:
    the logits of every call, concatenated."""
    cache = make_cache()
    logits = [lm(ids[:, :prefill], cache=cache).logits]
    for t in range(prefill, prefill + 3):
        logits.append(lm(ids[:, t : t + 1], cache=cache).logits)
    logits.append(lm(ids[:, prefill + 3 : prefill + 7], cache=cache).logits)
    logits.append(lm(ids[:, prefill + 7 :], cache=cache).logits)
    return torch.cat(logits, dim=1)


def dense_and_codes(lm, ids, make_cache, prefill):
    with attention_implementation(lm, "eager"):
        dense = run(lm, ids, make_cache, prefill)
    with attention_implementation(lm, CSR_ATTENTION):
        codes = run(lm, ids, make_cache, prefill)
    return dense, codes


def test_code_domain_values_match_the_dense_path_on_smollm2(smollm2, smollm2_kmeans_dictionary, monkeypatch):
    lm, _ = smollm2
    calls = []
    aggregate = CodedValues.aggregate
    monkeypatch.setattr(CodedValues, "aggregate", lambda self, w: calls.append(self.n_coded) or aggregate(self, w))
    kernel_calls = []
    if native.find_compiler() is not None:  # where the CPU kernel builds, decode steps score the keys from codes
        for name in ("key_scores", "weighted_values"):
            original = getattr(native, name)
            monkeypatch.setattr(native, name, lambda *a, _f=original, _n=name, **k: kernel_calls.append(_n) or _f(*a, **k))
    ids = torch.randint(0, 49152, (1, 72), generator=torch.Generator().manual_seed(0))
    make = lambda: CSRCache(lm, smollm2_kmeans_dictionary, sparsity=4, window=8)  # values: s_n = 2 chunks
    dense, codes = dense_and_codes(lm, ids, make, prefill=48)
    assert max(calls) >= 36  # 48 − 4 sinks − 8 window: the coded slots really went through the scatter onto atoms
    if native.find_compiler() is not None:  # 30 layers × (3 one-token steps + the 4-token chunk), keys and values
        assert kernel_calls.count("key_scores") == 120 and kernel_calls.count("weighted_values") >= 120
    # the prefill (nothing coded yet) runs PyTorch's fused attention, not eager's: float32 summation order
    torch.testing.assert_close(codes, dense, atol=1e-3, rtol=0)


def test_center_whitening_and_left_padding_are_aggregated_as_the_dense_path():
    from csr_runtime.metric import whitening

    lm = tiny_llama(n_layers=2, heads=4, kv_heads=2, head_dim=16)
    d = random_dictionary(lm)  # lossy: 4 key atoms, 2 value atoms per chunk
    d.values.center = centered_complete_dictionary(lm).values.center
    M = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    A, A_inv = whitening(M @ M.transpose(-1, -2) + torch.eye(16))
    d.values.metric, d.values.whiten, d.values.unwhiten = "attention", A.numpy(), A_inv.numpy()
    ids = torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    ids[1, :5] = 0
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 is left-padded
    for impl_outputs in [dense_and_codes(lm, ids, lambda: CSRCache(lm, d, window=3), prefill=16)]:
        dense, codes = impl_outputs
        torch.testing.assert_close(codes, dense, atol=1e-5, rtol=0)
    # left padding: positions and the mask flow through generate
    with attention_implementation(lm, "eager"):
        a = lm.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, cache=CSRCache(lm, d, window=3))
    with attention_implementation(lm, CSR_ATTENTION):
        b = lm.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, cache=CSRCache(lm, d, window=3))
    assert torch.equal(a, b)


def test_other_caches_take_the_dense_product_with_one_notice(monkeypatch):
    lm = tiny_llama(n_layers=2, heads=4, kv_heads=2, head_dim=16)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(attention, "_noticed", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dense, codes = dense_and_codes(lm, ids, DynamicCache, prefill=10)
    assert sum("got dense values" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(codes, dense, atol=1e-5, rtol=0)
