import csv
import math

import torch
from transformers import DynamicCache

from csr_runtime.dictionary_file import save_dictionary
from csr_runtime.evaluate import chunked_log_probs, evaluate
from neuraldict.models import load_model
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
                "online_atoms": 0, "guard_atoms": 0},
               {"name": "KIVI-2", "type": "kivi", "bits": 2, "residual_length": 32, "group_size": 16}]
    rows = evaluate(model=str(tiny_model_dir), dictionary=str(dictionary), methods=methods, context_lengths=[64, 96],
                    sequences_per_length=1, chunk=8, passkey_length=64, passkey_depths=[0.5], generation_tokens=4,
                    output=str(tmp_path / "report"))
    by = {r["method"]: r for r in rows}
    assert by["fp32"]["kl"] == 0 and by["fp32"]["top1"] == 1
    assert by["CSR complete"]["kl"] < 1e-5 and abs(by["CSR complete"]["ppl@96"] / by["fp32"]["ppl@96"] - 1) < 1e-3
    assert by["KIVI-2"]["kl"] > by["CSR complete"]["kl"]
    assert math.isclose(by["fp32"]["bits_per_channel"], 32.0)  # fp32 DynamicCache
    with open(tmp_path / "report" / "eval.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["fp32", "CSR complete", "KIVI-2"]
    for name in ("eval.md", "memory_vs_length.png", "ppl_vs_bits.png", "memory_trace.csv"):
        assert (tmp_path / "report" / name).is_file()
