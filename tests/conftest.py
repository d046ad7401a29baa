"""Shared fixtures: a tiny random Llama for speed, and the real embedded SmolLM2 where the claim is about real data."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(*, n_layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, seed: int = 0, **extra):
    """A randomly initialised LlamaForCausalLM small enough for unit tests (width 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    extra.setdefault("vocab_size", 128)
    config = LlamaConfig(
        hidden_size=heads * head_dim, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=256, **extra,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct (converted once into the cache)."""
    from neuraldict.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder holding a tiny random Llama with SmolLM2's real tokenizer: the whole pipeline in seconds."""
    from transformers import AutoTokenizer

    from neuraldict.models import converted_embedded_model

    def make(name: str, n_layers: int):
        folder = tmp_path_factory.mktemp(name)
        tiny_llama(n_layers=n_layers, heads=4, kv_heads=2, head_dim=16, vocab_size=49152).save_pretrained(folder)
        AutoTokenizer.from_pretrained(converted_embedded_model()).save_pretrained(folder)
        return folder

    return make("tiny-llama", 3)


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory):
    """Like tiny_model_dir, but 2 layers: another architecture."""
    from transformers import AutoTokenizer

    from neuraldict.models import converted_embedded_model

    folder = tmp_path_factory.mktemp("tiny-llama-2-layers")
    tiny_llama(n_layers=2, heads=4, kv_heads=2, head_dim=16, vocab_size=49152).save_pretrained(folder)
    AutoTokenizer.from_pretrained(converted_embedded_model()).save_pretrained(folder)
    return folder
