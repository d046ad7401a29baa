"""Shared fixtures: a tiny random Llama for speed, and the real embedded SmolLM2 where the claim is about real data."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(*, n_layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, seed: int = 0, **extra):
    """A randomly initialised LlamaForCausalLM small enough for unit tests (width 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=heads * head_dim, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=256, **extra,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct (converted once into the cache)."""
    from neuraldict.models import load_model

    return load_model()
