"""Refinement: the worst-coded vectors of each coding call get `refine_atoms` more atoms (torch runtime)."""

import math

import pytest
import torch
from transformers import DynamicCache

from csr_runtime.cache import CSRCache
from tests.conftest import tiny_llama
from tests.test_cache import PACKED_FP16, complete_dictionary, random_dictionary

B, T, H = 2, 20, 2  # rows, prompt tokens, KV heads of the tiny model


def _prefill(lm, cache, ids):
    with torch.no_grad():
        lm(ids, past_key_values=cache)
    return cache


def _error(read, exact):
    """Squared error per (row, head, token) vector: rotation by RoPE keeps norms, so it is the coding-space error."""
    return (read - exact).square().sum(-1)


@pytest.mark.parametrize("coef_format", ["e3m1", "fp16"])
def test_refined_vectors_are_the_worst_coded_and_decode_as_their_longer_mp_codes(coef_format):
    lm = tiny_llama(n_layers=2, kv_heads=H)
    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(3))
    dictionary = random_dictionary(lm)
    options = dict(sink_tokens=0, coding_batch=1, coef_format=coef_format)
    refined = _prefill(lm, CSRCache(lm, dictionary, sparsity_keys=2, sparsity_values=2, refine_fraction=0.25,
                                    refine_atoms=2, **options), ids)
    plain = _prefill(lm, CSRCache(lm, dictionary, sparsity_keys=2, sparsity_values=2, refine_fraction=0, **options), ids)
    longer = _prefill(lm, CSRCache(lm, dictionary, sparsity_keys=4, sparsity_values=2, refine_fraction=0, **options), ids)
    reference = _prefill(lm, DynamicCache(), ids)
    keys, plain_keys, longer_keys = (c.layers[1].read_back()[0] for c in (refined, plain, longer))
    exact = reference.layers[1].keys
    # MP is greedy: continuing it for 2 atoms on a refined vector gives the vector's 4-atom code
    is_refined = (keys - plain_keys).abs().amax(-1) > 0  # (B, H, T)
    torch.testing.assert_close(keys[is_refined], longer_keys[is_refined], atol=1e-6, rtol=0)
    assert torch.equal(keys[~is_refined], plain_keys[~is_refined])
    # a quarter of each row's vectors (one prefill: one coding call), the ones MP coded worst
    assert is_refined.sum((1, 2)).tolist() == [round(0.25 * H * T)] * B
    error = _error(plain_keys, exact)
    for b in range(B):
        assert error[b][is_refined[b]].min() >= error[b][~is_refined[b]].max()
    assert _error(keys, exact).sum() < error.sum()
    per_row = round(0.25 * H * T) + round(0.25 * H * 2 * T)  # keys, values (2 chunks a head)
    assert refined.stats()["vectors_refined"] == 2 * B * per_row  # 2 layers


def test_memory_bytes_count_the_refinement_bits_and_codes():
    lm = tiny_llama(n_layers=2, kv_heads=H)
    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(4))
    dictionary = random_dictionary(lm)  # 64 atoms: 6-bit indices
    options = dict(sparsity_keys=2, sparsity_values=1, sink_tokens=0, coding_batch=8, coef_format="fp8")
    refined = _prefill(lm, CSRCache(lm, dictionary, refine_fraction=0.3, refine_atoms=3, **options), ids)
    plain = _prefill(lm, CSRCache(lm, dictionary, refine_fraction=0, **options), ids)
    one_code = math.ceil(3 * 6 / 8) + 3  # 3 packed 6-bit indices, 3 fp8 coefficients
    extra = 0
    for vectors in (H * T, H * 2 * T):  # keys: H per token; values: H × 2 chunks per token
        extra += B * (math.ceil(vectors / 8) + round(0.3 * vectors) * one_code)  # a bit per vector + the codes
    assert refined.memory_bytes() - plain.memory_bytes() == 2 * extra  # two layers
    assert refined.memory_bytes() == sum(t.nbytes for layer in refined.layers for t in layer.held_tensors())


def test_complete_dictionary_with_refinement_still_reproduces_dynamic_cache():
    lm = tiny_llama(n_layers=2, kv_heads=H)
    ids = torch.randint(0, 128, (B, 24), generator=torch.Generator().manual_seed(0))
    cache = CSRCache(lm, complete_dictionary(lm), refine_fraction=0.5, coding_batch=1, **PACKED_FP16)
    reference = DynamicCache()
    with torch.no_grad():
        for part in (ids[:, :12], ids[:, 12:20], ids[:, 20:21], ids[:, 21:]):
            torch.testing.assert_close(lm(part, past_key_values=cache).logits,
                                       lm(part, past_key_values=reference).logits, atol=2e-3, rtol=0)
    assert cache.stats()["vectors_refined"] > 0


def test_crop_and_row_selection_keep_each_vectors_refinement():
    lm = tiny_llama(n_layers=2, kv_heads=H)
    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(7))
    dictionary = random_dictionary(lm)
    options = dict(sparsity=2, refine_fraction=0.4, sink_tokens=2, coding_batch=1)
    cache = CSRCache(lm, dictionary, **options)
    with torch.no_grad():
        lm(ids[:, :12], past_key_values=cache)
        for t in range(12, T):  # decode steps: every step's vectors get their own refinement
            lm(ids[:, t : t + 1], past_key_values=cache, position_ids=torch.full((B, 1), t))
    full_keys, full_values = cache.layers[0].read_back()
    swapped = CSRCache(lm, dictionary, **options)
    _prefill(lm, swapped, ids)
    swapped.batch_select_indices(torch.tensor([1, 0]))
    # the prefill and the decode steps code different batches of vectors, so the refinements differ:
    # compare the swap with a cache built the same way
    same = CSRCache(lm, dictionary, **options)
    _prefill(lm, same, ids)
    keys, values = same.layers[0].read_back()
    swapped_keys, swapped_values = swapped.layers[0].read_back()
    assert torch.equal(swapped_keys, keys.flip(0)) and torch.equal(swapped_values, values.flip(0))
    cache.crop(15)
    cropped_keys, cropped_values = cache.layers[0].read_back()
    assert torch.equal(cropped_keys, full_keys[:, :, :15]) and torch.equal(cropped_values, full_values[:, :, :15])
    assert cache.memory_bytes() == sum(t.nbytes for layer in cache.layers for t in layer.held_tensors())


