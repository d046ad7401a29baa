"""`CSRKVCache`: the CSR cache for `mlx-lm` models (mirrors `csr_runtime.cache.CSRLayer`).

One object per layer, following mlx-lm's cache protocol (`update_and_fetch`, `offset`, `make_mask`,
`empty`, `nbytes`), so a list of them is a `prompt_cache` for `mlx_lm.generate` / `stream_generate`.
Keys arrive rotated; they are un-rotated with the model's RoPE, coded before RoPE, bit-packed per
token in the layout of `csr_core.code_layout` (the same bytes as the torch runtime), and rotated
again when read. The first `sink_tokens` tokens stay exact. Per layer, kind and row the dictionary is a
`Codebook` (`codebook.py`): offline (file) + online (the prompt's own vectors) + guard (vectors whose
relative residual stays above a threshold); the newest `window` tokens stay in full precision, and
tokens past it wait exact until `coding_batch` of them can be coded together (as in the torch runtime); with
`refine_fraction` > 0 the worst-coded share of each coding call's vectors get `refine_atoms` more atoms. The
call's own new K/V reach the attention exactly. `trim(n)` drops the newest tokens (prompt-cache reuse, speculative decoding).
Sequences of different lengths batch through mlx-lm's own protocol (`merge` → `batch_rows.BatchCSRKVCache`:
`batch_generate`, the server's batching). Prompt caches are saved and loaded with `mlx_backend.prompt_cache`
(mlx-lm's own loader only rebuilds its own cache classes).
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, replace

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import create_attention_mask

from csr_core import defaults
from csr_core.code_layout import row_index_bits
from csr_core.dictionary_file import DictionaryFile, ModelFingerprint, load_dictionary
from csr_core.settings import SETTING_FIELDS, cache_settings
from mlx_backend.code_packing import (
    CodeLayout,
    coefficient_scale,
    pack_bits,
    pack_codes,
    quantize_coefficients,
    unpack_bits,
    unpack_codes,
)
from mlx_backend.codebook import Codebook
from mlx_backend.metric import apply as whiten_heads
from mlx_backend.rope import rotate, unrotate
from mlx_backend.sparse_coding import residual_energy, sparse_decode, sparse_encode, split_chunks


@dataclass
class CSRSettings:
    sparsity_keys: list[int]  # per layer
    sparsity_values: list[int]  # per layer, per chunk
    s_n_values: int
    method: str = "mp"
    online_atoms: int = defaults.ONLINE_ATOMS
    online_sampling: str = "reverse"
    guard_atoms: int = defaults.GUARD_ATOMS
    guard_threshold: float = defaults.GUARD_THRESHOLD
    window: int = defaults.WINDOW
    coding_batch: int = defaults.CODING_BATCH  # tokens past the window are coded once this many have gathered
    refine_fraction: float = defaults.REFINE_FRACTION  # share of each coding call's vectors (per row) refined
    refine_atoms: int = defaults.REFINE_ATOMS  # atoms a refined vector gets on top of its code
    sink_tokens: int = defaults.SINK_TOKENS  # first tokens kept in full precision (attention sinks)
    index_bits: int | None = defaults.INDEX_BITS  # None: ⌈log2(atoms a row can address)⌉
    coef_format: str = defaults.COEF_FORMAT


@dataclass
class _KindStore:
    codebook: Codebook  # offline (shared with the other layers of the group) + each row's online and guard atoms
    whiten: mx.array | None = None  # (H, d_h, d_h) A of the attention metric: atoms live in the space of A (x − μ)
    center: mx.array | None = None  # (H, d_h) μ, the calibration mean every vector is coded relative to
    unwhiten: mx.array | None = None  # A⁻¹
    layout: CodeLayout | None = None  # how one token's (H · s_n · k) pairs are bit-packed
    scale: list[float] | None = None  # fp8/e3m1 power-of-two scale per row, fixed at its first coded tokens
    codes: mx.array | None = None  # (B, T, layout.nbytes) uint8
    refine_layout: CodeLayout | None = None  # one refined vector's extra atoms
    refine_mask: mx.array | None = None  # (B, ⌈T · H · s_n / 8⌉) uint8: a bit per coded vector, token-major
    refine_codes: mx.array | None = None  # (B, R, refine_layout.nbytes) uint8: row b's refined vectors in order

    def quantizer(self, b: int):
        """What MP rounds row b's coefficients to (None: int8's per-vector scale is known only after coding)."""
        fmt, scale = self.layout.coef_format, self.scale[b]
        return None if fmt == "int8" else (lambda c: quantize_coefficients(c, fmt, scale))

    def token_scales(self, tokens: int) -> mx.array:
        """(B · tokens, 1, 1): each token's row scale, in the (row, token) order of the packed codes."""
        return mx.repeat(mx.array(self.scale, dtype=mx.float32), tokens)[:, None, None]


