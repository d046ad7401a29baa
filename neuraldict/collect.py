"""Calibration KV collection: run the model over a corpus and keep every layer's pre-RoPE keys and values.

Layout on disk (one folder per collection, named by a hash of what determines its content):

    collection.json            parameters, model fingerprint, number of windows/shards, `complete`
    shard_00000.npy ...        fp16 array (2, n_layers, tokens_in_shard, n_kv_heads, head_dim);
                               index 0 = pre-RoPE keys, 1 = values

`shard[kind, layer]` is one contiguous block, so `KVCollection.vectors(layer, kind)` reads a layer
through memory maps without touching the others. Shards are written to a temp name and renamed, so
a half-written shard is never read; re-running the same collection resumes after the last full one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from csr_core.corpus import EMBEDDED_CORPUS, Document, Split, load_corpus
from csr_core.dictionary_file import ModelFingerprint
from csr_core.models import EMBEDDED_MODEL, load_model, model_fingerprint, pre_rope_key_modules
from csr_core.paths import cache_root

KIND_INDEX = {"keys": 0, "values": 1}
_MANIFEST = "collection.json"


def token_windows(tokenizer, docs: list[Document], *, window: int, max_tokens: int, source: str = "corpus"):
    """Tokenise documents into one stream (EOS between documents) and cut it into windows.

    → LongTensor (n_windows, window) with n_windows = min(stream, max_tokens) // window.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if max_tokens < window:
        raise ValueError(f"max_tokens = {max_tokens} is smaller than one window of {window} tokens: raise it or lower window")
    sep = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            stream.append(sep)
        if len(stream) >= max_tokens:
            break
    n_windows = min(len(stream), max_tokens) // window
    if n_windows == 0:
        raise ValueError(
            f"{source} has {len(stream)} tokens, fewer than one window of {window} (max_tokens={max_tokens}): "
            f"use a smaller window or more text"
        )
    return torch.tensor(stream[: n_windows * window]).view(n_windows, window)


