"""The CPU decode kernel (`csr_runtime.native`) against the torch path it replaces."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from csr_core.code_layout import CodeLayout
from csr_core.dictionary_file import DictionaryFile, KindDictionaries
from csr_core.models import model_fingerprint
from csr_runtime import native
from csr_runtime.cache import CSRCache
from tests.conftest import tiny_llama

# Only where no C compiler exists at all (CI has one): the runtime then takes the torch path, which every other test
# covers, and the last test here checks that fallback.
needs_compiler = pytest.mark.skipif(native.find_compiler() is None, reason="no C compiler: the runtime takes the torch path")


def _dictionary(lm, head_dim, n_atoms=96):
    rng = np.random.default_rng(0)
    unit = lambda n, d: (a := rng.standard_normal((n, d)).astype(np.float32)) / np.linalg.norm(a, axis=1, keepdims=True)
    fp = model_fingerprint(lm, "tiny")
    center = lambda: rng.standard_normal((2, 2, head_dim)).astype(np.float32) * 0.3  # (layers, KV heads, d_h)
    return DictionaryFile(fp, KindDictionaries(1, 4, [0, 0], [unit(n_atoms, head_dim)], center=center()),
                          KindDictionaries(2, 2, [0, 0], [unit(n_atoms, head_dim // 2)], center=center()))


def _left_padded_cache(lm, dictionary, steps=11, padding=5, **options):
    """A batch of two rows, the second left-padded by `padding`, after a prefill and `steps` greedy decode steps."""
    ids = torch.randint(1, 128, (2, 21), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :padding] = 0
    cache = CSRCache(lm, dictionary, **options)
    with torch.no_grad():
        lm.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                    pad_token_id=0, cache=cache)
    return cache


def _read_back_both_ways(cache, monkeypatch):
    fast = [layer.read_back() for layer in cache.layers]
    monkeypatch.setenv("CSR_NATIVE", "0")
    reference = [layer.read_back() for layer in cache.layers]
    monkeypatch.delenv("CSR_NATIVE")
    return fast, reference


@needs_compiler
@pytest.mark.parametrize("head_dim", [16, 64])  # 64: the kernel's unrolled path
@pytest.mark.parametrize("layout", [dict(coef_format="e3m1"), dict(coef_format="fp8"), dict(coef_format="int8"),
                                    dict(coef_format="fp16", index_bits=16)])
def test_kernel_reads_back_what_the_torch_path_reads(layout, head_dim, monkeypatch):
    assert native.available(), "a C compiler is on PATH but the kernel did not build: see the warning"
    lm = tiny_llama(n_layers=2, kv_heads=2, head_dim=head_dim)
    # refinement, online and guard atoms (row-local indices past the offline ones), sinks, centres
    cache = _left_padded_cache(lm, _dictionary(lm, head_dim), sparsity_keys=3, sparsity_values=2, refine_fraction=0.3,
                               refine_atoms=2, online_atoms=8, guard_atoms=8, guard_threshold=0.05, sink_tokens=2,
                               window=3, coding_batch=4, **layout)
    stats = cache.stats()
    assert stats["vectors_refined"] > 0 and stats["guard_atoms"] > 0
    fast, reference = _read_back_both_ways(cache, monkeypatch)
    for (keys, values), (ref_keys, ref_values) in zip(fast, reference):
        torch.testing.assert_close(keys, ref_keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)


@needs_compiler
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("layout", [dict(coef_format="e3m1"), dict(coef_format="int8"),
                                    dict(coef_format="fp16", index_bits=16)])
def test_scores_and_weighted_values_from_codes_equal_the_decoded_products(layout, head_dim):
    """The attention kernels (`key_scores`, `weighted_values`) against q·k and Σ w v over the read-back coded slots."""
    lm = tiny_llama(n_layers=2, heads=6, kv_heads=2, head_dim=head_dim)  # 3 query heads per KV head
    cache = _left_padded_cache(lm, _dictionary(lm, head_dim), sparsity_keys=3, sparsity_values=2, refine_fraction=0.3,
                               refine_atoms=2, online_atoms=8, guard_atoms=8, guard_threshold=0.05, sink_tokens=2,
                               window=3, coding_batch=4, **layout)
    g = torch.Generator().manual_seed(5)
    for layer in cache.layers:
        keys, values = layer.read_back()
        start, n = layer._sink_len(), layer.n_coded
        keys, values = keys[:, :, start : start + n], values[:, :, start : start + n]  # (B, H, n, d)
        B, H, _, d = keys.shape
        query = torch.randn(B, H, 3, d, generator=g)
        scores = native.key_scores(layer._packed("keys"), query, *layer._kernel_cos_sin())
        torch.testing.assert_close(scores, query @ keys.transpose(-1, -2), atol=1e-4, rtol=1e-4)
        weights = torch.rand(B, H, 3, n, generator=g)
        torch.testing.assert_close(native.weighted_values(layer._packed("values"), weights), weights @ values,
                                   atol=1e-4, rtol=1e-4)
        # written into / read from the coded slots of a whole score row (evenly spaced rows, no copies)
        whole = torch.full((B, H, 3, n + 7), -1.0)
        native.key_scores(layer._packed("keys"), query, *layer._kernel_cos_sin(), out=whole[..., 2 : 2 + n])
        torch.testing.assert_close(whole[..., 2 : 2 + n], scores, atol=0, rtol=0)
        assert (whole[..., :2] == -1).all() and (whole[..., 2 + n :] == -1).all()  # nothing outside the slots
        whole[..., 2 : 2 + n] = weights
        torch.testing.assert_close(native.weighted_values(layer._packed("values"), whole[..., 2 : 2 + n]),
                                   weights @ values, atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="evenly spaced"):
            native.key_scores(layer._packed("keys"), query, *layer._kernel_cos_sin(), out=whole.transpose(2, 3)[..., :n])
        # blocks longer than the kernel's tile of scores write each score straight into its row: the same scores
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(native, "_BLOCK", 100)
            torch.testing.assert_close(native.key_scores(layer._packed("keys"), query, *layer._kernel_cos_sin()),
                                       scores, atol=0, rtol=0)
        layer.step_memo.clear()


@needs_compiler
@pytest.mark.parametrize("kv_heads", [3, 2])  # 3: the base library's instance (SmolLM2); 2: one built for the layout
def test_the_layouts_kernel_instance_scores_and_aggregates_as_the_loops_do(kv_heads, monkeypatch):
    """The key-score and value kernels have an instance with a code layout's sizes as constants (decode_kernel.c's
    CSR_INSTANCE): the base library's is the embedded defaults' layout on SmolLM2 (3 KV heads, 4 atoms each, 11-bit
    indices, 4 refinement atoms, e3m1), other layouts get a library built for them (`native._library_for`). Its
    scores and aggregated values against q·k and Σ w v over the torch path's read-back of the coded slots."""
    lm = tiny_llama(n_layers=2, heads=3 * kv_heads, kv_heads=kv_heads, head_dim=64)
    rng = np.random.default_rng(3)
    unit = lambda n: (a := rng.standard_normal((n, 64)).astype(np.float32)) / np.linalg.norm(a, axis=1, keepdims=True)
    kind = lambda: KindDictionaries(1, 4, [0, 0], [unit(96)],
                                    center=rng.standard_normal((2, kv_heads, 64)).astype(np.float32))
    dictionary = DictionaryFile(model_fingerprint(lm, "tiny"), kind(), kind())
    cache = _left_padded_cache(lm, dictionary, sparsity=4, refine_fraction=0.3, refine_atoms=4, index_bits=11,
                               coef_format="e3m1", sink_tokens=2, coding_batch=4)
    monkeypatch.setenv("CSR_NATIVE", "0")  # the reference: the torch path's read-back
    reference = [layer.read_back() for layer in cache.layers]
    monkeypatch.delenv("CSR_NATIVE")
    g = torch.Generator().manual_seed(5)
    for layer, (keys, values) in zip(cache.layers, reference):
        packed = layer._packed("keys")
        assert packed.refine_codes is not None and packed.refine_codes.shape[1] > 0  # the refinement path runs
        library = native._library_for(packed)
        assert native.instance_layout(library) == (kv_heads, 4, 11, 4)  # the instance these codes take
        assert (library is native._library) == (kv_heads == 3)
        start, n = layer._sink_len(), layer.n_coded
        keys, values = keys[:, :, start : start + n], values[:, :, start : start + n]
        query = torch.randn(2, kv_heads, 3, 64, generator=g)
        torch.testing.assert_close(native.key_scores(packed, query, *layer._kernel_cos_sin()),
                                   query @ keys.transpose(-1, -2), atol=1e-4, rtol=1e-4)
        weights = torch.rand(2, kv_heads, 3, n, generator=g)
        torch.testing.assert_close(native.weighted_values(layer._packed("values"), weights), weights @ values,
                                   atol=1e-4, rtol=1e-4)
    monkeypatch.setenv("CSR_KERNEL_INSTANCES", "0")  # no library built for a layout: the base one takes it
    assert native._library_for(cache.layers[0]._packed("keys")) is native._library


