"""`CSRKVCache`: the CSR cache for `mlx-lm` models (mirrors `csr_runtime.cache.CSRLayer`).

One object per layer, following mlx-lm's cache protocol (`update_and_fetch`, `offset`, `make_mask`,
`empty`, `nbytes`), so a list of them is a `prompt_cache` for `mlx_lm.generate` / `stream_generate`.
Keys arrive rotated; they are un-rotated with the model's RoPE, coded before RoPE with int16 indices
and fp16 coefficients, and rotated again when read. Per layer the dictionary is offline (file) +
online (the prompt's own vectors, most recent first) + guard (vectors whose relative residual stays
above a threshold); the newest `window` tokens stay in full precision. The call's own new K/V reach
the attention exactly. `trim(n)` drops the newest tokens (prompt-cache reuse, speculative decoding).
Not supported here (use the PyTorch runtime): left-padded batches, 8-bit coefficients; nor saving
prompt caches (mlx-lm's loader only rebuilds its own cache classes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import create_attention_mask

from csr_runtime.dictionary_file import INDEX_LIMIT, DictionaryFile, ModelFingerprint, load_dictionary
from mlx_backend.rope import rotate, unrotate
from mlx_backend.sparse_coding import sparse_decode, sparse_encode, split_chunks


@dataclass
class CSRSettings:
    sparsity_keys: int
    sparsity_values: int  # per chunk
    s_n_values: int
    method: str = "mp"
    online_atoms: int = 256
    guard_atoms: int = 256
    guard_threshold: float = 0.3
    window: int = 0


@dataclass
class _KindStore:
    offline: mx.array  # (N_off, w) float32
    extra: list = field(default_factory=list)  # per row: (M_b, w) float16 online + guard atoms
    n_online: list = field(default_factory=list)
    idx: mx.array | None = None  # (B, H, T, k) int16
    coef: mx.array | None = None  # (B, H, T, k) float16


class CSRKVCache:
    def __init__(self, layer_idx: int, key_atoms, value_atoms, rope, settings: CSRSettings):
        self.layer_idx, self.rope, self.settings = layer_idx, rope, settings
        self.stores = {"keys": _KindStore(mx.array(key_atoms)), "values": _KindStore(mx.array(value_atoms))}
        self.keys = self.values = None  # full-precision window, keys after RoPE
        self.offset = 0
        self.n_coded = 0
        self.stats = {"guard_atoms": 0, "atoms_refused": 0, "vectors_coded": 0}

    # -- mlx-lm protocol ---------------------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """keys, values: (B, H, T, d_h), keys after RoPE → all keys/values so far."""
        if not (mx.isfinite(keys).all() and mx.isfinite(values).all()).item():
            raise ValueError(f"layer {self.layer_idx}: non-finite keys or values reached the CSR cache")
        prefill = self.keys is None
        if prefill:
            B, H, _, d = keys.shape
            self.keys, self.values = keys[:, :, :0], values[:, :, :0]
        keys_out = mx.concatenate([self._decoded_keys(), self.keys, keys], axis=2)
        values_out = mx.concatenate([self._decoded_values(), self.values, values], axis=2)
        self.keys = mx.concatenate([self.keys, keys], axis=2)
        self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        overflow = self.keys.shape[2] - self.settings.window
        if overflow > 0:
            old_k, old_v = self.keys[:, :, :overflow], self.values[:, :, :overflow]
            # a copy: a slice may keep the whole older array alive, uncounted by nbytes
            self.keys, self.values = mx.contiguous(self.keys[:, :, overflow:]), mx.contiguous(self.values[:, :, overflow:])
            self._code(old_k, old_v, build_online=prefill)
        return keys_out, values_out

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    def empty(self) -> bool:
        return self.keys is None

    def size(self) -> int:
        return self.offset

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the newest n tokens (the window's first, then codes; added atoms stay). Returns how many."""
        n = min(self.offset, n)
        if n <= 0:
            return 0
        keep = self.offset - n
        window_keep = max(keep - self.n_coded, 0)
        self.keys, self.values = mx.contiguous(self.keys[:, :, :window_keep]), mx.contiguous(self.values[:, :, :window_keep])
        if keep < self.n_coded:
            for store in self.stores.values():
                store.idx = mx.contiguous(store.idx[:, :, :keep]) if keep else None
                store.coef = mx.contiguous(store.coef[:, :, :keep]) if keep else None
            self.n_coded = keep
        self.offset = keep
        return n

    def _held_arrays(self) -> list[mx.array]:
        arrays = [a for a in (self.keys, self.values) if a is not None]
        for store in self.stores.values():
            arrays += [a for a in (store.idx, store.coef) if a is not None] + list(store.extra)
        return arrays

    @property
    def state(self) -> list[mx.array]:
        """The arrays mlx-lm evaluates after each step (saving prompt caches is not supported)."""
        return self._held_arrays()

    @property
    def nbytes(self) -> int:
        """Bytes of every array this layer holds for the sequence (offline atoms are shared, not counted)."""
        return sum(a.nbytes for a in self._held_arrays())

    # -- coding -------------------------------------------------------------------------------------
    def _code(self, keys_rotated: mx.array, values: mx.array, *, build_online: bool) -> None:
        B, H, T, d = keys_rotated.shape
        keys = unrotate(keys_rotated.astype(mx.float32), self.rope, self.n_coded)
        s = self.settings
        for kind, x, k, s_n in (("keys", keys, s.sparsity_keys, 1),
                                ("values", values.astype(mx.float32), s.sparsity_values, s.s_n_values)):
            chunks = split_chunks(x, s_n)  # (B, H, T, s_n, w)
            store = self.stores[kind]
            if not store.extra:
                store.extra = [mx.zeros((0, chunks.shape[-1]), dtype=mx.float16) for _ in range(B)]
                store.n_online = [0] * B
            if build_online:
                self._add_online(store, chunks)
            idx, coef = [], []
            for b in range(B):
                i, c = self._encode_row(store, b, chunks[b], k)
                idx.append(i)
                coef.append(c)
            idx, coef = mx.stack(idx), mx.stack(coef)
            store.idx = idx if store.idx is None else mx.concatenate([store.idx, idx], axis=2)
            store.coef = coef if store.coef is None else mx.concatenate([store.coef, coef], axis=2)
        self.n_coded += T
        self.stats["vectors_coded"] += B * H * T

    def _row_dictionary(self, store: _KindStore, b: int) -> mx.array:
        extra = store.extra[b]
        return store.offline if extra.shape[0] == 0 else mx.concatenate([store.offline, extra.astype(mx.float32)])

    def _append_atoms(self, store: _KindStore, b: int, atoms: mx.array) -> int:
        room = INDEX_LIMIT - 1 - store.offline.shape[0] - store.extra[b].shape[0]
        take = min(atoms.shape[0], max(room, 0))
        self.stats["atoms_refused"] += atoms.shape[0] - take
        if take:
            unit = atoms[:take] / mx.linalg.norm(atoms[:take], axis=-1, keepdims=True)
            store.extra[b] = mx.concatenate([store.extra[b], unit.astype(mx.float16)])
        return take

    def _add_online(self, store: _KindStore, chunks: mx.array) -> None:
        if self.settings.online_atoms <= 0:
            return
        for b in range(chunks.shape[0]):
            w = chunks.shape[-1]
            candidates = np.array(chunks[b].transpose(1, 0, 2, 3).reshape(-1, w))  # time-major
            candidates = candidates[np.linalg.norm(candidates, axis=-1) > 0][::-1]  # most recent first
            self._append_atoms(store, b, mx.array(np.ascontiguousarray(candidates[: self.settings.online_atoms])))
            store.n_online[b] = store.extra[b].shape[0]

    def _encode_row(self, store: _KindStore, b: int, chunks: mx.array, k: int):
        """chunks: (H, T, s_n, w) → idx (H, T, s_n·k) int16, coef float16, with guard atoms added."""
        H, T, s_n, w = chunks.shape
        s = self.settings
        x = chunks.reshape(-1, w)
        idx, coef = sparse_encode(x, self._row_dictionary(store, b), s=k, method=s.method)
        room = s.guard_atoms - (store.extra[b].shape[0] - store.n_online[b])
        if room > 0:
            x_hat = sparse_decode(idx, coef, self._row_dictionary(store, b))
            rel = ((x - x_hat) ** 2).sum(-1) / mx.maximum((x**2).sum(-1), 1e-30)
            order = np.argsort(-np.array(rel), kind="stable")[:room]
            worst = order[np.array(rel)[order] > s.guard_threshold]
            if len(worst):
                worst_mx = mx.array(worst)
                added = self._append_atoms(store, b, x[worst_mx])
                if added:
                    self.stats["guard_atoms"] += added
                    recode = worst_mx[:added]
                    i, c = sparse_encode(x[recode], self._row_dictionary(store, b), s=k, method=s.method)
                    idx[recode] = i
                    coef[recode] = c
        return idx.reshape(H, T, s_n * k).astype(mx.int16), coef.reshape(H, T, s_n * k).astype(mx.float16)

    # -- decoding -----------------------------------------------------------------------------------
    def _decode(self, kind: str):
        store = self.stores[kind]
        if store.idx is None:
            return None
        B, H, T, kk = store.idx.shape
        s_n = 1 if kind == "keys" else self.settings.s_n_values
        k = kk // s_n
        rows = []
        for b in range(B):
            x = sparse_decode(store.idx[b].astype(mx.int32).reshape(H, T, s_n, k),
                              store.coef[b].astype(mx.float32).reshape(H, T, s_n, k), self._row_dictionary(store, b))
            rows.append(x.reshape(H, T, -1))
        return mx.stack(rows)

    def _decoded_keys(self) -> mx.array:
        keys = self._decode("keys")
        return self.keys[:, :, :0] if keys is None else rotate(keys, self.rope, 0).astype(self.keys.dtype)

    def _decoded_values(self) -> mx.array:
        values = self._decode("values")
        return self.values[:, :, :0] if values is None else values.astype(self.values.dtype)


