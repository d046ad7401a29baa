import numpy as np
import pytest
import torch
from transformers import DynamicCache

from csr_runtime.cache import CSRCache
from csr_runtime.dictionary_file import DictionaryFile, KindDictionaries, ModelFingerprint
from neuraldict.models import model_fingerprint
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


@pytest.mark.parametrize("window", [0, 5])
def test_complete_orthonormal_dictionary_reproduces_dynamic_cache(window):
    lm = tiny_llama(n_layers=2, heads=4, kv_heads=2)  # GQA
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    cache = CSRCache(lm, complete_dictionary(lm), online_atoms=0, guard_atoms=0, window=window)
    reference = DynamicCache()
    with torch.no_grad():
        for part in (ids[:, :12], ids[:, 12:20], ids[:, 20:21], ids[:, 21:]):  # prefill, a chunk, single steps
            expected = lm(part, past_key_values=reference).logits
            got = lm(part, past_key_values=cache).logits
            torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)  # fp16 coefficients
    assert cache.get_seq_length() == 24 and cache.layers[0].n_coded == 24 - window


def test_generate_with_csr_cache_matches_dynamic_cache_when_exact():
    lm = tiny_llama(n_layers=2)
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    expected = lm.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = lm.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                      past_key_values=CSRCache(lm, complete_dictionary(lm), online_atoms=0, guard_atoms=0))
    assert torch.equal(got, expected)


def test_memory_bytes_counts_every_held_tensor_and_matches_the_formula():
    lm = tiny_llama(n_layers=2, kv_heads=2)
    cache = CSRCache(lm, random_dictionary(lm), sparsity_keys=4, sparsity_values=2, online_atoms=6, guard_atoms=0, window=3)
    B, T = 2, 17
    with torch.no_grad():
        lm(torch.randint(0, 128, (B, T)), past_key_values=cache)
    held = sum(t.nbytes for layer in cache.layers for t in layer.held_tensors())
    assert cache.memory_bytes() == held
    H, coded = 2, T - 3
    codes = B * H * coded * (4 + 2 * 2) * (2 + 2)  # int16 index + fp16 coefficient per pair
    online = B * 6 * (16 + 8) * 2  # fp16 atoms, keys (w=16) and values (w=8)
    window = 2 * B * H * 3 * 16 * 4  # fp32 K and V
    per_layer = codes + online + window + B * 8  # + n_pad (int64 per row)
    assert cache.memory_bytes() == 2 * per_layer
    assert cache.memory_bytes(include_offline=True) == cache.memory_bytes() + (64 * 16 + 64 * 8) * 4


def test_bits_per_channel_of_codes_alone_is_32_s_sn_over_dh():
    lm = tiny_llama(n_layers=2, kv_heads=2)
    cache = CSRCache(lm, random_dictionary(lm), sparsity=4, online_atoms=0, guard_atoms=0)  # CSR-4: K s=4, V 2×2
    assert (cache.settings.sparsity_keys, cache.settings.sparsity_values) == (4, 2)
    with torch.no_grad():
        lm(torch.randint(0, 128, (1, 300)), past_key_values=cache)
    assert cache.nominal_bits_per_channel() == 32 * 4 / 16
    assert abs(cache.bits_per_channel() / cache.nominal_bits_per_channel() - 1) < 0.02


def test_left_padded_batch_matches_unpadded_single_runs():
    lm = tiny_llama(n_layers=2)
    g = torch.Generator().manual_seed(2)
    long, short = torch.randint(1, 128, (1, 14), generator=g), torch.randint(1, 128, (1, 9), generator=g)
    # 40 online atoms > the short prompt's 9 tokens × 2 heads: padding would be sampled if it were not excluded
    settings = dict(sparsity_keys=3, sparsity_values=2, online_atoms=40, guard_atoms=4, guard_threshold=0.2)
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


