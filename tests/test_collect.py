import json
from pathlib import Path

import numpy as np
import pytest
import torch

from csr_core.corpus import Document
from csr_runtime.rope import rope_cos_sin, rotate, unrotate
from neuraldict.collect import KVCollection, capture_kv, collect_kv, token_windows
from tests.conftest import tiny_llama


def assert_pre_rope_keys_match_dynamic_cache(lm, input_ids, atol):
    keys, values = capture_kv(lm, input_ids)  # (L, B, T, H, d), keys before RoPE
    with torch.no_grad():
        cache = lm(input_ids=input_ids, use_cache=True).past_key_values
    positions = torch.arange(input_ids.shape[1])[None].expand(input_ids.shape[0], -1)
    cos, sin = rope_cos_sin(lm.model.rotary_emb, positions)
    for layer in range(len(keys)):
        rotated = rotate(keys[layer].transpose(1, 2), cos, sin)  # (B, H, T, d)
        torch.testing.assert_close(rotated, cache.layers[layer].keys, atol=atol, rtol=0)
        torch.testing.assert_close(values[layer].transpose(1, 2), cache.layers[layer].values, atol=atol, rtol=0)
        # and un-rotating the cache's keys gives the collected pre-RoPE keys back
        torch.testing.assert_close(unrotate(cache.layers[layer].keys, cos, sin), keys[layer].transpose(1, 2), atol=atol, rtol=0)


def test_pre_rope_keys_tiny_llama():
    lm = tiny_llama(n_layers=3)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    assert_pre_rope_keys_match_dynamic_cache(lm, ids, atol=1e-5)


def test_pre_rope_keys_tiny_llama_with_scaled_rope():
    # YaRN scales cos/sin by α ≠ 1: un-rotation must divide it out.
    lm = tiny_llama(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                     "original_max_position_embeddings": 64})
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    assert_pre_rope_keys_match_dynamic_cache(lm, ids, atol=1e-5)


@pytest.mark.smollm2
def test_pre_rope_keys_real_smollm2(smollm2):
    lm, tokenizer = smollm2
    ids = tokenizer(["The quick brown fox jumps over the lazy dog because it wants to reach the river."],
                    return_tensors="pt")["input_ids"]
    assert_pre_rope_keys_match_dynamic_cache(lm, ids, atol=1e-4)


class _CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 100 for c in text]}


def test_token_windows_and_too_short_corpus():
    docs = [Document("a", "x" * 30), Document("b", "y" * 30)]
    w = token_windows(_CharTokenizer(), docs, window=16, max_tokens=1000)
    assert w.shape == (3, 16)  # 62 tokens (2 EOS) → 3 full windows
    assert (w.flatten()[30] == 0).item()  # EOS between documents
    with pytest.raises(ValueError, match="fewer than one window of 100"):
        token_windows(_CharTokenizer(), docs, window=100, max_tokens=1000, source="corpus 'x'")