@needs_compiler
def test_a_layout_whose_instance_cannot_be_built_takes_the_base_kernels(monkeypatch):
    """Where the build of a layout's instance fails (`_build` returns None after its warning), the base library
    serves that layout, and the failed build is not retried on every call."""
    assert native.available()
    builds = []
    monkeypatch.setattr(native, "_build", lambda instance=None: builds.append(instance))
    monkeypatch.setattr(native, "_instances", {})
    packed = SimpleNamespace(layout=CodeLayout(groups=5, k=4, index_bits=11, coef_format="e3m1"),
                             refine_layout=CodeLayout(groups=1, k=4, index_bits=11, coef_format="e3m1"))
    assert native._library_for(packed) is native._library and native._library_for(packed) is native._library
    assert builds == [(5, 4, 11, 4)]  # asked once
    toy = SimpleNamespace(layout=CodeLayout(groups=5, k=4, index_bits=7, coef_format="e3m1"), refine_layout=None)
    fp8 = SimpleNamespace(layout=CodeLayout(groups=5, k=4, index_bits=11, coef_format="fp8"), refine_layout=None)
    assert native._library_for(toy) is native._library and native._library_for(fp8) is native._library
    assert builds == [(5, 4, 11, 4)]  # a toy dictionary or another coefficient format gets no instance