@pytest.mark.parametrize("option,value", [("refine_fraction", 1.5), ("refine_fraction", -0.1), ("refine_atoms", 0),
                                          ("refine_atoms", 1.5)])
def test_bad_refinement_options_are_named(option, value):
    lm = tiny_llama(n_layers=2, kv_heads=H)
    with pytest.raises(ValueError, match=option):
        CSRCache(lm, random_dictionary(lm), sparsity=2, **{option: value})


def test_values_aggregated_as_codes_include_the_refinement():
    from tests.test_attention import dense_and_codes

    lm = tiny_llama(n_layers=2, heads=4, kv_heads=H, head_dim=16)
    ids = torch.randint(1, 128, (B, 30), generator=torch.Generator().manual_seed(2))
    make = lambda: CSRCache(lm, random_dictionary(lm), sparsity=2, refine_fraction=0.3, refine_atoms=2, coding_batch=1)
    dense, codes = dense_and_codes(lm, ids, make, prefill=16)
    torch.testing.assert_close(codes, dense, atol=1e-5, rtol=0)
    plain_dense, _ = dense_and_codes(lm, ids, lambda: CSRCache(lm, random_dictionary(lm), sparsity=2, coding_batch=1,
                                                               refine_fraction=0), 16)
    assert not torch.allclose(plain_dense, dense, atol=1e-3)  # the refinement reached the logits


def test_a_code_budget_covers_the_refinement(tmp_path):
    import numpy as np

    from csr_core.dictionary_file import save_dictionary

    lm = tiny_llama(n_layers=2, kv_heads=H)
    d = random_dictionary(lm)
    k = np.arange(13)
    d.keys.error_curve = np.stack([1.0 / (1 + 0.1 * k), 1.0 / (1 + 1.0 * k)])
    d.values.error_curve = np.stack([1.0 / (1 + 2.0 * k), 1.0 / (1 + 0.5 * k)])
    path = save_dictionary(tmp_path / "d.safetensors", d)
    options = dict(code_bits_per_channel=3.0, sink_tokens=0, coding_batch=1, coef_format="fp8")
    plain = CSRCache(lm, path, refine_fraction=0, **options)
    refined = CSRCache(lm, path, refine_fraction=0.25, refine_atoms=2, **options)
    # 64 atoms: 6-bit indices + 8-bit fp8 = 14 bits an atom. Per vector: a flag bit + 0.25 · 2 atoms; keys are
    # chunks of 16 channels, values of 8: (1 + 7) / 16 and (1 + 7) / 8 bits a channel, 0.75 on average
    s = refined.settings
    spent = sum(2 * 14 * k for k in s.sparsity_keys) + sum(2 * 2 * 14 * k for k in s.sparsity_values)
    assert spent <= (3.0 - 0.75) * 2 * 2 * 2 * 16 < spent + 2 * 2 * 14 + 1
    assert sum(s.sparsity_keys + s.sparsity_values) < sum(plain.settings.sparsity_keys + plain.settings.sparsity_values)
    _prefill(lm, refined, torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(1)))
    assert refined.bits_per_channel() <= 3.0 + 8 * 2 / (2 * 16)  # + at most a padding byte per code
    # the nominal rate counts the refinement's expected bits: 0.25 · 400 vectors of each kind and head are refined
    assert abs(refined.bits_per_channel() / refined.nominal_bits_per_channel() - 1) < 0.01
    with pytest.raises(ValueError, match="does not cover the refinement"):
        CSRCache(lm, path, code_bits_per_channel=0.5, refine_fraction=0.25, refine_atoms=2)


@pytest.mark.parametrize("extra_atoms", [0, 8])  # 0: rows share the atoms, coded in one call; 8: each row alone
def test_each_row_of_a_batch_gets_the_codes_it_gets_alone(extra_atoms):
    lm = tiny_llama(n_layers=2, kv_heads=H)
    ids = torch.randint(0, 128, (3, T), generator=torch.Generator().manual_seed(7))
    dictionary = random_dictionary(lm)
    options = dict(sparsity_keys=2, sparsity_values=2, refine_fraction=0.25, refine_atoms=2, coding_batch=4,
                   online_atoms=extra_atoms, coef_format="fp16")  # fp16: one coefficient scale for every row
    batch = _prefill(lm, CSRCache(lm, dictionary, **options), ids)
    if extra_atoms == 0:
        assert all(layer.stores["keys"].codebook.rows_share_atoms() for layer in batch.layers)
    for b in range(3):
        alone = _prefill(lm, CSRCache(lm, dictionary, **options), ids[b : b + 1])
        for layer, single in zip(batch.layers, alone.layers):
            for kind in ("keys", "values"):
                ours, theirs = layer.stores[kind], single.stores[kind]
                assert torch.equal(ours.codes[b], theirs.codes[0])
                assert torch.equal(ours.refine_mask[b], theirs.refine_mask[0])
                assert torch.equal(ours.refine_codes[b], theirs.refine_codes[0])
