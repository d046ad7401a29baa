"""`CSRCache`: a `transformers` Cache that holds the KV cache as CSR codes (paper §Inference).

Each layer's cache (`CSRLayer`, a `CacheLayerMixin` as `QuantizedLayer` is) stores, per token, the
(index, coefficient) pairs of every KV head's key (s atoms) and value (s_n · s_v atoms), **bit-packed**
(`code_packing.py`): indices in ⌈log2(atoms a row can address)⌉ bits, coefficients in fp8 (E4M3,
one power-of-two scale per layer, kind and batch row; MP rounds each coefficient before updating its residual),
5-bit e3m1 floats (same scale, in the bit stream), int8 with a per-vector scale, or fp16;
`index_bits=16, coef_format="fp16"` is the paper's int16 + fp16
layout. Keys are coded **before RoPE**: the attention hands the cache rotated keys, the cache
un-rotates them with the model's own rotary embedding, codes them, and rotates the reconstruction
again when the keys are read. With a file that carries a center μ, vectors are coded relative to it
(x − μ, keys before RoPE); with an attention-metric file (`metric.py`) they are whitened (A (x − μ))
before coding and un-whitened (A⁻¹ x̂ + μ) after decoding.

Per layer, kind and batch row the dictionary is a `Codebook` (`codebook.py`): offline atoms (the
dictionary file) + online atoms (the prompt's own vectors) + guard atoms, which this cache chooses:
vectors whose relative MP residual stays above `guard_threshold`, stored as their own atom so they are
reproduced almost exactly (prefill and decode alike).

With `refine_fraction` > 0 the worst-coded share of each coding call's vectors (per row: the largest squared
residual in the coding space) get `refine_atoms` more atoms, MP continued on their residual; their codes are
stored apart, in the order of the vectors, with one bit per coded vector saying which have them (a vector's
code length follows its error, at the price of that bit).

The first `sink_tokens` tokens (attention sinks, as in StreamingLLM) and the newest `window` tokens
can be kept in full precision. Tokens past the window are coded once `coding_batch` of them have gathered
(a prefill or chunk at once; in token-by-token decoding every 8th step by default): coding one vector costs
about as much as coding eight, since a decode step's few vectors leave matching pursuit bound by the count
of tensor operations. Until then they are held exact and counted like the window; every vector gets the code
it would have got alone (MP codes each vector on its own). Left padding is recognised from `position_ids`
(a row's real tokens start at its last position 0): padding never becomes an online or guard atom. Every tensor the cache
holds is counted by `memory_bytes()`.

Reading the cache rebuilds every coded key (rotated) and value each step: on the CPU in one pass of a C kernel
(`native.py`, built on first use), elsewhere — CUDA, whitened codes, no compiler — with PyTorch operations that
compute the same. With the "csr_codes" attention (`attention.py`) nothing is rebuilt: a decode step's keys are
scored and its values aggregated from the codes (`CodedKeys`, `CodedValues`). Rows of a batch that share their
atoms and coefficient scale are coded in one MP call, and the refinement handles the batch's rows at once.

Where we depart from the paper: it leaves the guard rule open; ours is the residual threshold above.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from csr_core import defaults
from csr_core.code_layout import row_index_bits
from csr_core.dictionary_file import DictionaryFile, ModelFingerprint, load_dictionary
from csr_core.models import check_supported, model_fingerprint
from csr_core.settings import SETTING_FIELDS, cache_settings
from csr_runtime import native
from csr_runtime.attention import CSR_ATTENTION, CodedKeys, CodedValues
from csr_runtime.batch_rows import BatchRowsMixin
from csr_runtime.code_packing import (
    CodeLayout,
    CoefficientRounding,
    CoefFormat,
    append_bits,
    coefficient_scale,
    count_bits,
    pack_bits,
    pack_codes,
    unpack_bits,
    unpack_codes,
)
from csr_runtime.codebook import Codebook, Sampling
from csr_runtime.metric import apply as whiten_heads
from csr_runtime.rope import rope_cos_sin, rotate_into, unrotate
from csr_runtime.sparse_coding import Method, residual_energy, sparse_decode, sparse_encode, split_chunks


@dataclass
class CSRSettings:
    """How a layer codes: shared by every layer of a `CSRCache`."""

    sparsity_keys: list[int]  # per layer
    sparsity_values: list[int]  # per layer, per chunk
    s_n_values: int
    method: Method = "mp"
    online_atoms: int = defaults.ONLINE_ATOMS  # per layer, kind and batch row
    online_sampling: Sampling = "reverse"
    guard_atoms: int = defaults.GUARD_ATOMS
    guard_threshold: float = defaults.GUARD_THRESHOLD  # relative residual ‖x − x̂‖² / ‖x‖² above which a vector becomes a guard atom
    window: int = defaults.WINDOW  # newest tokens kept in full precision
    coding_batch: int = defaults.CODING_BATCH  # tokens past the window are coded once this many have gathered
    refine_fraction: float = defaults.REFINE_FRACTION  # share of each coding call's vectors (per row) refined
    refine_atoms: int = defaults.REFINE_ATOMS  # atoms a refined vector gets on top of its code
    sink_tokens: int = defaults.SINK_TOKENS  # first tokens of each row kept in full precision (attention sinks)
    index_bits: int | None = defaults.INDEX_BITS  # None: ⌈log2(atoms a row can address)⌉; 16 with fp16 is the paper's layout
    coef_format: CoefFormat = defaults.COEF_FORMAT
    seed: int = 0


@dataclass
class _KindStore:
    """Codes and per-row extra atoms of one kind (keys or values) in one layer."""

    codebook: Codebook  # offline (shared with the other layers of the group) + each row's online and guard atoms
    whiten: torch.Tensor | None = None  # (H, d_h, d_h) A of the attention metric: atoms live in the space of A (x − μ)
    center: torch.Tensor | None = None  # (H, d_h) μ, the calibration mean every vector is coded relative to
    unwhiten: torch.Tensor | None = None  # A⁻¹
    layout: CodeLayout | None = None  # how one token's (H · s_n · k) pairs are bit-packed
    scale: torch.Tensor | None = None  # (B,) fp8/e3m1 power-of-two scale per row, fixed at its first coded tokens
    codes: torch.Tensor | None = None  # (B, T, layout.nbytes) uint8
    refine_layout: CodeLayout | None = None  # one refined vector's extra atoms
    refine_mask: torch.Tensor | None = None  # (B, ⌈T · H · s_n / 8⌉) uint8: a bit per coded vector, token-major
    refine_codes: torch.Tensor | None = None  # (B, R, refine_layout.nbytes) uint8: row b's refined vectors in order

    def scales_for(self, n: int):
        """The coefficient scale to unpack n codes per row with: one float when every row shares it (always at
        batch 1: folded into e3m1's table instead of a pass over the codes), else each code's row scale."""
        return float(self.scale[0]) if bool((self.scale == self.scale[0]).all()) else self.token_scales(n)

    def quantizer(self, b: int):
        """What MP rounds row b's coefficients to (None: int8's per-vector scale is known only after coding)."""
        fmt, scale = self.layout.coef_format, float(self.scale[b])
        return None if fmt == "int8" else CoefficientRounding(fmt, scale)

    def token_scales(self, tokens: int) -> torch.Tensor:
        """(B · tokens, 1, 1): each token's row scale, in the (row, token) order of the packed codes."""
        return self.scale.repeat_interleave(tokens)[:, None, None]