@torch.no_grad()
def capture_kv(lm: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass; returns pre-RoPE keys and values, each (n_layers, B, T, n_kv_heads, head_dim)."""
    fp = model_fingerprint(lm, "")
    keys, values, hooks = [], [], []

    def keep(store):
        def hook(_module, _inputs, output):
            store.append(output.reshape(*output.shape[:2], fp.n_kv_heads, fp.head_dim))

        return hook

    for k_module, v_module in pre_rope_key_modules(lm):
        hooks.append(k_module.register_forward_hook(keep(keys)))
        hooks.append(v_module.register_forward_hook(keep(values)))
    try:
        lm(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(keys), torch.stack(values)


def collection_dir(*, model: str, corpus: str, split: str, max_tokens: int, window: int, root: Path | None = None):
    params = dict(model=model, corpus=corpus, split=split, max_tokens=max_tokens, window=window)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).name)
    return (root or cache_root() / "kv") / f"{slug}-{split}-{digest}", params


def collect_kv(
    model: str = EMBEDDED_MODEL,
    corpus: str = EMBEDDED_CORPUS,
    split: Split = "train",
    max_tokens: int = 16384,
    window: int = 512,
    batch_size: int = 4,
    windows_per_shard: int = 8,
    output_root: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> "KVCollection":
    """Collect pre-RoPE keys and values of every layer on `split` of `corpus`; resumable.

    Args:
        model: Hugging Face id, local folder, or the embedded default.
        corpus: "python-docs" (embedded), "hf:<dataset>[:<config>]", or a text file / folder / glob.
        split: which document split to read ("train" for calibration, "validation" for held-out error).
        max_tokens: token budget; the collection holds max_tokens // window full windows.
        window: tokens per forward pass (positions 0..window-1 in each).
        batch_size: windows per forward pass.
        windows_per_shard: windows stored per shard file (the unit of resumption).
        output_root: folder for collections (default: <cache>/kv).
        device: "cpu", "cuda" or "cuda:N".
        dtype: the model's dtype, "float32", "bfloat16" or "float16" (shards are stored in float16 either way).
    """
    path, params = collection_dir(
        model=model, corpus=corpus, split=split, max_tokens=max_tokens, window=window,
        root=Path(output_root) if output_root else None,
    )
    manifest_path = path / _MANIFEST
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("complete"):
        print(f"KV collection already complete: {path}")
        return KVCollection(path)

    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    fingerprint = model_fingerprint(lm, model)
    windows = token_windows(
        tokenizer, load_corpus(corpus, split), window=window, max_tokens=max_tokens, source=f"corpus {corpus!r} ({split})"
    )
    n_shards = -(-len(windows) // windows_per_shard)
    manifest = {
        "params": params,
        "model": asdict(fingerprint),
        "n_windows": len(windows),
        "windows_per_shard": windows_per_shard,
        "n_shards": n_shards,
        "shard_layout": "(kind[keys, values], layer, token, kv_head, head_dim) float16, keys before RoPE",
        "complete": False,
    }
    path.mkdir(parents=True, exist_ok=True)
    _write_json(manifest_path, manifest)

    done = sum((path / _shard_name(i)).is_file() for i in range(n_shards))
    started, new_tokens = time.perf_counter(), 0
    bar = tqdm(total=len(windows) * window, initial=done * windows_per_shard * window, unit="tok",
               desc=f"Collecting KV ({split})", dynamic_ncols=True)
    for shard in range(n_shards):
        target = path / _shard_name(shard)
        if target.is_file():
            continue
        shard_windows = windows[shard * windows_per_shard : (shard + 1) * windows_per_shard]
        parts = []
        for batch in shard_windows.split(batch_size):
            k, v = capture_kv(lm, batch.to(device))  # (L, B, T, H, d) each
            kv = torch.stack([k, v]).flatten(2, 3)  # (2, L, B·T, H, d)
            parts.append(kv.to(torch.float16).cpu().numpy())
            bar.update(batch.numel())
            new_tokens += batch.numel()
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.concatenate(parts, axis=2))
        os.replace(tmp, target)
    bar.close()
    elapsed = time.perf_counter() - started
    manifest["complete"] = True
    manifest["tokens_per_second"] = round(new_tokens / elapsed, 1) if new_tokens else None
    _write_json(manifest_path, manifest)
    if new_tokens:
        print(f"Collected {new_tokens} tokens in {elapsed:.1f} s ({new_tokens / elapsed:.0f} tokens/s) → {path}")
    return KVCollection(path)


class KVCollection:
    """Read access to a finished collection, by (layer, kind), through memory maps."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / _MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a KV collection (no {_MANIFEST}): run `neuraldict collect`")
        self.manifest = json.loads(manifest_path.read_text())
        if not self.manifest.get("complete"):
            raise ValueError(f"KV collection {self.path} is incomplete: run the same `neuraldict collect` to resume")
        self.model = ModelFingerprint(**self.manifest["model"])
        self._shards = [
            np.load(self.path / _shard_name(i), mmap_mode="r") for i in range(self.manifest["n_shards"])
        ]

    @property
    def n_tokens(self) -> int:
        return sum(s.shape[2] for s in self._shards)

    def vectors(self, layer: int, kind: str) -> np.ndarray:
        """All head vectors of one layer and kind: (n_tokens · n_kv_heads, head_dim) float16."""
        if kind not in KIND_INDEX:
            raise ValueError(f"kind must be one of {tuple(KIND_INDEX)}, got {kind!r}")
        if not 0 <= layer < self.model.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {self.model.n_layers} layers")
        d = self.model.head_dim
        return np.concatenate([s[KIND_INDEX[kind], layer].reshape(-1, d) for s in self._shards])

    def __repr__(self) -> str:
        m = self.model
        return f"KVCollection({self.path}, tokens={self.n_tokens}, layers={m.n_layers}, kv_heads={m.n_kv_heads}, d_h={m.head_dim})"


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