@needs_compiler
def test_rows_with_the_same_positions_share_one_row_of_cos_sin(monkeypatch):
    lm = tiny_llama(n_layers=2, kv_heads=2, head_dim=64)
    cache = _left_padded_cache(lm, _dictionary(lm, 64), padding=0, window=3, coding_batch=4)
    assert cache.layers[0]._kernel_cos_sin()[0].shape[0] == 1  # one row for both
    cache.layers[0].step_memo.clear()
    fast, reference = _read_back_both_ways(cache, monkeypatch)
    for (keys, values), (ref_keys, ref_values) in zip(fast, reference):
        torch.testing.assert_close(keys, ref_keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)


@needs_compiler
def test_generation_with_the_kernel_equals_the_torch_path(monkeypatch):
    lm = tiny_llama(n_layers=2, kv_heads=2, head_dim=64)
    dictionary = _dictionary(lm, 64)
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    run = lambda: lm.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                              cache=CSRCache(lm, dictionary, window=2, coding_batch=2))
    with torch.no_grad():
        fast = run()
        monkeypatch.setenv("CSR_NATIVE", "0")
        reference = run()
    assert torch.equal(fast, reference)


@needs_compiler
def test_codes_past_the_table_are_refused():
    from csr_core.code_layout import CodeLayout
    from csr_runtime.code_packing import pack_codes

    layout = CodeLayout(groups=1, k=2, index_bits=8, coef_format="fp8")
    codes = pack_codes(torch.tensor([[[3, 200]]]), torch.ones(1, 1, 2), layout).view(1, 1, -1)
    table = torch.nn.functional.normalize(torch.randn(10, 16), dim=-1)
    out = torch.empty(1, 1, 1, 16)
    with pytest.raises(ValueError, match="past the 10 atoms"):
        native.decode_into(out, native.PackedCodes(codes, layout, torch.ones(1), table))
    with pytest.raises(ValueError, match="past the 10 atoms"):
        native.weighted_values(native.PackedCodes(codes, layout, torch.ones(1), table), torch.ones(1, 1, 1, 1))
    good = pack_codes(torch.tensor([[[3, 7]]]), torch.tensor([[[0.5, -0.25]]]), layout).view(1, 1, -1)
    assert native.decode_into(out, native.PackedCodes(good, layout, torch.ones(1), table))
    torch.testing.assert_close(out[0, 0, 0], 0.5 * table[3] - 0.25 * table[7])


def test_without_a_compiler_the_runtime_warns_and_takes_the_torch_path(monkeypatch):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(UserWarning, match="no C compiler"):
        assert not native.available()
    lm = tiny_llama(n_layers=2, kv_heads=2, head_dim=16)
    cache = _left_padded_cache(lm, _dictionary(lm, 16), steps=3, window=2, coding_batch=2)
    assert cache.layers[0].read_back()[0].isfinite().all()
    monkeypatch.setattr(native, "_library", None)  # the next test builds (or loads) it again



