import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from csr_core.dictionary_file import DictionaryFile, KindDictionaries, ModelFingerprint
from csr_core.models import model_fingerprint
from csr_runtime.cache import CSRCache
from tests.conftest import tiny_llama


def orthonormal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T.float().numpy()


def random_atoms(n, d, seed):
    a = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def complete_dictionary(lm, n_layers=2):
    fp = model_fingerprint(lm, "tiny")
    keys = KindDictionaries(1, 16, [0] * n_layers, [orthonormal(16, 0)])
    values = KindDictionaries(2, 8, list(range(n_layers)), [orthonormal(8, l + 1) for l in range(n_layers)])
    return DictionaryFile(fp, keys, values)


def random_dictionary(lm, n_atoms=64, n_layers=2):
    fp = model_fingerprint(lm, "tiny")
    return DictionaryFile(fp, KindDictionaries(1, 4, [0] * n_layers, [random_atoms(n_atoms, 16, 0)]),
                          KindDictionaries(2, 2, [0] * n_layers, [random_atoms(n_atoms, 8, 1)]))


PAPER_LAYOUT = dict(index_bits=16, coef_format="fp16")  # int16 indices + fp16 coefficients
PACKED_FP16 = dict(coef_format="fp16")  # indices at the bits they need, exact-enough coefficients


@pytest.mark.parametrize("window,sinks,layout", [(0, 0, PAPER_LAYOUT), (5, 0, PACKED_FP16), (0, 3, PACKED_FP16),
                                                 (5, 2, PAPER_LAYOUT)])
def test_complete_orthonormal_dictionary_reproduces_dynamic_cache(window, sinks, layout):
    lm = tiny_llama(n_layers=2, heads=4, kv_heads=2)  # GQA
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    cache = CSRCache(lm, complete_dictionary(lm), online_atoms=0, guard_atoms=0, window=window, sink_tokens=sinks,
                     coding_batch=1, **layout)
    reference = DynamicCache()
    with torch.no_grad():
        for part in (ids[:, :12], ids[:, 12:20], ids[:, 20:21], ids[:, 21:]):  # prefill, a chunk, single steps
            expected = lm(part, past_key_values=reference).logits
            got = lm(part, past_key_values=cache).logits
            torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)  # fp16 coefficients
    assert cache.get_seq_length() == 24 and cache.layers[0].n_coded == 24 - window - sinks


@pytest.mark.parametrize("window,sinks", [(0, 0), (2, 3)])
def test_new_tokens_wait_exact_for_a_coding_batch_then_get_the_codes_they_would_have_had(window, sinks):
    lm = tiny_llama(n_layers=2, kv_heads=2)
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(5))
    dictionary = random_dictionary(lm)
    batched = CSRCache(lm, dictionary, sparsity=2, window=window, sink_tokens=sinks, coding_batch=8)
    at_once = CSRCache(lm, dictionary, sparsity=2, window=window, sink_tokens=sinks, coding_batch=1)
    exact = CSRCache(lm, complete_dictionary(lm), window=window, sink_tokens=sinks, coding_batch=8, **PACKED_FP16)
    reference = DynamicCache()
    with torch.no_grad():
        prefix = lm(ids[:, :12], past_key_values=reference).logits
        torch.testing.assert_close(lm(ids[:, :12], past_key_values=exact).logits, prefix, atol=2e-3, rtol=0)
        for cache in (batched, at_once):
            lm(ids[:, :12], past_key_values=cache)  # a prefill of >= 8 new tokens is coded whole
        layer = batched.layers[0]
        assert layer.n_coded == at_once.layers[0].n_coded == 12 - window - sinks
        for t in range(12, 30):
            # the same K/V reach both caches' layers: feed both the keys and values of one (exact) forward pass
            step = ids[:, t : t + 1]
            expected = lm(step, past_key_values=reference).logits
            torch.testing.assert_close(lm(step, past_key_values=exact).logits, expected, atol=2e-3, rtol=0)
            waiting = (t + 1 - 12) % 8  # tokens past the window not coded yet
            k, v = reference.layers[0].keys[..., t : t + 1, :], reference.layers[0].values[..., t : t + 1, :]
            positions = {"position_ids": torch.full((2, 1), t)}
            layer.update(k, v, **positions)
            at_once.layers[0].update(k, v, **positions)
            assert layer.n_coded == 12 - window - sinks + (t + 1 - 12 - waiting)
            assert layer.keys.shape[-2] == window + waiting  # exact until the batch is full, and counted
            assert sum(x.nbytes for x in layer.held_tensors()) >= layer.keys.nbytes + layer.values.nbytes
    n = layer.n_coded
    for kind in ("keys", "values"):  # per-vector MP: the batch gets exactly the codes it would have had one by one
        assert torch.equal(layer.stores[kind].codes, at_once.layers[0].stores[kind].codes[:, :n])