def model_fingerprint(model, model_id: str = "model") -> ModelFingerprint:
    """The architecture fields of an mlx-lm model, as `neuraldict.models.model_fingerprint` reads them in torch."""
    args = model.args
    heads = args.num_attention_heads
    scaling = getattr(args, "rope_scaling", None)
    return ModelFingerprint(
        model_id=model_id,
        n_layers=len(model.layers),
        n_kv_heads=getattr(args, "num_key_value_heads", None) or heads,
        head_dim=getattr(args, "head_dim", None) or args.hidden_size // heads,
        rope_theta=float(args.rope_theta),
        rope_type=str((scaling or {}).get("rope_type", scaling.get("type") if scaling else "default")),
    )


def make_csr_cache(
    model,
    dictionary: str | os.PathLike | DictionaryFile,
    *,
    sparsity: int | None = None,
    sparsity_keys: int | None = None,
    sparsity_values: int | None = None,
    method: str = "mp",
    online_atoms: int = 256,
    guard_atoms: int = 256,
    guard_threshold: float = 0.3,
    window: int = 0,
    model_id: str = "model",
) -> list[CSRKVCache]:
    """A `prompt_cache` (one CSRKVCache per layer) for an mlx-lm Llama-family model; same options as CSRCache."""
    fingerprint = model_fingerprint(model, model_id)
    if not isinstance(dictionary, DictionaryFile):
        dictionary = load_dictionary(dictionary, model=fingerprint)
    else:
        dictionary.check_model(fingerprint)
    sparsity_keys, sparsity_values = dictionary.resolve_sparsity(sparsity, sparsity_keys, sparsity_values)
    settings = CSRSettings(
        sparsity_keys=sparsity_keys, sparsity_values=sparsity_values, s_n_values=dictionary.values.s_n, method=method,
        online_atoms=online_atoms, guard_atoms=guard_atoms,
        guard_threshold=guard_threshold, window=window,
    )
    return [CSRKVCache(l, dictionary.keys.for_layer(l), dictionary.values.for_layer(l), layer.self_attn.rope, settings)
            for l, layer in enumerate(model.layers)]


def cache_nbytes(prompt_cache: list) -> int:
    return sum(c.nbytes for c in prompt_cache)