def test_index_range_is_respected_and_reported():
    lm = tiny_llama(n_layers=1)
    fp = model_fingerprint(lm, "tiny")
    big = DictionaryFile(fp, KindDictionaries(1, 2, [0], [random_atoms(32760, 16, 0)]),
                         KindDictionaries(2, 1, [0], [random_atoms(64, 8, 1)]))
    cache = CSRCache(lm, big, online_atoms=50, guard_atoms=0)
    with torch.no_grad():
        lm(torch.randint(0, 128, (1, 40)), past_key_values=cache)
    store = cache.layers[0].stores["keys"]
    assert store.offline.shape[0] + store.n_extra[0] == 32767
    assert cache.stats()["atoms_refused"] == 50 - 7
    assert int(store.idx.max()) <= 32766


def test_bad_inputs():
    lm = tiny_llama(n_layers=2)
    other = DictionaryFile(ModelFingerprint("other", 2, 2, 64, 10000.0),
                           KindDictionaries(1, 2, [0, 0], [random_atoms(8, 64, 0)]),
                           KindDictionaries(2, 1, [0, 0], [random_atoms(8, 32, 0)]))
    with pytest.raises(ValueError, match="head_dim: dictionary has 64, model has 16"):
        CSRCache(lm, other)
    with pytest.raises(ValueError, match="coef_bits has to be one of"):
        CSRCache(lm, random_dictionary(lm), coef_bits=4)
    with pytest.raises(ValueError, match="multiple of 2"):
        CSRCache(lm, random_dictionary(lm), sparsity=3)
    cache = CSRCache(lm, random_dictionary(lm))
    k = torch.randn(1, 2, 4, 16)
    k[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="layer 0: non-finite keys or values"):
        cache.layers[0].update(k, torch.randn(1, 2, 4, 16))


def test_eight_bit_coefficients_halve_the_coefficient_bytes():
    lm = tiny_llama(n_layers=2)
    ids = torch.randint(0, 128, (1, 64))
    sizes = {}
    for bits in (16, 8):
        cache = CSRCache(lm, random_dictionary(lm), sparsity=4, online_atoms=0, guard_atoms=0, coef_bits=bits)
        with torch.no_grad():
            lm(ids, past_key_values=cache)
        sizes[bits] = cache.memory_bytes()
        assert cache.layers[0].stores["keys"].coef.element_size() == bits // 8
    assert sizes[8] == sizes[16] * 3 // 4 + 2 * 8 // 4  # codes: 4 → 3 bytes per pair (n_pad unchanged)


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
    cache = CSRCache(lm, smollm2_kmeans_dictionary, sparsity=8, online_atoms=0, guard_atoms=0)  # offline atoms only
    out = lm.generate(**ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert cache.layers[0].n_coded == ids["input_ids"].shape[1] + 3  # every token but the last is held as codes
    assert 4.0 <= cache.bits_per_channel() < 4.2  # CSR-8 with d_h = 64: 32·8/64 = 4 bits


def test_layers_left_out_of_coded_layers_stay_exact_and_are_counted():
    lm = tiny_llama(n_layers=3, kv_heads=2)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    cache = CSRCache(lm, random_dictionary(lm, n_layers=3), sparsity=4, online_atoms=0, guard_atoms=0, coded_layers=[1])
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
    cache = CSRCache(lm, complete_dictionary(lm), online_atoms=0, guard_atoms=0, window=4)
    reference = DynamicCache()
    with torch.no_grad():
        lm(ids[:, :20], past_key_values=cache)
        lm(ids[:, :20], past_key_values=reference)
        cache.crop(-remove)
        reference.crop(-remove)
        assert cache.get_seq_length() == reference.get_seq_length() == 20 - remove
        assert cache.layers[0].n_coded == min(16, 20 - remove)
        tail = ids[:, 20 - remove : 24 - remove]  # the next tokens after the cropped sequence
        torch.testing.assert_close(lm(tail, past_key_values=cache).logits, lm(tail, past_key_values=reference).logits,
                                   atol=2e-3, rtol=0)
    assert cache.memory_bytes() == sum(t.nbytes for layer in cache.layers for t in layer.held_tensors())
