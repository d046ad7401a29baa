import csv
import math

import torch
from transformers import DynamicCache

from csr_core.dictionary_file import save_dictionary
from csr_core.models import load_model
from csr_core.scoring import cache_bytes, chunked_log_probs
from csr_eval.evaluate import evaluate, make_cache
from tests.conftest import tiny_llama
from tests.test_cache import complete_dictionary


def test_chunked_scoring_of_the_full_cache_equals_one_teacher_forced_pass(tiny_model_dir):
    lm, _ = load_model(str(tiny_model_dir))
    ids = torch.randint(0, 49152, (1, 50), generator=torch.Generator().manual_seed(0))
    logp = chunked_log_probs(lm, ids, DynamicCache(), prefix=20, chunk=7)
    with torch.no_grad():
        full = lm(ids).logits[0].float().log_softmax(-1)
    torch.testing.assert_close(logp, full[19:49], atol=1e-4, rtol=1e-4)


def test_evaluate_writes_the_table_and_exact_methods_have_zero_kl(tiny_model_dir, tmp_path):
    lm, _ = load_model(str(tiny_model_dir))
    dictionary = save_dictionary(tmp_path / "complete.safetensors", complete_dictionary(lm, n_layers=3))
    methods = [{"name": "fp32", "type": "fp"},
               {"name": "CSR complete", "type": "csr", "sparsity_keys": 16, "sparsity_values": 8,
                "online_atoms": 0, "guard_atoms": 0, "coef_format": "fp16"},
               {"name": "KIVI-2", "type": "kivi", "bits": 2, "residual_length": 32, "group_size": 16},
               {"name": "quanto-4", "type": "quanto", "nbits": 4, "residual_length": 32, "q_group_size": 16}]
    rows = evaluate(model=str(tiny_model_dir), dictionary=str(dictionary), methods=methods, context_lengths=[64, 96],
                    sequences_per_length=1, chunk=8, passkey_lengths=[64], passkey_depths=[0.5], generation_tokens=4,
                    output=str(tmp_path / "report"))
    by = {r["method"]: r for r in rows}
    assert by["fp32"]["kl"] == 0 and by["fp32"]["top1"] == 1
    assert by["CSR complete"]["kl"] < 1e-5 and abs(by["CSR complete"]["ppl@96"] / by["fp32"]["ppl@96"] - 1) < 1e-3
    assert by["KIVI-2"]["kl"] > by["CSR complete"]["kl"]
    assert math.isclose(by["fp32"]["bits_per_channel"], 32.0)  # fp32 DynamicCache
    with open(tmp_path / "report" / "eval.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["fp32", "CSR complete", "KIVI-2", "quanto-4"]
    assert 0 < by["quanto-4"]["kl"] and 8 <= by["quanto-4"]["bits_per_channel"] < 32  # transformers' QuantizedCache
    for name in ("eval.md", "memory_vs_length.png", "ppl_vs_bits.png", "memory_trace.csv"):
        assert (tmp_path / "report" / name).is_file()


def test_quanto_cache_bytes_count_packed_codes_scales_and_the_residual():
    lm = tiny_llama(n_layers=2, kv_heads=2)  # head_dim 16
    cache = make_cache({"name": "q", "type": "quanto", "nbits": 4, "q_group_size": 16, "residual_length": 32}, lm, None)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lm(ids[:, :150], past_key_values=cache)
        for t in range(150, 200, 10):
            lm(ids[:, t : t + 10], past_key_values=cache)
    quantised, residual = cache.layers[0]._quantized_keys.shape[-2], cache.layers[0].keys.shape[-2]
    assert quantised + residual == 200 and quantised > 0
    H, d = 2, 16
    per_kind = quantised * H * d * (4 + 2 * 32 / 16) / 8 + residual * H * d * 4  # 4-bit codes + fp32 scale, shift per 16
    assert cache_bytes(cache) == 2 * 2 * per_kind