class CSRKVCache:
    def __init__(self, layer_idx: int, key_atoms, value_atoms, rope, settings: CSRSettings, whitening: dict | None = None,
                 centers: dict | None = None):
        self.layer_idx, self.rope, self.settings = layer_idx, rope, settings
        codebook = lambda atoms: Codebook(mx.array(atoms), settings.online_atoms, settings.guard_atoms,
                                          settings.online_sampling)
        self.stores = {"keys": _KindStore(codebook(key_atoms)), "values": _KindStore(codebook(value_atoms))}
        for kind, (A, A_inv) in (whitening or {}).items():  # kind → (A, A⁻¹), each (H, d_h, d_h)
            self.stores[kind].whiten, self.stores[kind].unwhiten = mx.array(A), mx.array(A_inv)
        for kind, center in (centers or {}).items():  # kind → μ (H, d_h)
            self.stores[kind].center = mx.array(center)
        self.index_bits = {kind: row_index_bits(settings.index_bits, store.codebook.offline.shape[0], settings.online_atoms,
                                                settings.guard_atoms) for kind, store in self.stores.items()}
        self.keys = self.values = None  # full-precision window, keys after RoPE
        self.sink_keys = self.sink_values = None  # exact first tokens (keys after RoPE)
        self.offset = 0
        self.n_coded = 0
        self.stats = {"guard_atoms": 0, "atoms_refused": 0, "vectors_coded": 0, "vectors_refined": 0}

    # -- mlx-lm protocol ---------------------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """keys, values: (B, H, T, d_h), keys after RoPE → all keys/values so far."""
        if not (mx.isfinite(keys).all() and mx.isfinite(values).all()).item():
            raise ValueError(f"layer {self.layer_idx}: non-finite keys or values reached the CSR cache")
        prefill = self.keys is None
        if prefill:
            B, H, _, d = keys.shape
            self.keys, self.values = keys[:, :, :0], values[:, :, :0]
            self.sink_keys, self.sink_values = self.keys, self.values
        keys_out = mx.concatenate([self.sink_keys, self._decoded_keys(), self.keys, keys], axis=2)
        values_out = mx.concatenate([self.sink_values, self._decoded_values(), self.values, values], axis=2)
        self.keys = mx.concatenate([self.keys, keys], axis=2)
        self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        overflow = self.keys.shape[2] - self.settings.window
        if overflow >= self.settings.coding_batch:  # fewer wait, exact (as the torch runtime)
            old_k, old_v = self.keys[:, :, :overflow], self.values[:, :, :overflow]
            # a copy: a slice may keep the whole older array alive, uncounted by nbytes
            self.keys, self.values = mx.contiguous(self.keys[:, :, overflow:]), mx.contiguous(self.values[:, :, overflow:])
            to_sink = max(min(self.settings.sink_tokens - self.sink_keys.shape[2], overflow), 0)  # sinks fill first
            if to_sink:
                self.sink_keys = mx.concatenate([self.sink_keys, old_k[:, :, :to_sink]], axis=2)
                self.sink_values = mx.concatenate([self.sink_values, old_v[:, :, :to_sink]], axis=2)
            if overflow > to_sink:
                self._code(old_k[:, :, to_sink:], old_v[:, :, to_sink:], build_online=self.n_coded == 0)
        for store in self.stores.values():
            store.codebook.forget_memo()  # hold nothing between steps that nbytes does not count
        return keys_out, values_out

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    @classmethod
    def merge(cls, caches: list):
        """mlx-lm's batching: single-sequence caches of one layer → a `BatchCSRKVCache` of them."""
        from mlx_backend.batch_rows import BatchCSRKVCache

        return BatchCSRKVCache.merge(caches)

    def copy(self) -> "CSRKVCache":
        """A cache that continues from here independently (arrays are immutable and shared, lists are not)."""
        new = copy.copy(self)
        new.stats, new.stores = dict(self.stats), {}
        for kind, store in self.stores.items():
            new.stores[kind] = replace(store, codebook=store.codebook.copy(),
                                       scale=None if store.scale is None else list(store.scale))
        return new

    def empty(self) -> bool:
        return self.keys is None

    def size(self) -> int:
        return self.offset

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the newest n tokens (the window's first, then codes, then sinks; added atoms stay). Returns how many."""
        n = min(self.offset, n)
        if n <= 0:
            return 0
        keep = self.offset - n
        S = self.sink_keys.shape[2]
        window_keep = max(keep - S - self.n_coded, 0)
        self.keys, self.values = mx.contiguous(self.keys[:, :, :window_keep]), mx.contiguous(self.values[:, :, :window_keep])
        coded_keep = min(max(keep - S, 0), self.n_coded)
        if coded_keep < self.n_coded:
            for store in self.stores.values():
                store.codes = mx.contiguous(store.codes[:, :coded_keep]) if coded_keep else None
                if store.refine_mask is not None:
                    flags = unpack_bits(store.refine_mask, coded_keep * store.layout.groups)
                    store.refine_mask = pack_bits(flags)
                    store.refine_codes = mx.contiguous(store.refine_codes[:, : int(flags.sum(axis=1).max().item())])
            self.n_coded = coded_keep
        if keep < S:
            self.sink_keys, self.sink_values = mx.contiguous(self.sink_keys[:, :, :keep]), mx.contiguous(self.sink_values[:, :, :keep])
        self.offset = keep
        return n

    def _held_arrays(self) -> list[mx.array]:
        arrays = [a for a in (self.keys, self.values, self.sink_keys, self.sink_values) if a is not None]
        for store in self.stores.values():
            arrays += [a for a in (store.codes, store.refine_mask, store.refine_codes) if a is not None]
            arrays += store.codebook.held_tensors()
        return arrays

    @property
    def state(self) -> list[mx.array]:
        """The arrays mlx-lm evaluates after each step (save prompt caches with `mlx_backend.prompt_cache`)."""
        return self._held_arrays()

    # -- prompt caches (`prompt_cache.py`) -------------------------------------------------------------
    def save_state(self) -> tuple[dict[str, mx.array], dict]:
        """Everything this layer holds for the sequence → (named arrays, JSON-able counters and layouts).
        The offline atoms are not included: they come from the dictionary file."""
        arrays = {"keys": self.keys, "values": self.values, "sink_keys": self.sink_keys, "sink_values": self.sink_values}
        meta = {"offset": self.offset, "n_coded": self.n_coded, "stats": dict(self.stats), "kinds": {}}
        for kind, store in self.stores.items():
            cb = store.codebook
            arrays[f"{kind}.codes"] = store.codes
            arrays[f"{kind}.refine_mask"], arrays[f"{kind}.refine_codes"] = store.refine_mask, store.refine_codes
            for b, extra in enumerate(cb.extra or []):
                arrays[f"{kind}.extra.{b}"] = extra
            meta["kinds"][kind] = {"layout": None if store.layout is None else asdict(store.layout), "scale": store.scale,
                                   "refine_layout": None if store.refine_layout is None else asdict(store.refine_layout),
                                   "rows": None if cb.extra is None else len(cb.extra), "n_extra": cb.n_extra,
                                   "n_online": cb.n_online}
        return {name: a for name, a in arrays.items() if a is not None}, meta

    def load_state(self, arrays: dict[str, mx.array], meta: dict) -> None:
        """The inverse of `save_state`, into a layer built with the same model, dictionary and settings."""
        self.keys, self.values = arrays.get("keys"), arrays.get("values")
        self.sink_keys, self.sink_values = arrays.get("sink_keys"), arrays.get("sink_values")
        self.offset, self.n_coded, self.stats = meta["offset"], meta["n_coded"], dict(meta["stats"])
        for kind, store in self.stores.items():
            m, cb = meta["kinds"][kind], store.codebook
            store.layout = None if m["layout"] is None else CodeLayout(**m["layout"])
            store.scale, store.codes = m["scale"], arrays.get(f"{kind}.codes")
            store.refine_layout = None if m.get("refine_layout") is None else CodeLayout(**m["refine_layout"])
            store.refine_mask, store.refine_codes = arrays.get(f"{kind}.refine_mask"), arrays.get(f"{kind}.refine_codes")
            cb.reset()
            if m["rows"] is not None:
                cb.extra = [arrays[f"{kind}.extra.{b}"] for b in range(m["rows"])]
                cb.n_extra, cb.n_online = list(m["n_extra"]), list(m["n_online"])

    @property
    def nbytes(self) -> int:
        """Bytes of every array this layer holds for the sequence (offline atoms are shared, not counted)."""
        return sum(a.nbytes for a in self._held_arrays())

    # -- coding -------------------------------------------------------------------------------------
    def _code(self, keys_rotated: mx.array, values: mx.array, *, build_online: bool) -> None:
        B, H, T, d = keys_rotated.shape
        keys = unrotate(keys_rotated.astype(mx.float32), self.rope, self.sink_keys.shape[2] + self.n_coded)
        s = self.settings
        l = self.layer_idx
        for kind, x, k, s_n in (("keys", keys, s.sparsity_keys[l], 1),
                                ("values", values.astype(mx.float32), s.sparsity_values[l], s.s_n_values)):
            store = self.stores[kind]
            if store.center is not None:
                x = x - store.center[None, :, None, :]
            if store.whiten is not None:  # code A (x − μ): plain L2 there is the attention metric here
                x = whiten_heads(store.whiten, x)
            chunks = split_chunks(x, s_n)  # (B, H, T, s_n, w)
            if store.layout is None:  # the first coded tokens fix the layout and each row's coefficient scale
                store.layout = CodeLayout(groups=H * s_n, k=k, index_bits=self.index_bits[kind], coef_format=s.coef_format)
                store.refine_layout = CodeLayout(groups=1, k=s.refine_atoms, index_bits=self.index_bits[kind],
                                                 coef_format=s.coef_format)
                store.scale = [coefficient_scale(s.coef_format, mx.max(mx.linalg.norm(chunks[b], axis=-1)).item())
                               for b in range(B)]
            store.codebook.start(B)
            if build_online:
                self._add_online(store, chunks)
            packed, flags, refined = [], [], []
            for b in range(B):
                i, c = self._encode_row(store, b, chunks[b], k)  # (H, T, s_n·k)
                per_token = lambda a: a.reshape(H, T, s_n, k).transpose(1, 0, 2, 3).reshape(T, H * s_n, k)
                packed.append(pack_codes(per_token(i), per_token(c), store.layout, scale=store.scale[b]))
                if s.refine_fraction > 0:
                    x_tm = chunks[b].transpose(1, 0, 2, 3).reshape(T * H * s_n, -1)  # token-major, as the codes
                    f, r = self._refine_row(store, b, x_tm, per_token(i).reshape(-1, k), per_token(c).reshape(-1, k))
                    flags.append(f)
                    refined.append(r)
            packed = mx.stack(packed)  # (B, T, nbytes)
            store.codes = packed if store.codes is None else mx.concatenate([store.codes, packed], axis=1)
            if refined:
                before = self.n_coded * H * s_n
                old = [] if store.refine_mask is None else [unpack_bits(store.refine_mask, before)]
                store.refine_mask = pack_bits(mx.concatenate(old + [mx.stack(flags)], axis=1))
                refined = mx.stack(refined)
                store.refine_codes = refined if store.refine_codes is None else mx.concatenate(
                    [store.refine_codes, refined], axis=1)
        self.n_coded += T
        self.stats["vectors_coded"] += B * H * T

    def _add_online(self, store: _KindStore, chunks: mx.array) -> None:
        if self.settings.online_atoms <= 0:
            return
        g = np.random.default_rng(self.layer_idx)
        for b in range(chunks.shape[0]):
            candidates = chunks[b].transpose(1, 0, 2, 3).reshape(-1, chunks.shape[-1])  # (T·H·s_n, w), time-major
            store.codebook.add_online(b, candidates, g)

    def _encode_row(self, store: _KindStore, b: int, chunks: mx.array, k: int):
        """chunks: (H, T, s_n, w) → idx (H, T, s_n·k), coef, with guard atoms added."""
        H, T, s_n, w = chunks.shape
        s = self.settings
        x = chunks.reshape(-1, w)
        idx, coef = sparse_encode(x, store.codebook.row(b), s=k, method=s.method, quantize=store.quantizer(b))
        room = store.codebook.guard_room(b)
        if room > 0:
            x_hat = sparse_decode(idx, coef, store.codebook.row(b))
            rel = ((x - x_hat) ** 2).sum(-1) / mx.maximum((x**2).sum(-1), 1e-30)
            order = np.argsort(-np.array(rel), kind="stable")[:room]
            worst = order[np.array(rel)[order] > s.guard_threshold]
            if len(worst):
                worst_mx = mx.array(worst)
                added = store.codebook.add_guard(b, x[worst_mx])
                self.stats["atoms_refused"] += len(worst) - added
                if added:
                    self.stats["guard_atoms"] += added
                    recode = worst_mx[:added]
                    i, c = sparse_encode(x[recode], store.codebook.row(b), s=k, method=s.method,
                                         quantize=store.quantizer(b))
                    idx[recode] = i
                    coef[recode] = c
        return idx.reshape(H, T, s_n * k), coef.reshape(H, T, s_n * k)

    def _refine_row(self, store: _KindStore, b: int, x: mx.array, idx: mx.array, coef: mx.array):
        """As the torch runtime: the worst-coded `refine_fraction` of this call's vectors (x: (n, w) token-major,
        with their codes) get `refine_atoms` more atoms. → (n,) bool flags, (m, nbytes) packed extra codes."""
        s = self.settings
        row = store.codebook.row(b)
        m = round(s.refine_fraction * x.shape[0])
        worst = np.sort(np.argsort(-np.array(residual_energy(x, idx, coef, row)), kind="stable")[:m])
        flags = np.zeros(x.shape[0], dtype=bool)
        flags[worst] = True
        self.stats["vectors_refined"] += m
        if m == 0:
            return mx.array(flags), mx.zeros((0, store.refine_layout.nbytes), dtype=mx.uint8)
        chosen = mx.array(worst.astype(np.int32))  # only the refined vectors' residuals are decoded
        ri, rc = sparse_encode(x[chosen] - sparse_decode(idx[chosen], coef[chosen], row), row, s=s.refine_atoms,
                               quantize=store.quantizer(b))
        return mx.array(flags), pack_codes(ri[:, None], rc[:, None], store.refine_layout, scale=store.scale[b])

    # -- decoding -----------------------------------------------------------------------------------
    def _decode(self, kind: str):
        store = self.stores[kind]
        if store.codes is None:
            return None
        B, T, _ = store.codes.shape
        s_n = 1 if kind == "keys" else self.settings.s_n_values
        H, k = store.layout.groups // s_n, store.layout.k
        idx, coef = unpack_codes(store.codes.reshape(B * T, -1), store.layout, scale=store.token_scales(T))  # (B·T, H·s_n, k)
        if store.refine_codes is not None and store.refine_codes.shape[1]:
            idx, coef = _with_refinement(store, idx.reshape(B, T * H * s_n, k), coef.reshape(B, T * H * s_n, k))
            k = idx.shape[-1]
        per_head = lambda a: a.reshape(B, T, H, s_n, k).transpose(0, 2, 1, 3, 4)
        idx = store.codebook.batch_index(per_head(idx))
        x = sparse_decode(idx, per_head(coef), store.codebook.batch_table()).reshape(B, H, T, -1)  # every row at once
        if store.unwhiten is not None:
            x = whiten_heads(store.unwhiten, x)
        return x if store.center is None else x + store.center[None, :, None, :]

    def _decoded_keys(self) -> mx.array:
        keys = self._decode("keys")
        return self.keys[:, :, :0] if keys is None else rotate(keys, self.rope, self.sink_keys.shape[2]).astype(self.keys.dtype)

    def _decoded_values(self) -> mx.array:
        values = self._decode("values")
        return self.values[:, :, :0] if values is None else values.astype(self.values.dtype)


def _with_refinement(store: _KindStore, idx: mx.array, coef: mx.array) -> tuple[mx.array, mx.array]:
    """idx, coef: (B, n, k) per coded vector → (B, n, k + e): each refined vector's e extra atoms appended, the
    other vectors' extra slots empty (atom 0, coefficient 0), so one gather decodes both (as the torch runtime)."""
    B, n, k = idx.shape
    layout, R = store.refine_layout, store.refine_codes.shape[1]
    r_idx, r_coef = unpack_codes(store.refine_codes.reshape(B * R, -1), layout, scale=store.token_scales(R))
    flags = np.array(unpack_bits(store.refine_mask, n))  # (B, n)
    rows, vectors = np.nonzero(flags)
    rank = (np.cumsum(flags, axis=1) - 1)[rows, vectors]  # each refined vector's place among its row's codes
    extra_idx = np.zeros((B * n, layout.k), dtype=np.int32)
    extra_coef = np.zeros((B * n, layout.k), dtype=np.float32)
    extra_idx[rows * n + vectors] = np.array(r_idx.reshape(B * R, -1))[rows * R + rank]
    extra_coef[rows * n + vectors] = np.array(r_coef.reshape(B * R, -1))[rows * R + rank]
    return (mx.concatenate([idx, mx.array(extra_idx).reshape(B, n, -1).astype(idx.dtype)], axis=-1),
            mx.concatenate([coef, mx.array(extra_coef).reshape(B, n, -1)], axis=-1))


def model_fingerprint(model, model_id: str = "model") -> ModelFingerprint:
    """The architecture fields of an mlx-lm model, as `csr_core.models.model_fingerprint` reads them in torch."""
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
    sparsity_keys: int | list[int] | None = None,
    sparsity_values: int | list[int] | None = None,
    code_bits_per_channel: float | None = None,
    key_weight: float | None = None,
    method: str = "mp",
    online_atoms: int | None = None,
    online_sampling: str = "reverse",
    guard_atoms: int | None = None,
    guard_threshold: float | None = None,
    window: int | None = None,
    coding_batch: int | None = None,
    refine_fraction: float | None = None,
    refine_atoms: int | None = None,
    sink_tokens: int | None = None,
    index_bits: int | None = defaults.INDEX_BITS,
    coef_format: str | None = None,
    model_id: str = "model",
) -> list[CSRKVCache]:
    """A `prompt_cache` (one CSRKVCache per layer) for an mlx-lm Llama-family model; same options as CSRCache."""
    fingerprint = model_fingerprint(model, model_id)
    if not isinstance(dictionary, DictionaryFile):
        dictionary = load_dictionary(dictionary, model=fingerprint)
    else:
        dictionary.check_model(fingerprint)
    o = cache_settings(dictionary, method=method, online_sampling=online_sampling, index_bits=index_bits,
                       sparsity=sparsity, sparsity_keys=sparsity_keys, sparsity_values=sparsity_values,
                       code_bits_per_channel=code_bits_per_channel, key_weight=key_weight, online_atoms=online_atoms,
                       guard_atoms=guard_atoms, guard_threshold=guard_threshold, window=window,
                       coding_batch=coding_batch, refine_fraction=refine_fraction, refine_atoms=refine_atoms,
                       sink_tokens=sink_tokens, coef_format=coef_format)
    settings = CSRSettings(sparsity_keys=o["sparsity_keys"], sparsity_values=o["sparsity_values"],
                           s_n_values=dictionary.values.s_n, **{k: o[k] for k in SETTING_FIELDS})
    kinds = (("keys", dictionary.keys), ("values", dictionary.values))
    whitening = lambda l: {kind: (d.whiten[l], d.unwhiten[l]) for kind, d in kinds if d.whiten is not None}
    centers = lambda l: {kind: d.center[l] for kind, d in kinds if d.center is not None}
    return [CSRKVCache(l, dictionary.keys.for_layer(l), dictionary.values.for_layer(l), layer.self_attn.rope, settings,
                       whitening(l), centers(l))
            for l, layer in enumerate(model.layers)]


def install(model, dictionary: str | os.PathLike | DictionaryFile, **options) -> None:
    """Make mlx-lm build CSR caches for `model`: `make_prompt_cache(model)` — and so `generate` and
    `stream_generate` without a prompt cache of their own, and whatever else in mlx-lm builds its cache that
    way — returns a fresh CSR cache (the dictionary is read once); batched paths (`batch_generate`, the server's
    batching) merge those into `BatchCSRKVCache`s. `options` are `make_csr_cache`'s. Undo with
    `del model.make_cache`."""
    if not isinstance(dictionary, DictionaryFile):
        dictionary = load_dictionary(dictionary, model=model_fingerprint(model, options.get("model_id", "model")))
    make_csr_cache(model, dictionary, **options)  # a bad option fails here, not at the first request
    model.make_cache = lambda: make_csr_cache(model, dictionary, **options)


def cache_nbytes(prompt_cache: list) -> int:
    return sum(c.nbytes for c in prompt_cache)
