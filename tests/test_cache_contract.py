"""The transformers Cache contract beyond greedy decoding: beam search, prompt-lookup (assisted) decoding,
row selection and repetition, reset-then-reuse — for CSRCache and KIVICache."""

import pytest
import torch
from transformers import DynamicCache

from csr_eval.kivi import KIVICache
from csr_runtime.cache import CSRCache
from tests.conftest import tiny_llama
from tests.test_cache import PACKED_FP16, complete_dictionary, random_dictionary

EXACT = dict(online_atoms=0, guard_atoms=0, sink_tokens=0, **PACKED_FP16)


def generate(lm, ids, cache, **options):
    return lm.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, past_key_values=cache, **options)


@pytest.mark.parametrize("options", [dict(num_beams=3), dict(num_beams=3, num_return_sequences=2),
                                     dict(prompt_lookup_num_tokens=3)])
def test_exact_csr_cache_generates_what_dynamic_cache_generates(options):
    lm = tiny_llama(n_layers=2)
    # a repetitive prompt, so prompt lookup proposes candidates and the cache is cropped when they are rejected
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(3)).repeat(1, 3)
    expected = generate(lm, ids, DynamicCache(), **options)
    got = generate(lm, ids, CSRCache(lm, complete_dictionary(lm), **EXACT), **options)
    assert torch.equal(got, expected)


LOSSY = dict(sparsity_keys=2, sparsity_values=1, online_atoms=8, guard_atoms=6, guard_threshold=0.2, sink_tokens=2,
             window=2, coef_format="fp16")


@pytest.mark.parametrize("make", ["csr", "kivi"])
def test_beam_scores_equal_each_beams_own_lossy_decoding(make):
    """Beam search reorders the cache every step. Each returned beam's score (length_penalty 0: the sum of its
    log-probabilities) must equal that sequence decoded alone with a fresh lossy cache: a beam that read
    another beam's codes, atoms or quantised groups would score differently."""
    lm = tiny_llama(n_layers=2, head_dim=32 if make == "kivi" else 16)
    new = (lambda: CSRCache(lm, random_dictionary(lm), **LOSSY)) if make == "csr" else \
        (lambda: KIVICache(2, bits=2, group_size=32, residual_length=0))  # 32 of 40 prompt tokens quantised
    prompt = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    out = lm.generate(prompt, max_new_tokens=6, num_beams=3, num_return_sequences=3, length_penalty=0.0, do_sample=False,
                      pad_token_id=0, eos_token_id=None, past_key_values=new(), output_scores=True,
                      return_dict_in_generate=True)
    assert len({tuple(s.tolist()) for s in out.sequences}) == 3
    for sequence, score in zip(out.sequences, out.sequences_scores):
        cache, total = new(), 0.0
        with torch.no_grad():
            logits = lm(sequence[None, :40], past_key_values=cache).logits[0, -1]
            for t in range(40, sequence.shape[0]):
                total += torch.log_softmax(logits.float(), -1)[sequence[t]].item()
                logits = lm(sequence[None, t : t + 1], past_key_values=cache).logits[0, -1]
        assert total == pytest.approx(score.item(), abs=1e-3)


def fill(cache, lm, ids, steps=3):
    with torch.no_grad():
        lm(ids[:, :-steps], past_key_values=cache)
        for t in range(ids.shape[1] - steps, ids.shape[1]):
            lm(ids[:, t : t + 1], past_key_values=cache)
    return cache


def read_back(cache):
    return [torch.cat(layer.read_back(), dim=-1) for layer in cache.layers]


@pytest.mark.parametrize("operation", ["select", "repeat"])
def test_row_operations_move_codes_and_each_rows_own_atoms(operation):
    """A lossy dictionary with online and guard atoms: rows differ in codes and extra atoms, so a row moved
    without its atoms would decode to something else. Selecting rows, then decoding a step, equals decoding
    the step, then selecting rows."""
    lm = tiny_llama(n_layers=2)
    ids = torch.randint(1, 128, (3, 20), generator=torch.Generator().manual_seed(6))
    settings = LOSSY
    rows = torch.tensor([2, 0, 2]) if operation == "select" else torch.tensor([0, 0, 1, 1, 2, 2])
    apply = (lambda c: c.batch_select_indices(rows)) if operation == "select" else (lambda c: c.batch_repeat_interleave(2))

    first = fill(CSRCache(lm, random_dictionary(lm), **settings), lm, ids[:, :17])
    assert first.stats()["guard_atoms"] > 0
    before = read_back(first)
    apply(first)
    for got, full in zip(read_back(first), before):
        torch.testing.assert_close(got, full[rows])  # the codes of old row r decode with old row r's atoms
    with torch.no_grad():
        lm(ids[rows, 17:20], past_key_values=first)  # coding continues per row

    second = fill(CSRCache(lm, random_dictionary(lm), **settings), lm, ids[:, :17])
    with torch.no_grad():
        lm(ids[:, 17:20], past_key_values=second)
    for got, full in zip(read_back(first), read_back(second)):
        torch.testing.assert_close(got, full[rows], atol=1e-5, rtol=1e-5)


def test_kivi_row_operations_match_rows_of_the_full_batch():
    lm = tiny_llama(n_layers=2, head_dim=32)
    ids = torch.randint(1, 128, (3, 45), generator=torch.Generator().manual_seed(7))
    cache = KIVICache(2, bits=2, group_size=32, residual_length=0)
    with torch.no_grad():
        full = lm(ids[:, :40], past_key_values=cache)
    rows = torch.tensor([1, 1, 0])
    keys_before = cache.layers[0]._dequantized("keys")
    cache.batch_select_indices(rows)
    torch.testing.assert_close(cache.layers[0]._dequantized("keys"), keys_before[rows])
    assert cache.get_seq_length() == 40 and full.logits.shape[0] == 3


@pytest.mark.parametrize("make", ["csr", "kivi"])
def test_reset_then_reuse_is_a_fresh_cache(make):
    lm = tiny_llama(n_layers=2, head_dim=32 if make == "kivi" else 16)
    new = (lambda: CSRCache(lm, random_dictionary(lm), sparsity_keys=2, sparsity_values=1)) if make == "csr" else \
        (lambda: KIVICache(2, bits=2, group_size=32, residual_length=0))
    g = torch.Generator().manual_seed(8)
    first, second = torch.randint(1, 128, (1, 50), generator=g), torch.randint(1, 128, (2, 40), generator=g)
    reused = new()
    generate(lm, first, reused)
    reused.reset()
    assert reused.get_seq_length() == 0
    assert torch.equal(generate(lm, second, reused), generate(lm, second, new()))  # another batch size, too
    assert reused.memory_bytes() == new_memory(new, lm, second)


def new_memory(new, lm, ids):
    cache = new()
    generate(lm, ids, cache)
    return cache.memory_bytes()


def test_kivi_crop_inside_the_residual_works_and_deeper_crops_say_what_to_do():
    lm = tiny_llama(n_layers=2, head_dim=32)
    ids = torch.randint(1, 128, (1, 50), generator=torch.Generator().manual_seed(9))
    cache, reference = KIVICache(2, bits=4, group_size=32, residual_length=0), DynamicCache()
    with torch.no_grad():
        lm(ids[:, :45], past_key_values=cache)  # 32 quantised, 13 in the residual
        lm(ids[:, :45], past_key_values=reference)
    cache.crop(-5)
    reference.crop(-5)
    assert cache.get_seq_length() == reference.get_seq_length() == 40
    with pytest.raises(NotImplementedError, match="residual_length"):
        cache.crop(-10)