def test_generate_with_csr_cache_matches_dynamic_cache_when_exact():
    lm = tiny_llama(n_layers=2)
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    expected = lm.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = lm.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                      past_key_values=CSRCache(lm, complete_dictionary(lm), online_atoms=0, guard_atoms=0, sink_tokens=0,
                                               **PACKED_FP16))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("coef_format,coef_bits,scale_bits", [("fp8", 8, 0), ("int8", 8, 16), ("fp16", 16, 0)])
def test_memory_bytes_counts_every_held_tensor_and_matches_the_packed_formula(coef_format, coef_bits, scale_bits):
    lm = tiny_llama(n_layers=2, kv_heads=2)
    cache = CSRCache(lm, random_dictionary(lm), sparsity_keys=4, sparsity_values=2, online_atoms=6, guard_atoms=0, window=3,
                     sink_tokens=2, coef_format=coef_format, refine_fraction=0)  # refinement's bytes: test_refine.py
    B, T = 2, 17
    with torch.no_grad():
        lm(torch.randint(0, 128, (B, T)), past_key_values=cache)
    held = sum(t.nbytes for layer in cache.layers for t in layer.held_tensors())
    assert cache.memory_bytes() == held
    H, coded, index_bits = 2, T - 3 - 2, 7  # 64 offline + 6 online atoms: ⌈log2 70⌉ = 7 bits an index
    # one token's code: bit-packed indices, then byte-aligned coefficients (+ a 16-bit scale per head chunk for int8)
    key_bytes = math.ceil(H * 4 * index_bits / 8) + H * (4 * coef_bits + scale_bits) // 8  # H heads × 4 atoms
    value_bytes = math.ceil(H * 2 * 2 * index_bits / 8) + H * 2 * (2 * coef_bits + scale_bits) // 8  # × 2 chunks × 2 atoms
    codes = B * coded * (key_bytes + value_bytes)
    online = B * 6 * (16 + 8) * 2  # fp16 atoms, keys (w=16) and values (w=8)
    exact = 2 * B * H * (3 + 2) * 16 * 4  # fp32 K and V of the window and the sinks
    per_layer = codes + online + exact + B * 8 + 2 * B * 4  # + n_pad (int64 per row), each row's float32 scale (K, V)
    assert cache.memory_bytes() == 2 * per_layer
    assert cache.memory_bytes(include_offline=True) == cache.memory_bytes() + (64 * 16 + 64 * 8) * 4


def test_bits_per_channel_of_codes_alone_is_32_s_sn_over_dh():
    lm = tiny_llama(n_layers=2, kv_heads=2)
    cache = CSRCache(lm, random_dictionary(lm), sparsity=4, online_atoms=0, guard_atoms=0, sink_tokens=0, refine_fraction=0,
                     **PAPER_LAYOUT)
    assert (cache.settings.sparsity_keys, cache.settings.sparsity_values) == ([4, 4], [2, 2])
    with torch.no_grad():
        lm(torch.randint(0, 128, (1, 300)), past_key_values=cache)
    assert cache.nominal_bits_per_channel() == 32 * 4 / 16
    assert abs(cache.bits_per_channel() / cache.nominal_bits_per_channel() - 1) < 0.02