class CSRLayer(BatchRowsMixin, CacheLayerMixin):
    """One layer's CSR cache. Sequence slots, per row: [sinks (exact)] [coded] [window (exact)]."""

    is_sliding = False
    is_croppable = True

    def __init__(self, layer_idx: int, key_atoms: torch.Tensor, value_atoms: torch.Tensor, rotary_emb, settings: CSRSettings,
                 step_memo: dict | None = None, last_layer: bool = True, whitening: dict | None = None,
                 centers: dict | None = None, config=None):
        super().__init__()
        self.config = config  # the model's: with attention "csr_codes", values go to the attention as codes
        self.layer_idx = layer_idx
        # shared by the layers of a step: cos/sin of the coded positions (the same for every layer: the first layer
        # of a step computes them) and the step buffers; the last layer frees them (nothing is held between steps)
        self.step_memo = {} if step_memo is None else step_memo
        self.rope_repeats_halves: bool | None = None  # whether cos/sin repeat their first half (found at first use)
        self.last_layer = last_layer
        self.settings = settings
        self.rotary_emb = rotary_emb
        codebook = lambda atoms: Codebook(atoms, settings.online_atoms, settings.guard_atoms, settings.online_sampling)
        self.stores = {"keys": _KindStore(codebook(key_atoms)), "values": _KindStore(codebook(value_atoms))}
        for kind, (A, A_inv) in (whitening or {}).items():  # kind → (A, A⁻¹), each (H, d_h, d_h)
            self.stores[kind].whiten, self.stores[kind].unwhiten = A, A_inv
        for kind, center in (centers or {}).items():  # kind → μ (H, d_h)
            self.stores[kind].center = center
        self.index_bits = {kind: row_index_bits(settings.index_bits, store.codebook.offline.shape[0], settings.online_atoms,
                                               settings.guard_atoms) for kind, store in self.stores.items()}
        self.n_pad: torch.Tensor | None = None  # (B,) leading padding tokens per row
        self.sink_keys = self.sink_values = None  # (B, H, S, d_h) exact first tokens (keys after RoPE)
        self.n_sink_slots = 0  # slots held exact at the front: every row's padding + settings.sink_tokens
        self.n_coded = 0
        self.stats = {"guard_atoms": 0, "atoms_refused": 0, "vectors_coded": 0, "vectors_refined": 0}

    # -- protocol ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        B, H, _, d = key_states.shape
        self.keys = key_states.new_zeros(B, H, 0, d)  # the full-precision window (post-RoPE keys)
        self.values = value_states.new_zeros(B, H, 0, value_states.shape[-1])
        self.sink_keys, self.sink_values = self.keys.clone(), self.values.clone()
        for store in self.stores.values():
            store.codebook.to(self.device)
            if store.whiten is not None:
                store.whiten, store.unwhiten = store.whiten.to(self.device), store.unwhiten.to(self.device)
            if store.center is not None:
                store.center = store.center.to(self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states, value_states: (B, H, T, d_h), keys after RoPE → all keys/values of the sequence so far."""
        # a sum is finite where every term is (one pass, no mask); only a non-finite sum checks term by term
        if not (torch.isfinite(key_states.sum()) and torch.isfinite(value_states.sum())) and not (
                torch.isfinite(key_states).all() and torch.isfinite(value_states).all()):
            raise ValueError(f"layer {self.layer_idx}: non-finite keys or values reached the CSR cache")
        positions = _position_ids(kwargs, key_states, self.get_seq_length())
        prefill = not self.is_initialized
        if prefill:
            self.lazy_initialization(key_states, value_states)
            self.n_pad = _leading_padding(positions)
            self.n_sink_slots = int(self.n_pad.max()) + self.settings.sink_tokens if self.settings.sink_tokens else 0
        self._check_positions(positions)
        # The attention of this call sees the compressed past plus its own tokens exactly (as in
        # transformers' QuantizedLayer); the new tokens are coded for later calls afterwards.
        as_codes = getattr(self.config, "_attn_implementation", None) == CSR_ATTENTION
        # a few new tokens (a decode step) score the coded keys from their codes; a long chunk is a matrix product
        coded_keys = self._kernel_codes("keys") if as_codes and key_states.shape[2] <= 8 else None
        if coded_keys is None:
            keys_out = self._assemble("keys", self.keys, key_states)
        if not as_codes:
            values_out = self._assemble("values", self.values, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if as_codes:  # the window now ends with the new tokens; the codes are read before this call's are added
            values_out = self._coded_values()
            if coded_keys is not None:
                keys_out = CodedKeys(self.sink_keys, self.keys, coded_keys, *self._kernel_cos_sin())
        overflow = self.keys.shape[-2] - self.settings.window
        if overflow >= self.settings.coding_batch:  # fewer wait, exact: coding one token costs as much as eight
            old_k, old_v = self.keys[..., :overflow, :], self.values[..., :overflow, :]
            # clone: a slice would keep the whole older tensor alive, uncounted by memory_bytes()
            self.keys, self.values = self.keys[..., overflow:, :].clone(), self.values[..., overflow:, :].clone()
            to_sink = min(self.n_sink_slots - self.sink_keys.shape[-2], overflow)  # sinks fill before anything is coded
            if to_sink > 0:
                self.sink_keys = torch.cat([self.sink_keys, old_k[..., :to_sink, :]], dim=-2)
                self.sink_values = torch.cat([self.sink_values, old_v[..., :to_sink, :]], dim=-2)
            if overflow > max(to_sink, 0):
                self._code(old_k[..., max(to_sink, 0):, :], old_v[..., max(to_sink, 0):, :], build_online=self.n_coded == 0)
        self._forget_memos()
        return keys_out, values_out

    def _forget_memos(self) -> None:
        """Hold nothing between steps that memory_bytes() does not count (the last layer frees the shared cos/sin)."""
        for store in self.stores.values():
            store.codebook.forget_memo()
        if self.last_layer:
            self.step_memo.clear()

    def crop(self, max_length: int) -> None:
        """Drop the newest tokens: `crop(-n)` removes n (transformers 5), `crop(L)` keeps the first L (4.x).

        The window loses its tokens first, then the codes, then the sinks; atoms already added stay."""
        seq = self.get_seq_length()
        keep = seq + max_length if max_length <= 0 else max_length  # crop(0): nothing to remove (transformers 5)
        if not self.is_initialized or keep >= seq:
            return
        keep = max(keep, 0)
        front = self._sink_len() + self.n_coded
        window_keep = max(keep - front, 0)
        self.keys, self.values = self.keys[..., :window_keep, :].clone(), self.values[..., :window_keep, :].clone()
        coded_keep = min(max(keep - self._sink_len(), 0), self.n_coded)
        if coded_keep < self.n_coded:
            for store in self.stores.values():
                store.codes = store.codes[:, :coded_keep].clone()
                if store.refine_mask is not None:
                    vectors = store.layout.groups
                    flags = unpack_bits(store.refine_mask, coded_keep * vectors)
                    store.refine_mask = pack_bits(flags)
                    store.refine_codes = store.refine_codes[:, : int(flags.sum(1).max())].clone()
            self.n_coded = coded_keep
        if keep < self._sink_len():
            self.sink_keys, self.sink_values = self.sink_keys[..., :keep, :].clone(), self.sink_values[..., :keep, :].clone()

    def reset(self) -> None:
        """Forget the sequence (codes, online and guard atoms, the fp8 scale): the layer is as new."""
        self.keys = self.values = self.sink_keys = self.sink_values = self.n_pad = None
        self.n_sink_slots = self.n_coded = 0
        for store in self.stores.values():
            store.codebook.reset()
            store.layout, store.scale, store.codes = None, None, None
            store.refine_layout, store.refine_mask, store.refine_codes = None, None, None
        self.step_memo.clear()
        self.stats = dict.fromkeys(self.stats, 0)
        self.is_initialized = False

    def _take_rows(self, rows: torch.LongTensor) -> None:
        """Row i of the cache becomes old row rows[i]: its window, sinks, codes and its own extra atoms."""
        pick = lambda t: t.index_select(0, rows)
        self.keys, self.values = pick(self.keys), pick(self.values)
        self.sink_keys, self.sink_values, self.n_pad = pick(self.sink_keys), pick(self.sink_values), pick(self.n_pad)
        for store in self.stores.values():
            if store.codes is not None:
                store.codes, store.scale = pick(store.codes), pick(store.scale)
            if store.refine_mask is not None:
                store.refine_mask, store.refine_codes = pick(store.refine_mask), pick(store.refine_codes)
            store.codebook.select_rows(rows)
        self.step_memo.clear()

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self._sink_len() + self.n_coded + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _sink_len(self) -> int:
        return self.sink_keys.shape[-2]

    # -- positions --------------------------------------------------------------------------------
    def _positions(self, start: int, length: int) -> torch.Tensor:
        """(B, length) RoPE positions of sequence slots start..start+length-1 (padding slots: 0)."""
        t = torch.arange(start, start + length, device=self.device)
        return (t[None] - self.n_pad[:, None]).clamp_min(0)

    def _check_positions(self, positions: torch.Tensor) -> None:
        start = self.get_seq_length()
        memo_key = ("positions checked", start, positions.data_ptr(), tuple(positions.shape))
        if memo_key in self.step_memo:  # every layer of a step gets the same position_ids: one check per step
            return
        self.step_memo[memo_key] = True
        expected = self._positions(start, positions.shape[1])
        real = torch.arange(start, start + positions.shape[1], device=self.device)[None] >= self.n_pad[:, None]
        if not torch.equal(positions[real], expected[real]):
            raise ValueError(
                f"layer {self.layer_idx}: position_ids do not continue the cached sequence (expected row-wise "
                f"positions counting from each row's first real token); CSRCache supports left padding only"
            )

    # -- coding -----------------------------------------------------------------------------------
    def _code(self, keys_rotated: torch.Tensor, values: torch.Tensor, *, build_online: bool) -> None:
        """Code (B, H, T, d) post-RoPE keys and values of the next T coded slots and append their packed codes."""
        B, H, T, d = keys_rotated.shape
        first = self._sink_len() + self.n_coded  # sequence slot of the first vector coded here
        keys = unrotate(keys_rotated.float(), *self._cos_sin(first, T))
        real = torch.arange(first, first + T, device=self.device)[None] >= self.n_pad[:, None]  # (B, T)
        s = self.settings
        l = self.layer_idx
        for kind, x, k, s_n in (("keys", keys, s.sparsity_keys[l], 1), ("values", values.float(), s.sparsity_values[l], s.s_n_values)):
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
                store.scale = torch.tensor([coefficient_scale(s.coef_format, float(chunks[b].norm(dim=-1).max()))
                                            for b in range(B)], device=self.device)
            store.codebook.start(B)
            if build_online:
                self._add_online(store, chunks, real)
            idx, coef = self._encode_rows(store, chunks, k)  # (B, H, T, s_n·k)
            idx, coef = self._guard(store, chunks, real, idx, coef, k)
            self._refine(store, chunks, real, idx, coef, k)
            # (B, H, T, s_n·k) → per token (B·T, H·s_n, k) → (B, T, nbytes)
            per_token = lambda t: t.view(B, H, T, s_n, k).permute(0, 2, 1, 3, 4).reshape(B * T, H * s_n, k)
            packed = _pack(per_token(idx), per_token(coef), store.layout, store.token_scales(T)).view(B, T, -1)
            store.codes = packed if store.codes is None else torch.cat([store.codes, packed], dim=1)
        self.n_coded += T
        self.stats["vectors_coded"] += B * H * T

    def _unpacked(self, store: _KindStore, H: int, s_n: int, *, row_local: bool = False, token_major: bool = False,
                  refined: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's codes, unpacked in one call → idx, coef: (B, H, n, s_n, k), or (B, n, H, s_n, k) as stored with
        `token_major`; idx points into `codebook.batch_table()`, or with `row_local` into each row's own atoms
        (offline, then its extras). With `refined`, k + refine_atoms atoms a vector (`_with_refinement`)."""
        B, n = store.codes.shape[:2]
        idx, coef = unpack_codes(store.codes.flatten(0, 1), store.layout, scale=store.scales_for(n))  # (B·n, H·s_n, k)
        shape = (B, n, H, s_n, store.layout.k)
        idx, coef = idx.view(shape), coef.view(shape)
        if refined and _has_refinement(store):
            idx, coef = _with_refinement(store, idx, coef)
        idx = idx if row_local else store.codebook.batch_index(idx)
        if token_major:
            return idx, coef
        return idx.transpose(1, 2), coef.transpose(1, 2)

    def _encode_rows(self, store: _KindStore, chunks: torch.Tensor, k: int):
        B, H, T, s_n, w = chunks.shape
        per_row = self._encode_each_row(store, [chunks[b].reshape(-1, w) for b in range(B)], k)
        return (torch.stack([i.view(H, T, s_n * k) for i, _ in per_row]),
                torch.stack([c.view(H, T, s_n * k) for _, c in per_row]))

    def _encode_each_row(self, store: _KindStore, xs: list[torch.Tensor], k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """MP of each row's vectors xs[b] (n_b, w) over the row's atoms → [(idx, coef)] per row. Rows that address the
        same atoms with the same coefficient scale (no online or guard atoms: the defaults) are coded in one call —
        at a batch of 136 rows, one call per row was a fifth of a decode step's time."""
        if len(xs) > 1 and store.codebook.rows_share_atoms() and bool((store.scale == store.scale[0]).all()):
            idx, coef = sparse_encode(torch.cat(xs), store.codebook.offline, s=k, method=self.settings.method,
                                      quantize=store.quantizer(0), gram_memo=self.step_memo)
            sizes = [len(x) for x in xs]
            return list(zip(idx.split(sizes), coef.split(sizes)))
        return [sparse_encode(x, store.codebook.row(b), s=k, method=self.settings.method, quantize=store.quantizer(b),
                              gram_memo=self.step_memo) for b, x in enumerate(xs)]

    def _add_online(self, store: _KindStore, chunks: torch.Tensor, real: torch.Tensor) -> None:
        if self.settings.online_atoms <= 0:
            return
        g = torch.Generator().manual_seed(self.settings.seed + self.layer_idx)
        for b in range(chunks.shape[0]):
            candidates = chunks[b][:, real[b]].transpose(0, 1).reshape(-1, chunks.shape[-1])  # (T_real·H·s_n, w), time-major
            store.codebook.add_online(b, candidates, g)

    def _guard(self, store: _KindStore, chunks, real, idx, coef, k):
        """Vectors whose relative residual stays above the threshold become guard atoms and are re-coded."""
        s = self.settings
        if s.guard_atoms <= 0:
            return idx, coef
        B, H, T, s_n, w = chunks.shape
        for b in range(B):
            room = store.codebook.guard_room(b)
            if room <= 0:
                continue
            x = chunks[b].reshape(-1, w)
            x_hat = sparse_decode(idx[b].reshape(-1, k), coef[b].reshape(-1, k), store.codebook.row(b))
            rel = ((x - x_hat) ** 2).sum(-1) / (x**2).sum(-1).clamp_min(1e-30)
            rel = rel.view(H, T, s_n).masked_fill(~real[b][None, :, None], 0).flatten()
            worst = rel.argsort(descending=True)[:room]
            worst = worst[rel[worst] > s.guard_threshold]
            if len(worst) == 0:
                continue
            added = store.codebook.add_guard(b, x[worst])
            self.stats["atoms_refused"] += len(worst) - added
            if added == 0:
                continue
            self.stats["guard_atoms"] += added
            recode = worst[:added]
            i, c = sparse_encode(x[recode], store.codebook.row(b), s=k, method=s.method, quantize=store.quantizer(b))
            idx_b, coef_b = idx[b].reshape(-1, k).clone(), coef[b].reshape(-1, k).clone()
            idx_b[recode], coef_b[recode] = i, c
            idx[b], coef[b] = idx_b.view(H, T, s_n * k), coef_b.view(H, T, s_n * k)
        return idx, coef

    def _refine(self, store: _KindStore, chunks, real, idx, coef, k) -> None:
        """The worst-coded `refine_fraction` of this call's real vectors of each row (largest squared residual in the
        coding space; padding never) get `refine_atoms` more atoms: MP continued on their residual. Their codes
        are stored apart, each row's in the order of its vectors, with one bit per coded vector saying which."""
        s = self.settings
        if s.refine_fraction <= 0:
            return
        B, H, T, s_n, w = chunks.shape
        n = T * H * s_n
        codebook = store.codebook
        # every vector's residual energy in coding order (row, head, token, chunk), then token-major per row
        x, i_rows, c_flat = chunks.reshape(-1, w), idx.reshape(B, -1, k), coef.reshape(-1, k)
        shared = codebook.rows_share_atoms()
        table = codebook.offline if shared else codebook.batch_table()
        i_flat = (i_rows if shared else codebook.batch_index(i_rows)).reshape(-1, k)  # into `table`
        energy = residual_energy(x, i_flat, c_flat, table).view(B, H, T, s_n).transpose(1, 2).reshape(B, n)
        is_real = real.repeat_interleave(H * s_n, dim=1)  # (B, n)
        m = (is_real.sum(1).double() * s.refine_fraction).round().long()  # per row: as the row alone would refine
        energy = energy.masked_fill(~is_real, -1.0)
        worst = energy.topk(int(m.max()), dim=1).indices  # (B, max m), worst first
        chosen = torch.arange(worst.shape[1], device=self.device)[None] < m[:, None]
        worst = torch.where(chosen, worst, n).sort(dim=1).values  # each row's refined vectors in their order
        rows, slot = chosen.nonzero(as_tuple=True)  # after the sort, row b's first m[b] entries are its vectors
        where = worst[rows, slot]
        flags = torch.zeros(B, n + 1, dtype=torch.bool, device=self.device).scatter_(1, worst, True)[:, :n]
        self.stats["vectors_refined"] += int(m.sum())
        codes = torch.zeros(0, store.refine_layout.nbytes, dtype=torch.uint8, device=self.device)
        if len(rows):
            # token-major position (token, head, chunk) → the vector's place in coding order; only these are decoded
            token, head, part = where // (H * s_n), where // s_n % H, where % s_n
            at = ((rows * H + head) * T + token) * s_n + part
            residual = x[at] - sparse_decode(i_flat[at], c_flat[at], table)
            coded = self._encode_each_row(store, list(residual.split(m.tolist())), s.refine_atoms)
            r_idx, r_coef = torch.cat([i for i, _ in coded]), torch.cat([c for _, c in coded])
            codes = _pack(r_idx[:, None], r_coef[:, None], store.refine_layout, store.scale[rows][:, None, None])
        before = self.n_coded * H * s_n
        if store.refine_mask is None:
            store.refine_mask, held = pack_bits(flags), torch.zeros(B, dtype=torch.long, device=self.device)
        else:  # each row's codes so far: rows of a left-padded batch may hold different counts
            held = count_bits(store.refine_mask)
            store.refine_mask = append_bits(store.refine_mask, before, flags)
        old = store.refine_codes
        store.refine_codes = torch.zeros(B, int((held + m).max()), store.refine_layout.nbytes, dtype=torch.uint8,
                                         device=self.device)
        if old is not None:
            store.refine_codes[:, : old.shape[1]] = old
        store.refine_codes[rows, held[rows] + slot] = codes

    # -- decoding ---------------------------------------------------------------------------------
    def _assemble(self, kind: str, window: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """(B, H, sinks + n_coded + window + T, d): the sinks, the decoded past (keys rotated again), the
        window, the new tokens, in the dtype of the new tokens."""
        sinks = self.sink_keys if kind == "keys" else self.sink_values
        B, H, T, d = new.shape
        n = self.n_coded
        if n == 0:
            return torch.cat([sinks, window, new], dim=-2)
        store = self.stores[kind]
        out = self._step_buffer(kind, (B, H, sinks.shape[-2] + n + window.shape[-2] + T, d), new.dtype)
        coded_end = sinks.shape[-2] + n
        if self._decode_natively(kind, store, out[:, :, sinks.shape[-2] : coded_end]):
            out[:, :, : sinks.shape[-2]] = sinks
            out[:, :, coded_end : coded_end + window.shape[-2]] = window
            out[:, :, coded_end + window.shape[-2] :] = new
            return out
        s_n = 1 if kind == "keys" else self.settings.s_n_values
        idx, coef = self._unpacked(store, H, s_n, token_major=True, refined=False)  # in the codes' order, read transposed
        table = store.codebook.batch_table()
        x = sparse_decode(idx, coef, table)  # (B, n, H, s_n, w): one gather
        if _has_refinement(store):
            _add_refinement(store, x.view(-1, x.shape[-1]), table)
        x = x.view(B, n, H, d).transpose(1, 2)
        if store.unwhiten is not None:
            x = whiten_heads(store.unwhiten, x)
        # In place where possible, then one concatenation into a buffer the layers of a step share: at 4k tokens
        # one (B, H, n, d) pass costs about as much as the gather, and the first writes into freshly allocated
        # memory several times more than into memory written before (CPU).
        if store.center is not None:
            x += store.center[None, :, None, :]
        if kind == "keys":  # coded before RoPE: rotate to the positions of the coded tokens
            x = rotate_into(self._step_buffer("rotated", x.shape, x.dtype), x, *self._coded_cos_sin())
        return torch.cat([sinks, x.to(new.dtype), window, new], dim=-2, out=out)

    def _decode_natively(self, kind: str, store: _KindStore, coded: torch.Tensor) -> bool:
        """Decode the codes (with refinement, centre and, for keys, RoPE) straight into `coded`, the coded slots of
        the step's buffer, with the fused CPU kernel (`native`); False where it does not apply (whitened
        codes, CUDA, half-precision buffers, `CSR_NATIVE=0`): the caller takes the torch path."""
        if store.unwhiten is not None or coded.device.type != "cpu" or coded.dtype != torch.float32:
            return False
        cos, sin = self._kernel_cos_sin() if kind == "keys" else (None, None)
        return native.decode_into(coded, self._packed(kind), cos, sin)

    def _packed(self, kind: str) -> native.PackedCodes:
        """One kind's codes as they stand (the kernels' view of them; later coding replaces, never edits, them)."""
        store = self.stores[kind]
        return native.PackedCodes(store.codes, store.layout, store.scale, store.codebook.offline, store.codebook.extra,
                                  store.refine_mask, store.refine_codes, store.refine_layout, store.center)

    def _kernel_codes(self, kind: str) -> native.PackedCodes | None:
        """One kind's codes where the attention kernels can read them (`CodedKeys`, `CodedValues`): something is coded,
        not whitened, on the CPU with the kernels built; else None."""
        if self.n_coded == 0 or self.stores[kind].unwhiten is not None:
            return None
        packed = self._packed(kind)
        return packed if native.applies(packed) else None

    def _step_buffer(self, name: str, shape, dtype) -> torch.Tensor:
        """A tensor every layer of a step may use for `name` in turn: what `update` returns is read by the layer's
        attention before the next layer's update writes it again. The last layer frees it (`_forget_memos`)."""
        buffer = self.step_memo.get(("buffer", name))
        if buffer is None or buffer.shape != torch.Size(shape) or buffer.dtype != dtype or buffer.device != self.device:
            buffer = self.step_memo[("buffer", name)] = torch.empty(shape, dtype=dtype, device=self.device)
        return buffer

    def _coded_values(self) -> CodedValues:
        """The values as `csr_runtime.attention` aggregates them: exact sinks, the codes, the exact window (which
        holds the call's new values)."""
        store, H = self.stores["values"], self.values.shape[1]
        if self.n_coded == 0:
            return CodedValues(self.sink_values, self.values, None)
        packed = self._kernel_codes("values")
        if packed is not None:
            return CodedValues(self.sink_values, self.values, packed)  # the kernel reads the packed codes
        packed = self._packed("values")
        idx, coef = self._unpacked(store, H, self.settings.s_n_values, row_local=True)
        return CodedValues(self.sink_values, self.values, packed, idx, coef, store.unwhiten)

    def read_back(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated) and values of every held token, as the next step's attention will read them."""
        empty = lambda t: t[..., :0, :]
        keys = self._assemble("keys", self.keys, empty(self.keys))
        self.step_memo.clear()  # the step buffers are the caller's now
        values = self._assemble("values", self.values, empty(self.values))
        self.step_memo.clear()
        return keys, values

    def _coded_cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, n_coded, d_h) of the coded positions."""
        return self._cos_sin(self._sink_len(), self.n_coded)

    def _kernel_cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the coded positions as the C kernel reads them: one row (1, n_coded, ·) where every row has the
        same positions (a batch of 69 rows at 8k would otherwise stream 145 MB of them per layer), and only their first
        halves where the model's RoPE repeats them in the second (transformers' RoPEs all do)."""
        memo_key = ("kernel", self._sink_len(), self.n_coded, tuple(self.n_pad.tolist()))
        if memo_key not in self.step_memo:
            positions = self._positions(self._sink_len(), self.n_coded)
            if bool((self.n_pad == self.n_pad[0]).all()):
                positions = positions[:1]
            cos, sin = rope_cos_sin(self.rotary_emb, positions, torch.float32)
            half = cos.shape[-1] // 2
            repeated = lambda t: torch.equal(t[..., :half], t[..., half:])
            if self.rope_repeats_halves is None:  # a property of the model's rotary module: checked once
                self.rope_repeats_halves = repeated(cos) and repeated(sin)
            self.step_memo[memo_key] = ((cos[..., :half].contiguous(), sin[..., :half].contiguous())
                                        if self.rope_repeats_halves else (cos, sin))
        return self.step_memo[memo_key]

    def _cos_sin(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, length, d_h) of sequence slots start..start+length-1: the same in every layer, so the first
        layer of a step computes them and the others reuse them (`_forget_memos` frees them after the last)."""
        memo_key = (start, length, tuple(self.n_pad.tolist()))
        if memo_key not in self.step_memo:
            self.step_memo[memo_key] = rope_cos_sin(self.rotary_emb, self._positions(start, length), torch.float32)
        return self.step_memo[memo_key]

    # -- accounting -------------------------------------------------------------------------------
    def held_tensors(self, include_offline: bool = False) -> list[torch.Tensor]:
        """Every tensor this layer holds for the sequence (offline atoms only if asked: they are shared)."""
        out = [t for t in (self.keys, self.values, self.sink_keys, self.sink_values, self.n_pad) if t is not None]
        for store in self.stores.values():
            out += [t for t in (store.codes, store.scale, store.refine_mask, store.refine_codes) if t is not None]
            out += store.codebook.held_tensors()
            if include_offline:
                out.append(store.codebook.offline)
        return out


def _pack(idx: torch.Tensor, coef: torch.Tensor, layout: CodeLayout, scale: torch.Tensor) -> torch.Tensor:
    """`pack_codes`, in one kernel call where it applies (CPU, e3m1: `native.pack_e3m1`, the same bytes)."""
    packed = native.pack_e3m1(idx, coef, layout, scale) if native.available() else None
    return pack_codes(idx, coef, layout, scale=scale) if packed is None else packed


def _has_refinement(store: _KindStore) -> bool:
    return store.refine_codes is not None and store.refine_codes.shape[1] > 0


def _refinement(store: _KindStore, vectors: int, *, batch_table: bool):
    """The refinement codes of the refined vectors, in the order of (rows, where) — their rows and token-major
    vector positions: idx (m, e) pointing into `codebook.batch_table()` or, without `batch_table`, into each row's
    own atoms; coef (m, e)."""
    B, R = store.refine_codes.shape[:2]
    r_idx, r_coef = unpack_codes(store.refine_codes.flatten(0, 1), store.refine_layout, scale=store.scales_for(R))
    r_idx = store.codebook.batch_index(r_idx.view(B, R, -1)) if batch_table else r_idx.view(B, R, -1)
    r_idx, r_coef = r_idx.flatten(0, 1), r_coef.view(B * R, -1)
    flags = unpack_bits(store.refine_mask, vectors)  # (B, vectors)
    rows, where = flags.nonzero(as_tuple=True)
    if len(where) < B * R:  # rows hold unused slots (left padding, a crop): look each vector's code up
        code = rows * R + (flags.cumsum(1) - 1)[rows, where]  # its row's slot + its place among the row's codes
        r_idx, r_coef = r_idx[code], r_coef[code]
    return r_idx, r_coef, rows, where  # (every slot in use: code i is refined vector i's)


def _add_refinement(store: _KindStore, flat: torch.Tensor, table: torch.Tensor) -> None:
    """flat: (B · vectors, w) decoded vectors (token-major): each refined one gets its extra atoms added (a gather of
    the refined vectors' atoms only). `table` is `codebook.batch_table()`."""
    vectors = flat.shape[0] // store.refine_codes.shape[0]
    r_idx, r_coef, rows, where = _refinement(store, vectors, batch_table=True)
    flat.index_add_(0, rows * vectors + where, sparse_decode(r_idx, r_coef, table))


def _with_refinement(store: _KindStore, idx: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """idx, coef: (B, n, H, s_n, k) → (B, n, H, s_n, k + e), row-local indices: each refined vector's e extra atoms
    appended, the other vectors' extra slots empty (atom 0, coefficient 0), so one gather decodes both."""
    B, n, H, s_n, k = idx.shape
    e, vectors = store.refine_layout.k, n * H * s_n
    r_idx, r_coef, rows, where = _refinement(store, vectors, batch_table=False)
    extra_idx, extra_coef = idx.new_zeros(B * vectors, e), coef.new_zeros(B * vectors, e)
    extra_idx[rows * vectors + where], extra_coef[rows * vectors + where] = r_idx.to(idx.dtype), r_coef
    shape = (B, n, H, s_n, e)
    return torch.cat([idx, extra_idx.view(shape)], -1), torch.cat([coef, extra_coef.view(shape)], -1)


def _position_ids(kwargs: dict, key_states: torch.Tensor, past: int) -> torch.Tensor:
    """(B, T) RoPE positions of the new tokens, from the attention's kwargs (plain positions if absent)."""
    inner = kwargs.get("kwargs") if isinstance(kwargs.get("kwargs"), dict) else kwargs
    positions = inner.get("position_ids") if inner else None
    B, _, T, _ = key_states.shape
    if positions is None:
        positions = torch.arange(past, past + T, device=key_states.device)
    return positions.to(key_states.device).expand(B, T)


def _leading_padding(positions: torch.Tensor) -> torch.Tensor:
    """Left padding per row at prefill: a row's real tokens start at its last position 0."""
    T = positions.shape[1]
    is_zero = positions == 0
    last_zero = torch.where(is_zero, torch.arange(T, device=positions.device), -1).max(dim=1).values
    return last_zero.clamp_min(0)


class CSRCache(Cache):
    """A KV cache stored as CSR codes, for Llama-family `transformers` models.

        cache = CSRCache(model, "dictionary.safetensors", sparsity=4)     # the paper's "CSR-4"
        model.generate(**inputs, past_key_values=cache)

    `sparsity=s` follows the paper's naming: keys with s atoms, values with s / s_n atoms per chunk, s_n
    being the value dictionary's (the paper's 2; 1 for the embedded default), so both cost 32·s/d_h bits
    per channel. Or give `sparsity_keys` / `sparsity_values` directly (one int, or one per layer), or a budget
    `code_bits_per_channel` for the codes, which the cache spends layer by layer where the file's measured
    error curves say atoms help most (`csr_core/allocation.py`). With none of them, the file's stored
    allocation (`neuraldict allocate`) if it has one, else the sparsities it was trained at.
    Options left at None take the setting the dictionary file carries in its `runtime` metadata (the
    settings it was evaluated with, `neuraldict allocate --runtime`), else `csr_core/defaults.py`.
    `coded_layers` limits coding to some layers; the others keep full-precision K/V (counted too).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        dictionary: str | os.PathLike | DictionaryFile,
        *,
        sparsity: int | None = None,
        sparsity_keys: int | list[int] | None = None,
        sparsity_values: int | list[int] | None = None,
        code_bits_per_channel: float | None = None,
        key_weight: float | None = None,
        method: Method = "mp",
        online_atoms: int | None = None,
        online_sampling: Sampling = "reverse",
        guard_atoms: int | None = None,
        guard_threshold: float | None = None,
        window: int | None = None,
        coding_batch: int | None = None,
        refine_fraction: float | None = None,
        refine_atoms: int | None = None,
        sink_tokens: int | None = None,
        index_bits: int | None = defaults.INDEX_BITS,
        coef_format: CoefFormat | None = None,
        coded_layers: list[int] | None = None,
        model_id: str = "model",
    ):
        check_supported(model, model_id)
        fingerprint: ModelFingerprint = model_fingerprint(model, model_id)
        if not isinstance(dictionary, DictionaryFile):
            dictionary = load_dictionary(dictionary, model=fingerprint)
        else:
            dictionary.check_model(fingerprint)
        if dictionary.keys.s_n != 1:
            raise ValueError(f"key dictionaries with s_n = {dictionary.keys.s_n} are not supported by CSRCache; use s_n = 1")
        s_n_v = dictionary.values.s_n
        o = cache_settings(dictionary, method=method, online_sampling=online_sampling, index_bits=index_bits,
                           sparsity=sparsity, sparsity_keys=sparsity_keys, sparsity_values=sparsity_values,
                           code_bits_per_channel=code_bits_per_channel, key_weight=key_weight, online_atoms=online_atoms,
                           guard_atoms=guard_atoms, guard_threshold=guard_threshold, window=window,
                           coding_batch=coding_batch, refine_fraction=refine_fraction, refine_atoms=refine_atoms,
                           sink_tokens=sink_tokens, coef_format=coef_format)
        self.settings = CSRSettings(sparsity_keys=o["sparsity_keys"], sparsity_values=o["sparsity_values"],
                                    s_n_values=s_n_v, **{k: o[k] for k in SETTING_FIELDS})
        self.fingerprint = fingerprint
        coded = sorted(set(range(fingerprint.n_layers) if coded_layers is None else coded_layers))
        if not coded or not set(coded) <= set(range(fingerprint.n_layers)):
            raise ValueError(f"coded_layers must be a non-empty subset of 0..{fingerprint.n_layers - 1}, got {coded_layers}")
        offline = {kind: [torch.from_numpy(a) for a in dictionary.kind(kind).atoms] for kind in ("keys", "values")}
        step_memo: dict = {}
        kinds = (("keys", dictionary.keys), ("values", dictionary.values))
        whitening = lambda l: {kind: (torch.from_numpy(d.whiten[l]), torch.from_numpy(d.unwhiten[l]))
                               for kind, d in kinds if d.whiten is not None}
        centers = lambda l: {kind: torch.from_numpy(d.center[l]) for kind, d in kinds if d.center is not None}
        layers = [
            CSRLayer(l, offline["keys"][dictionary.keys.layer_to_group[l]], offline["values"][dictionary.values.layer_to_group[l]],
                     model.model.rotary_emb, self.settings, step_memo, last_layer=l == coded[-1], whitening=whitening(l),
                     centers=centers(l), config=model.config)
            if l in coded else DynamicLayer()  # a layer left out of coded_layers keeps its KV in full precision
            for l in range(fingerprint.n_layers)
        ]
        self._coded = [layers[l] for l in coded]
        self._offline_atoms = [a for kind in offline.values() for a in kind]
        super().__init__(layers=layers)

    def memory_bytes(self, include_offline: bool = False) -> int:
        """Bytes of every tensor the cache holds for this sequence (+ the shared offline dictionaries if asked)."""
        total = sum(t.nbytes for layer in self._coded for t in layer.held_tensors())
        total += sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers
                     if isinstance(layer, DynamicLayer) and layer.is_initialized)
        if include_offline:
            total += sum(a.nbytes for a in self._offline_atoms)
        return total

    def bits_per_channel(self, include_offline: bool = False) -> float:
        """memory_bytes · 8 / (tokens · layers · 2 (K and V) · kv_heads · d_h), padding included."""
        layer = self._coded[0]
        if not layer.is_initialized:
            return 0.0
        fp = self.fingerprint
        channels = layer.n_pad.shape[0] * layer.get_seq_length() * fp.n_layers * 2 * fp.n_kv_heads * fp.head_dim
        return self.memory_bytes(include_offline) * 8 / channels

    def nominal_bits_per_channel(self) -> float:
        """The packed codes alone, keys and values averaged, no atoms, sinks or window: one token's bytes
        · 8 / (KV heads · d_h), + the refinement's expected bits (a flag per vector, refine_fraction · refine_atoms
        atoms). With the paper's layout (16-bit indices, fp16) and no refinement this is 32 · s · s_n / d_h."""
        fp, s = self.fingerprint, self.settings
        bits = 0
        for layer in self._coded:
            l = layer.layer_idx
            for kind, k, s_n in (("keys", s.sparsity_keys[l], 1), ("values", s.sparsity_values[l], s.s_n_values)):
                layout = CodeLayout(groups=fp.n_kv_heads * s_n, k=k, index_bits=layer.index_bits[kind], coef_format=s.coef_format)
                bits += layout.nbytes * 8
                if s.refine_fraction > 0:
                    atom = CodeLayout(groups=1, k=s.refine_atoms, index_bits=layer.index_bits[kind], coef_format=s.coef_format)
                    bits += layout.groups * (1 + s.refine_fraction * atom.nbytes * 8)
        return bits / (2 * fp.n_kv_heads * fp.head_dim * len(self._coded))

    def stats(self) -> dict[str, int]:
        out = {}
        for layer in self._coded:
            for k, v in layer.stats.items():
                out[k] = out.get(k, 0) + v
        return out
