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


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Tests never write into the user's cache folder: KV collections, whitening and MLX conversions go to a
    temporary CSR_CACHE_DIR. Only the converted embedded model is shared (linked), so it is converted once."""
    from csr_core.paths import cache_root

    shared_models = cache_root() / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    private = tmp_path_factory.mktemp("csr-cache")
    (private / "models").symlink_to(shared_models, target_is_directory=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("CSR_CACHE_DIR", str(private))  # subprocesses inherit it
    yield private
    patch.undo()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct (converted once into the cache)."""
    from csr_core.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder holding a tiny random Llama with SmolLM2's real tokenizer: the whole pipeline in seconds."""
    from transformers import AutoTokenizer

    from csr_core.models import converted_embedded_model

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

    from csr_core.models import converted_embedded_model

    folder = tmp_path_factory.mktemp("tiny-llama-2-layers")
    tiny_llama(n_layers=2, heads=4, kv_heads=2, head_dim=16, vocab_size=49152).save_pretrained(folder)
    AutoTokenizer.from_pretrained(converted_embedded_model()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_kmeans_dictionary(tmp_path_factory, smollm2):
    """A dictionary file for the real SmolLM2 from k-means on 2 048 calibration tokens (N = 256): seconds, not a fit."""
    import numpy as np

    from csr_core.dictionary_file import DictionaryFile, KindDictionaries, save_dictionary
    from csr_core.models import model_fingerprint
    from csr_runtime.sparse_coding import split_chunks
    from neuraldict.collect import collect_kv
    from neuraldict.kmeans import kmeans_dictionary

    collection = collect_kv(max_tokens=2048, window=512)
    atoms = {"keys": [], "values": []}
    for layer in range(30):
        for kind, s_n in (("keys", 1), ("values", 2)):
            x = split_chunks(torch.from_numpy(collection.vectors(layer, kind).astype(np.float32)), s_n).flatten(0, 1)
            atoms[kind].append(kmeans_dictionary(x, 256, iterations=5).numpy())
    dictionary = DictionaryFile(model_fingerprint(smollm2[0], "smollm2-135m-instruct"),
                                KindDictionaries(1, 8, list(range(30)), atoms["keys"]),
                                KindDictionaries(2, 4, list(range(30)), atoms["values"]))
    return save_dictionary(tmp_path_factory.mktemp("dict") / "kmeans.safetensors", dictionary)