def test_left_padded_batch_matches_unpadded_single_runs():
    lm = tiny_llama(n_layers=2)
    g = torch.Generator().manual_seed(2)
    long, short = torch.randint(1, 128, (1, 14), generator=g), torch.randint(1, 128, (1, 9), generator=g)
    # 40 online atoms > the short prompt's 9 tokens × 2 heads: padding would be sampled if it were not excluded
    # sink_tokens=0: in a padded batch the exact first slots cover the longest padding, so shorter-padded rows
    # would keep a few more tokens exact than they do alone
    settings = dict(sparsity_keys=3, sparsity_values=2, online_atoms=40, guard_atoms=4, guard_threshold=0.2, sink_tokens=0)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    batch = lm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                        past_key_values=CSRCache(lm, random_dictionary(lm), **settings), output_logits=True,
                        return_dict_in_generate=True)
    for row, prompt in enumerate((long, short)):
        single = lm.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             past_key_values=CSRCache(lm, random_dictionary(lm), **settings), output_logits=True,
                             return_dict_in_generate=True)
        assert torch.equal(batch.sequences[row, -6:], single.sequences[0, -6:])
        for step in range(6):
            torch.testing.assert_close(batch.logits[step][row], single.logits[step][0], atol=1e-4, rtol=1e-4)


def test_guard_atoms_reproduce_outliers():
    lm = tiny_llama(n_layers=2)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    plain = CSRCache(lm, random_dictionary(lm, n_atoms=8), sparsity_keys=1, sparsity_values=1, online_atoms=0, guard_atoms=0)
    guarded = CSRCache(lm, random_dictionary(lm, n_atoms=8), sparsity_keys=1, sparsity_values=1, online_atoms=0,
                       guard_atoms=1000, guard_threshold=0.05)
    reference = DynamicCache()
    with torch.no_grad():
        lm(ids, past_key_values=reference)
        plain.layers[0].update(*_states(lm, ids, 0))
        guarded.layers[0].update(*_states(lm, ids, 0))
        k_plain, k_guard = plain.layers[0].read_back()[0], guarded.layers[0].read_back()[0]  # what later steps see
    exact = reference.layers[0].keys
    err = lambda k: float(((k - exact) ** 2).sum() / (exact**2).sum())
    assert guarded.stats()["guard_atoms"] > 0
    assert err(k_guard) < 0.05 < err(k_plain)


def _states(lm, ids, layer):
    cache = DynamicCache()
    with torch.no_grad():
        lm(ids, past_key_values=cache)
    return cache.layers[layer].keys, cache.layers[layer].values


def test_index_bits_address_offline_online_and_guard_atoms():
    lm = tiny_llama(n_layers=1)
    fp = model_fingerprint(lm, "tiny")
    d = DictionaryFile(fp, KindDictionaries(1, 2, [0], [random_atoms(100, 16, 0)]),
                       KindDictionaries(2, 1, [0], [random_atoms(64, 8, 1)]))
    cache = CSRCache(lm, d, online_atoms=20, guard_atoms=8, guard_threshold=1e-9)  # 128 / 92 atoms: 7 bits each
    assert cache.layers[0].index_bits == {"keys": 7, "values": 7}
    with torch.no_grad():
        lm(torch.randint(0, 128, (1, 40)), past_key_values=cache)
    store = cache.layers[0].stores["keys"]
    assert store.codebook.offline.shape[0] + store.codebook.n_extra[0] == store.codebook.capacity == 128
    idx, _ = cache.layers[0]._unpacked(store, 2, 1)  # one batch row: its indices are the row's own
    assert 100 <= int(idx.max()) < 128  # extra atoms are used and addressed
    with pytest.raises(ValueError, match="index_bits = 6 cannot address 128 atoms"):
        CSRCache(lm, d, online_atoms=20, guard_atoms=8, index_bits=6)


