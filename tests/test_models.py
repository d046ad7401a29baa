import pytest
import torch

from csr_core.models import check_supported, load_model, model_fingerprint
from tests.conftest import tiny_llama


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"tiny-gpt2 \(GPT2LMHeadModel\) is not supported: it has no `model.layers`"):
        check_supported(gpt2, "tiny-gpt2")


def test_model_not_available_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # What a machine without network sees (the env var is read at import time, so patch the constant).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="could not load model 'nobody/no-such-model'.*embedded default"):
        load_model("nobody/no-such-model")


def test_fingerprint_of_tiny_llama():
    fp = model_fingerprint(tiny_llama(n_layers=3, kv_heads=2, head_dim=16), "tiny")
    assert (fp.n_layers, fp.n_kv_heads, fp.head_dim, fp.rope_theta) == (3, 2, 16, 10000.0)


@pytest.mark.smollm2
def test_embedded_model_is_the_real_smollm2(smollm2):
    lm, tokenizer = smollm2
    fp = model_fingerprint(lm, "smollm2")
    assert (fp.n_layers, fp.n_kv_heads, fp.head_dim) == (30, 3, 64)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = lm.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_library_code_passes_caches_without_a_deprecation_warning():
    """csr-eval and compare score through `chunked_log_probs`: it must use the keyword this transformers takes."""
    import inspect
    import warnings

    from csr_core.models import cache_keyword
    from csr_core.scoring import chunked_log_probs
    from csr_runtime.cache import CSRCache
    from tests.test_cache import random_dictionary

    lm = tiny_llama(n_layers=2)
    expected = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    assert cache_keyword(lm) == expected
    ids = torch.randint(1, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        logp = chunked_log_probs(lm, ids, CSRCache(lm, random_dictionary(lm), sparsity_keys=2, sparsity_values=1),
                                 prefix=12, chunk=4)
    assert logp.shape == (12, 128)


@pytest.mark.parametrize("device,dtype,message", [("cuda:7" if not torch.cuda.is_available() else "nope", "float32", "device"),
                                                  ("cpu", "int8", "dtype has to be one of")])
def test_bad_device_or_dtype_says_what_to_pass(tiny_model_dir, device, dtype, message):
    with pytest.raises(ValueError, match=message):
        load_model(str(tiny_model_dir), device=device, dtype=dtype)


def test_load_model_in_bf16(tiny_model_dir):
    lm, _ = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert next(lm.parameters()).dtype == torch.bfloat16


def test_instruct_prompts_get_the_chat_template_and_base_models_raw_text(tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    from csr_core.prompts import chat_prompt, encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # SmolLM2-Instruct's tokenizer
    prompt = chat_prompt(tokenizer, "Name a colour.")
    assert prompt.rstrip().endswith("<|im_start|>assistant") and "<|im_start|>user\nName a colour.<|im_end|>" in prompt
    assert chat_prompt(tokenizer, "Name a colour.", chat=False) == "Name a colour."
    ids = encode_prompt(tokenizer, "Name a colour.")
    assert tokenizer.decode(ids[0]) == prompt  # no second set of special tokens
    tokenizer.chat_template = None  # what a base model's tokenizer looks like
    assert chat_prompt(tokenizer, "Name a colour.") == "Name a colour."
    assert "no chat template" in capsys.readouterr().err