class _UnevenRoPE(torch.nn.Module):
    """The model's cos/sin with the second half scaled: halves that differ, as no transformers RoPE has today."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, position_ids):
        cos, sin = self.inner(x, position_ids)
        scale = torch.ones(cos.shape[-1])
        scale[cos.shape[-1] // 2 :] = 0.9
        return cos * scale, sin * scale


@needs_compiler
def test_kernel_rotates_with_full_width_cos_sin_where_the_halves_differ(monkeypatch):
    lm = tiny_llama(n_layers=2, kv_heads=2, head_dim=16)
    cache = _left_padded_cache(lm, _dictionary(lm, 16), steps=4, window=2, coding_batch=2)
    assert cache.layers[0].rope_repeats_halves  # found at the first decode step (the others share its cos/sin)
    for layer in cache.layers:
        layer.rotary_emb, layer.rope_repeats_halves = _UnevenRoPE(layer.rotary_emb), None
    fast, reference = _read_back_both_ways(cache, monkeypatch)
    assert cache.layers[0].rope_repeats_halves is False
    for (keys, _), (ref_keys, _) in zip(fast, reference):
        torch.testing.assert_close(keys, ref_keys, atol=1e-5, rtol=1e-5)


def test_attention_kernels_refuse_codes_they_cannot_read(monkeypatch):
    from csr_core.code_layout import CodeLayout
    from csr_runtime.code_packing import pack_codes

    layout = CodeLayout(groups=1, k=2, index_bits=8, coef_format="fp8")
    codes = pack_codes(torch.tensor([[[3, 7]]]), torch.ones(1, 1, 2), layout).view(1, 1, -1)
    packed = native.PackedCodes(codes, layout, torch.ones(1), torch.nn.functional.normalize(torch.randn(10, 16), dim=-1))
    monkeypatch.setenv("CSR_NATIVE", "0")  # as on a machine without a compiler
    assert not native.applies(packed)
    with pytest.raises(ValueError, match="take the PyTorch path"):
        native.key_scores(packed, torch.ones(1, 1, 1, 16), None, None)
    with pytest.raises(ValueError, match="take the PyTorch path"):
        native.weighted_values(packed, torch.ones(1, 1, 1, 1))
    with pytest.raises(ValueError, match="e3m1 only"):
        from csr_runtime.code_packing import CoefficientRounding
        native.mp_gram(torch.zeros(2, 10), torch.eye(10), 2, CoefficientRounding("fp8", 1.0))


def test_a_workspace_is_reused_per_name_and_shape_only_without_autograd():
    with torch.no_grad():
        first = native.workspace("test", (2, 3))
        assert native.workspace("test", (2, 3)) is first  # the next call of the same shape gets the same memory
        assert native.workspace("test", (3, 2)) is not first and native.workspace("other", (3, 2)) is not first
    assert native.workspace("test", (3, 2)) is not native.workspace("test", (3, 2))  # autograd may keep a tensor


@needs_compiler
@pytest.mark.parametrize("groups, k, index_bits", [(3, 4, 11), (1, 4, 11), (6, 2, 16), (2, 3, 7)])
def test_e3m1_packing_kernel_writes_the_torch_paths_bytes(groups, k, index_bits):
    """`native.pack_e3m1` (a coding call's codes packed in one kernel call) gives `pack_codes`' bytes: per-code and
    single scales, negative, zero and tied coefficients (exactly on an e3m1 midpoint), fields straddling bytes."""
    from csr_runtime.code_packing import e3m1_levels, pack_codes

    assert native.available()  # builds the kernels (the caller's check, as the cache makes it)
    layout = CodeLayout(groups=groups, k=k, index_bits=index_bits, coef_format="e3m1")
    g = torch.Generator().manual_seed(groups * 100 + k)
    n = 37
    idx = torch.randint(0, 2**index_bits, (n, groups, k), generator=g)
    coef = torch.randn(n, groups, k, generator=g) * 3
    scale = torch.rand(n, 1, 1, generator=g) + 0.25
    _, midpoints = e3m1_levels()
    coef[0, 0, 0], coef[1, 0, 0], coef[2, 0, 0] = 0.0, -midpoints[3] * scale[1, 0, 0], midpoints[5] * scale[2, 0, 0]
    for s in (scale, 0.5):
        got = native.pack_e3m1(idx, coef, layout, s)
        assert torch.equal(got, pack_codes(idx, coef, layout, scale=s))
    idx[3, 0, 0] = 2**index_bits
    with pytest.raises(ValueError, match=f"does not fit in index_bits = {index_bits}"):
        native.pack_e3m1(idx, coef, layout, scale)
    assert native.pack_e3m1(idx, coef, CodeLayout(groups=groups, k=k, index_bits=16, coef_format="fp8"), scale) is None