def test_bad_inputs():
    lm = tiny_llama(n_layers=2)
    other = DictionaryFile(ModelFingerprint("other", 2, 2, 64, 10000.0),
                           KindDictionaries(1, 2, [0, 0], [random_atoms(8, 64, 0)]),
                           KindDictionaries(2, 1, [0, 0], [random_atoms(8, 32, 0)]))
    with pytest.raises(ValueError, match="head_dim: dictionary has 64, model has 16"):
        CSRCache(lm, other)
    with pytest.raises(ValueError, match="coef_format has to be one of"):
        CSRCache(lm, random_dictionary(lm), coef_format="int4")
    with pytest.raises(ValueError, match="sink_tokens must be an int >= 0"):
        CSRCache(lm, random_dictionary(lm), sink_tokens=-1)
    with pytest.raises(ValueError, match="multiple of 2"):
        CSRCache(lm, random_dictionary(lm), sparsity=3)
    cache = CSRCache(lm, random_dictionary(lm))
    k = torch.randn(1, 2, 4, 16)
    k[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="layer 0: non-finite keys or values"):
        cache.layers[0].update(k, torch.randn(1, 2, 4, 16))
    v = torch.randn(1, 2, 4, 16)
    v[0, 0, 1, 5] = float("-inf")
    with pytest.raises(ValueError, match="layer 0: non-finite keys or values"):
        cache.layers[0].update(torch.randn(1, 2, 4, 16), v)
    huge = torch.full((1, 2, 4, 16), 3e38)  # finite, but their sum overflows: still taken
    cache.layers[1].update(huge, huge)


def test_packed_codes_take_fewer_bytes_than_the_papers_layout_and_stay_close():
    lm = tiny_llama(n_layers=2)
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(4))
    sizes, read = {}, {}
    exact = DynamicCache()
    with torch.no_grad():
        lm(ids, past_key_values=exact)
    for name, layout in (("paper", PAPER_LAYOUT), ("fp8", {"coef_format": "fp8"}), ("int8", {"coef_format": "int8"}),
                         ("e3m1", {})):  # e3m1: the default
        cache = CSRCache(lm, random_dictionary(lm), sparsity=4, online_atoms=0, guard_atoms=0, sink_tokens=0,
                         refine_fraction=0, **layout)
        with torch.no_grad():
            lm(ids, past_key_values=cache)
        sizes[name] = cache.memory_bytes() - 2 * 8 - 2 * 2 * 4  # n_pad and the rows' coefficient scales aside
        read[name] = cache.layers[0].read_back()[1]
    # 64 atoms → 6-bit indices: keys 2 heads × 4 × (6 + 8) = 112 bits = 14 bytes a token vs 2 × 4 × 4 = 32
    assert sizes["fp8"] == 2 * 64 * (14 + 14) and sizes["paper"] == 2 * 64 * (32 + 32)
    assert sizes["int8"] == 2 * 64 * (18 + 22)  # + a 16-bit scale per head chunk
    assert sizes["e3m1"] == 2 * 64 * (11 + 11)  # 2 heads × 4 × (6 + 5) bits = 11 bytes, one bit stream
    err = {name: float(((v - exact.layers[0].values) ** 2).sum() / (exact.layers[0].values ** 2).sum()) for name, v in read.items()}
    for name in ("fp8", "int8"):  # 8-bit coefficients cost little next to the sparse approximation itself
        assert err[name] < 1.1 * err["paper"], err
    assert err["e3m1"] < 1.25 * err["paper"], err  # 5 bits: a little more, for 21 % fewer bytes than fp8


def test_window_does_not_pin_older_tensors():
    # memory_bytes() counts views by their own size: the window must not be a view of the whole prefill
    lm = tiny_llama(n_layers=2)
    cache = CSRCache(lm, random_dictionary(lm), online_atoms=0, guard_atoms=0, window=4)
    with torch.no_grad():
        lm(torch.randint(0, 128, (1, 50)), past_key_values=cache)
    for layer in cache.layers:
        assert layer.keys.untyped_storage().nbytes() == layer.keys.nbytes
        assert layer.values.untyped_storage().nbytes() == layer.values.nbytes