@pytest.mark.smollm2
def test_collection_is_resumable_and_memory_mapped(tmp_path, smollm2):
    lm, tokenizer = smollm2
    kwargs = dict(max_tokens=192, window=64, windows_per_shard=1, batch_size=2, output_root=str(tmp_path))
    collection = collect_kv(**kwargs)
    assert collection.n_tokens == 192 and collection.manifest["n_shards"] == 3
    keys15 = collection.vectors(15, "keys")
    assert keys15.shape == (192 * 3, 64) and keys15.dtype == np.float16

    # The stored keys are the model's pre-RoPE keys of the first window.
    from csr_core.corpus import load_corpus

    ids = token_windows(tokenizer, load_corpus("python-docs", "train"), window=64, max_tokens=192)
    k, v = capture_kv(lm, ids[:1])
    np.testing.assert_allclose(keys15[: 64 * 3], k[15, 0].reshape(-1, 64).numpy(), atol=2e-2, rtol=1e-3)
    np.testing.assert_allclose(collection.vectors(3, "values")[: 64 * 3], v[3, 0].reshape(-1, 64).numpy(), atol=2e-2, rtol=1e-3)

    # Simulate an interruption: one shard lost mid-write (only its temp file remains), manifest not complete.
    path = collection.path
    before = np.load(path / "shard_00001.npy").copy()
    (path / "shard_00001.npy").rename(path / "shard_00001.tmp")
    manifest = json.loads((path / "collection.json").read_text())
    manifest["complete"] = False
    (path / "collection.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="incomplete"):
        KVCollection(path)
    stamp = (path / "shard_00000.npy").stat().st_mtime_ns
    resumed = collect_kv(**kwargs)
    assert (path / "shard_00000.npy").stat().st_mtime_ns == stamp, "a finished shard was recomputed"
    np.testing.assert_array_equal(np.load(path / "shard_00001.npy"), before)
    assert resumed.n_tokens == 192


def test_tests_collect_into_a_private_cache_not_the_users(private_cache_dir, tiny_model_dir):
    from csr_core.paths import cache_root

    assert cache_root() == private_cache_dir
    collection = collect_kv(model=str(tiny_model_dir), max_tokens=128, window=64)
    assert Path(collection.path).resolve().is_relative_to(private_cache_dir.resolve())


def _tiny_collection(tiny_model_dir, tmp_path, corpus, **extra):
    kwargs = dict(model=str(tiny_model_dir), corpus=str(corpus), max_tokens=256, window=32, windows_per_shard=2,
                  batch_size=2, output_root=str(tmp_path / "kv"), **extra)
    return collect_kv(**kwargs), kwargs


@pytest.fixture
def text_corpus(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(30):
        (folder / f"doc{i}.txt").write_text(f"Document {i} says something about number {i}. " * 20, encoding="utf-8")
    return folder


def _damage_truncate(f):
    f.write_bytes(f.read_bytes()[:-1000])


def _damage_zero_fill(f):
    data = bytearray(f.read_bytes())
    data[200:2200] = bytes(2000)
    f.write_bytes(bytes(data))


def _damage_nan(f):
    data = bytearray(f.read_bytes())
    data[300:310] = np.full(5, np.nan, dtype=np.float16).tobytes()
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, verify", [(_damage_truncate, False), (_damage_zero_fill, True), (_damage_nan, True),
                                            (lambda f: f.unlink(), False)])
def test_a_damaged_shard_is_collected_again_never_used(tiny_model_dir, tmp_path, text_corpus, damage, verify):
    collection, kwargs = _tiny_collection(tiny_model_dir, tmp_path, text_corpus)
    shard = collection.path / "shard_00002.npy"
    good = np.load(shard).copy()
    damage(shard)
    if damage is _damage_truncate:  # reading without re-collecting names the shard instead of failing inside mmap
        with pytest.raises(ValueError, match="shard_00002.npy is missing or does not have the size"):
            KVCollection(collection.path)
    repaired = collect_kv(**kwargs, verify=verify)
    np.testing.assert_array_equal(np.load(repaired.path / "shard_00002.npy"), good)
    assert np.isfinite(repaired.vectors(1, "keys").astype(np.float32)).all()


def test_changed_inputs_start_a_new_collection(tiny_model_dir, tmp_path, text_corpus):
    first, kwargs = _tiny_collection(tiny_model_dir, tmp_path, text_corpus)
    other_sharding = collect_kv(**{**kwargs, "windows_per_shard": 3})
    assert other_sharding.path != first.path and other_sharding.n_tokens == first.n_tokens == 256
    for f in text_corpus.glob("doc*.txt"):  # the same corpus name, edited text
        f.write_text(f.read_text() + " An edit.", encoding="utf-8")
    edited = collect_kv(**kwargs)
    assert edited.path not in (first.path, other_sharding.path)


def test_non_finite_keys_are_an_error_naming_the_shard(tiny_model_dir, tmp_path, text_corpus, monkeypatch):
    import neuraldict.collect as collect

    real = collect.capture_kv
    monkeypatch.setattr(collect, "capture_kv", lambda lm, ids: tuple(t * float("inf") for t in real(lm, ids)))
    with pytest.raises(ValueError, match=r"shard_00000.npy: the model produced non-finite keys in layer 0"):
        _tiny_collection(tiny_model_dir, tmp_path, text_corpus)
