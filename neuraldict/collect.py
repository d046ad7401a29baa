"""Calibration KV collection: run the model over a corpus and keep every layer's pre-RoPE keys and values.

Layout on disk (one folder per collection, named by a hash of what determines its content):

    collection.json            what was asked (parameters, a hash of the model's config and weight files,
                               a hash of the split's text), the model fingerprint, per shard its size
                               and SHA-256, and `complete`; rewritten atomically after every shard
    shard_00000.npy ...        fp16 array (2, n_layers, tokens_in_shard, n_kv_heads, head_dim);
                               index 0 = pre-RoPE keys, 1 = values

`shard[kind, layer]` is one contiguous block, so `KVCollection.vectors(layer, kind)` reads a layer
through memory maps without touching the others. Shards are written to a temp name and renamed.
Every reuse checks each shard's size against the manifest; `verify=True` (`neuraldict collect --verify`,
and always before training) also checks its SHA-256. A missing, truncated or altered shard is deleted
and collected again (the collection resumes from there), never used; non-finite keys or values are an
error that names the shard. The folder name hashes everything that shapes the shards, so a changed
model, corpus text or parameter starts a new collection.
"""

from __future__ import annotations

import hashlib
import io
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


def model_source_hash(model: str) -> str:
    """SHA-256 over the model folder's config.json and, per weight file, its name, size and first and last MiB
    (hashing many GB whole would cost more than it protects); a hub id is hashed as its name."""
    from csr_core.models import resolve_model

    folder = Path(resolve_model(model))
    h = hashlib.sha256()
    if not (folder / "config.json").is_file():
        h.update(model.encode())
        return h.hexdigest()[:16]
    h.update((folder / "config.json").read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(2**20))
                fh.seek(max(size - 2**20, 0))
                h.update(fh.read(2**20))
    return h.hexdigest()[:16]


def corpus_hash(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()[:16]


def collection_dir(*, model: str, corpus: str, split: str, max_tokens: int, window: int, root: Path | None = None,
                   **shaping):
    """The folder of a collection: named by a hash of every input that shapes its shards."""
    params = dict(model=model, corpus=corpus, split=split, max_tokens=max_tokens, window=window, **shaping)
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
    verify: bool = False,
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
        verify: also check every stored shard's SHA-256 (sizes are always checked); damaged shards are re-collected.
    """
    docs = load_corpus(corpus, split)
    path, params = collection_dir(
        model=model, corpus=corpus, split=split, max_tokens=max_tokens, window=window,
        windows_per_shard=windows_per_shard, dtype=dtype, model_hash=model_source_hash(model),
        corpus_hash=corpus_hash(docs), root=Path(output_root) if output_root else None,
    )
    manifest_path = path / _MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if manifest is not None and manifest.get("params") != params:  # a folder of another collection: start anew
        manifest = None
    if manifest is not None:
        bad = damaged_shards(path, manifest, verify=verify)
        for i in bad:
            print(f"KV shard {path / _shard_name(i)} is missing or damaged: collecting it again")
            (path / _shard_name(i)).unlink(missing_ok=True)
            manifest["shards"].pop(str(i), None)
            manifest["complete"] = False
        if manifest.get("complete"):
            print(f"KV collection already complete{' (checksums verified)' if verify else ''}: {path}")
            return KVCollection(path)

    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    fingerprint = model_fingerprint(lm, model)
    windows = token_windows(tokenizer, docs, window=window, max_tokens=max_tokens, source=f"corpus {corpus!r} ({split})")
    n_shards = -(-len(windows) // windows_per_shard)
    if manifest is None:
        manifest = {
            "params": params,
            "model": asdict(fingerprint),
            "n_windows": len(windows),
            "windows_per_shard": windows_per_shard,
            "n_shards": n_shards,
            "shard_layout": "(kind[keys, values], layer, token, kv_head, head_dim) float16, keys before RoPE",
            "shards": {},
            "complete": False,
        }
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("shard_*"):  # shards without a record here cannot be trusted
            stale.unlink()
    _write_json(manifest_path, manifest)

    done = len(manifest["shards"])
    started, new_tokens = time.perf_counter(), 0
    bar = tqdm(total=len(windows) * window, initial=done * windows_per_shard * window, unit="tok",
               desc=f"Collecting KV ({split})", dynamic_ncols=True)
    for shard in range(n_shards):
        target = path / _shard_name(shard)
        if str(shard) in manifest["shards"]:
            continue
        shard_windows = windows[shard * windows_per_shard : (shard + 1) * windows_per_shard]
        parts = []
        for batch in shard_windows.split(batch_size):
            k, v = capture_kv(lm, batch.to(lm.device))  # (L, B, T, H, d) each
            kv = torch.stack([k, v]).flatten(2, 3)  # (2, L, B·T, H, d)
            parts.append(kv.to(torch.float16).cpu().numpy())
            bar.update(batch.numel())
            new_tokens += batch.numel()
        array = np.concatenate(parts, axis=2)
        finite = np.isfinite(array).all(axis=(2, 3, 4))  # (kind, layer)
        if not finite.all():
            kind, layer = map(int, np.argwhere(~finite)[0])
            raise ValueError(f"KV shard {target}: the model produced non-finite {list(KIND_INDEX)[kind]} in layer {layer} "
                             f"(float16 overflow or a broken model); nothing was stored for this shard")
        buffer = io.BytesIO()
        np.save(buffer, array)
        data = buffer.getvalue()  # hashed as written, not read back
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        manifest["shards"][str(shard)] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _write_json(manifest_path, manifest)
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
        bad = damaged_shards(self.path, self.manifest, verify=False)
        if bad:
            raise ValueError(f"KV collection {self.path}: shard {self.path / _shard_name(bad[0])} is missing or does not "
                             f"have the size its manifest records: run the same `neuraldict collect` (or fit) again to "
                             f"collect it anew")
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


def damaged_shards(path: Path, manifest: dict, *, verify: bool) -> list[int]:
    """Indices of the shards a manifest lists as done whose file is missing, of another size, or (verify) of
    another SHA-256; in a complete manifest, shards with no record at all count as damaged too."""
    records = manifest.get("shards")
    if records is None:  # written before manifests recorded shards: nothing can be trusted
        return list(range(manifest.get("n_shards", 0)))
    bad = []
    for i in range(manifest.get("n_shards", 0)):
        record, f = records.get(str(i)), path / _shard_name(i)
        if record is None:
            if manifest.get("complete"):
                bad.append(i)
            continue
        if not f.is_file() or f.stat().st_size != record["bytes"] or (verify and _sha256(f) != record["sha256"]):
            bad.append(i)
    return bad


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**24), b""):
            h.update(block)
    return h.hexdigest()


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