@pytest.mark.smollm2
def test_generate_with_csr_cache_on_real_smollm2(smollm2, smollm2_kmeans_dictionary):
    lm, tokenizer = smollm2
    prompt = ("Paris is the capital and largest city of France. Berlin is the capital of Germany. "
              "Madrid is the capital of Spain. The capital of France is")
    ids = tokenizer(prompt, return_tensors="pt")
    cache = CSRCache(lm, smollm2_kmeans_dictionary, sparsity=8, online_atoms=0, guard_atoms=0,  # offline atoms only
                     sink_tokens=0, coding_batch=1, refine_fraction=0, **PAPER_LAYOUT)  # the paper's CSR-8
    out = lm.generate(**ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert cache.layers[0].n_coded == ids["input_ids"].shape[1] + 3  # every token but the last is held as codes
    assert 4.0 <= cache.bits_per_channel() < 4.2  # CSR-8 with d_h = 64: 32·8/64 = 4 bits


def test_layers_left_out_of_coded_layers_stay_exact_and_are_counted():
    lm = tiny_llama(n_layers=3, kv_heads=2)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    cache = CSRCache(lm, random_dictionary(lm, n_layers=3), sparsity=4, online_atoms=0, guard_atoms=0, sink_tokens=0,
                     coded_layers=[1])
    reference = DynamicCache()
    with torch.no_grad():
        lm(ids, past_key_values=cache)
        lm(ids, past_key_values=reference)
    for l in (0, 2):  # full precision, exactly the DynamicCache's tensors
        assert torch.equal(cache.layers[l].keys, reference.layers[l].keys)
        assert torch.equal(cache.layers[l].values, reference.layers[l].values)
    assert cache.layers[1].n_coded == 20
    coded = sum(t.nbytes for t in cache.layers[1].held_tensors())
    exact = sum(reference.layers[l].keys.nbytes + reference.layers[l].values.nbytes for l in (0, 2))
    assert cache.memory_bytes() == coded + exact
    with pytest.raises(ValueError, match="coded_layers"):
        CSRCache(lm, random_dictionary(lm, n_layers=3), sparsity=4, coded_layers=[3])


@pytest.mark.parametrize("remove", [2, 9])  # from the window only; through the window into the codes
def test_crop_matches_dynamic_cache(remove):
    lm = tiny_llama(n_layers=2, kv_heads=2)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(5))
    cache = CSRCache(lm, complete_dictionary(lm), online_atoms=0, guard_atoms=0, window=4, **PACKED_FP16)
    reference = DynamicCache()
    with torch.no_grad():
        lm(ids[:, :20], past_key_values=cache)
        lm(ids[:, :20], past_key_values=reference)
        cache.crop(-remove)
        reference.crop(-remove)
        assert cache.get_seq_length() == reference.get_seq_length() == 20 - remove
        assert cache.layers[0].n_coded == min(16, 20 - remove) - 4  # the 4 sink tokens stay exact
        tail = ids[:, 20 - remove : 24 - remove]  # the next tokens after the cropped sequence
        torch.testing.assert_close(lm(tail, past_key_values=cache).logits, lm(tail, past_key_values=reference).logits,
                                   atol=2e-3, rtol=0)
    assert cache.memory_bytes() == sum(t.nbytes for layer in cache.layers for t in layer.held_tensors())


def test_sink_tokens_are_held_exactly_and_counted():
    lm = tiny_llama(n_layers=2, kv_heads=2)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(6))
    cache = CSRCache(lm, random_dictionary(lm, n_atoms=8), sparsity_keys=1, sparsity_values=1, online_atoms=0,
                     guard_atoms=0, sink_tokens=4)
    reference = DynamicCache()
    with torch.no_grad():
        lm(ids, past_key_values=cache)
        lm(ids, past_key_values=reference)
    keys, values = cache.layers[1].read_back()
    assert torch.equal(keys[:, :, :4], reference.layers[1].keys[:, :, :4])  # the sinks: exact
    assert torch.equal(values[:, :, :4], reference.layers[1].values[:, :, :4])
    assert not torch.allclose(values[:, :, 4:], reference.layers[1].values[:, :, 4:], atol=1e-2)  # the rest: coded
    assert cache.layers[1].n_coded == 16 and cache.get_seq_length() == 20
