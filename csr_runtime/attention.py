"""Attention that reads the codes: an attention function for transformers' `AttentionInterface`.

A CSR cache's values are v_t = A⁻¹ Σ_k c_tk D[i_tk] + μ. The attention output Σ_t w_t v_t needs no v_t:

    Σ_t w_t v_t = A⁻¹ (a @ D) + μ Σ_t w_t,     a[n] = Σ_t w_t Σ_k c_tk [i_tk = n]

— scatter the attention weights times the coefficients onto the atoms (a: one weight per atom), then one
product with the dictionary (N × w). The coded values are never rebuilt (`benchmarks/sparse_value_aggregation.py`
measures the scatter alone). Keys cannot be scored that way (RoPE makes q·k position-dependent), but on the CPU
a decode step's coded keys are decoded, rotated and dotted with the queries in one pass of the kernel
(`native.key_scores`): each key's d_h floats stay in registers, only the scores are written.

    import csr_runtime.attention                                # registers "csr_codes"
    model.set_attn_implementation("csr_codes")                  # or from_pretrained(..., attn_implementation=...)
    cache = CSRCache(model, dictionary)                         # sees the setting: hands values over as codes

With "csr_codes" selected, a `CSRLayer` returns its values as `CodedValues` (exact sinks and window, the codes
in between) and, for calls of a few new tokens where the CPU kernel applies, its keys as `CodedKeys`; with any
other attention it returns dense keys and values as always. Values that are plain tensors
(another cache, or layers left out of `coded_layers`) take the dense product, with a one-time notice.
The softmax is eager attention's (float32), so logits match eager attention with the dense CSR path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from csr_runtime import native
from csr_runtime.native import PackedCodes

CSR_ATTENTION = "csr_codes"


@dataclass
class CodedKeys:
    """One layer's keys for one decode call: [front (exact)] [coded] [back (exact)] along the sequence. The coded
    keys are scored from their codes by the CPU kernel (decoded, rotated and dotted with the queries in one pass,
    never stored: `native.key_scores`). The cache hands keys over this way only where that kernel applies."""

    front: torch.Tensor  # (B, H, S, d) sink keys, rotated
    back: torch.Tensor  # (B, H, W + T, d) window and the call's new keys
    packed: PackedCodes  # the coded keys, before RoPE
    cos: torch.Tensor  # (B or 1, n, d or d / 2) of the coded positions, as `native.decode_into` takes them
    sin: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        B, H, _, d = self.back.shape
        return torch.Size((B, H, self.front.shape[2] + self.packed.n_coded + self.back.shape[2], d))

    def scores(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query (B, H, G, T, d), the G query heads of each KV head → (B, H, G, T, S) scaled scores, float32. The
        kernel writes the coded keys' scores straight into their slots (no concatenation: at 69 rows × 8k a layer's
        scores are 20 MB). Without autograd the tensor is a per-thread workspace (`native.workspace`): valid until
        the next call in this thread (the attention turns it into weights at once)."""
        B, H, G, T, d = query.shape
        S0, n = self.front.shape[2], self.packed.n_coded
        out = native.workspace("key_scores", (B, H, G, T, S0 + n + self.back.shape[2]))  # dead after the softmax
        exact = lambda keys: (query @ keys[:, :, None].transpose(-1, -2).to(query.dtype)) * scaling
        out[..., :S0] = exact(self.front)
        out[..., S0 + n :] = exact(self.back)
        native.key_scores(self.packed, (query * scaling).reshape(B, H, G * T, d), self.cos, self.sin,
                          out=out.view(B, H, G * T, -1)[..., S0 : S0 + n])
        return out


@dataclass
class CodedValues:
    """One layer's values for one attention call: [front (exact)] [coded] [back (exact)] along the sequence.

    The coded slots as the cache holds them (`packed`, read by the CPU kernel), or — where that kernel does not
    apply (CUDA, whitened codes, no compiler) — unpacked: idx, coef (B, H, n, s_n, k), idx row-local (offline
    atoms first, then the row's extra atoms). Captured when the cache hands them over, before it codes the
    call's overflow."""

    front: torch.Tensor  # (B, H, S, d) sink values
    back: torch.Tensor  # (B, H, W + T, d) window and the call's new values
    packed: PackedCodes | None  # None: nothing coded yet
    idx: torch.Tensor | None = None  # the torch path's unpacked codes
    coef: torch.Tensor | None = None
    unwhiten: torch.Tensor | None = None  # (H, d, d) A⁻¹

    @property
    def n_coded(self) -> int:
        return 0 if self.packed is None else self.packed.n_coded

    def aggregate(self, weights: torch.Tensor) -> torch.Tensor:
        """weights: (B, H, G, T, S) attention weights of the G query heads of each KV head → (B, H, G, T, d)."""
        S0, n = self.front.shape[2], self.n_coded
        front, coded, back = weights.split([S0, n, weights.shape[-1] - S0 - n], dim=-1)
        out = front @ self.front[:, :, None].to(weights.dtype) + back @ self.back[:, :, None].to(weights.dtype)
        return out if n == 0 else out + self._coded_output(coded.float()).to(out.dtype)

    def _coded_output(self, w: torch.Tensor) -> torch.Tensor:
        """w: (B, H, G, T, n) → Σ_t w_t v_t over the coded slots: (B, H, G, T, d)."""
        B, H, G, T, n = w.shape
        if self.idx is None:  # the kernel: the query heads and queries of a KV head side by side
            return native.weighted_values(self.packed, w.reshape(B, H, G * T, n)).view(B, H, G, T, -1)
        return self._coded_output_torch(w)

    def _coded_output_torch(self, w: torch.Tensor) -> torch.Tensor:
        """a[b, h, g, t, chunk, atom] = Σ_slot w[b, h, g, t, slot] · Σ_k coef[b, h, slot, chunk, k] · [idx = atom],
        split into the shared offline atoms (one product with D) and each row's extra atoms (a batched product)."""
        B, H, G, T, n = w.shape
        s_n, k = self.idx.shape[3], self.idx.shape[4]
        offline_atoms, extra, center = self.packed.offline, self.packed.extra, self.packed.center
        src = (w[..., None, None] * self.coef[:, :, None, None]).transpose(4, 5).reshape(B, H, G, T, s_n, n * k)
        index = self.idx.long().transpose(2, 3).reshape(B, H, 1, 1, s_n, n * k).expand(B, H, G, T, s_n, n * k)
        N = offline_atoms.shape[0]
        offline = index < N
        a = torch.zeros(B, H, G, T, s_n, N, device=w.device)
        a.scatter_add_(-1, torch.where(offline, index, 0), torch.where(offline, src, 0))
        x = a @ offline_atoms.float()
        if extra is not None and extra.shape[1]:
            M = extra.shape[1]
            a = torch.zeros(B, H, G, T, s_n, M, device=w.device)
            a.scatter_add_(-1, torch.where(offline, 0, index - N), torch.where(offline, 0, src))
            x = x + (a.view(B, -1, M) @ extra.float()).view(x.shape)
        x = x.reshape(B, H, G, T, -1)
        if self.unwhiten is not None:
            x = torch.einsum("hij,bhgtj->bhgti", self.unwhiten.float(), x)
        if center is not None:
            x = x + w.sum(-1)[..., None] * center.float()[None, :, None, None, :]
        return x


_noticed = False


def csr_attention(module, query: torch.Tensor, key: torch.Tensor, value, attention_mask: torch.Tensor | None,
                  scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' attention signature: query (B, Hq, T, d), key (B, H, S, d), value a tensor or `CodedValues`
    → (attn_output (B, T, Hq, d), attn_weights (B, Hq, T, S))."""
    global _noticed
    if not isinstance(value, CodedValues):
        if not _noticed:
            warnings.warn(f"{CSR_ATTENTION!r} attention got dense values (not a CSRCache layer): computing the dense "
                          f"product for these", stacklevel=2)
            _noticed = True
        return _dense_attention(module, query, key, value, attention_mask, scaling, dropout)
    if value.n_coded == 0:  # nothing coded yet (a prefill): every value is exact
        return _dense_attention(module, query, key, torch.cat([value.front, value.back], dim=2), attention_mask,
                                scaling, dropout)
    B, Hq, T, d = query.shape
    H = key.shape[1]
    G = Hq // H
    query = query.view(B, H, G, T, d)
    if isinstance(key, CodedKeys):
        scores = key.scores(query, scaling)
    else:
        scores = (query @ key[:, :, None].transpose(-1, -2)) * scaling  # (B, H, G, T, S)
    mask = _full_mask(attention_mask, T, key.shape[2], query.device)
    if mask is not None and mask.dtype == torch.bool:  # SDPA's boolean mask (B, 1, T, S): True = attend
        scores.masked_fill_(~mask[:, :, None], float("-inf"))  # in place: the scores are this call's own tensor
    elif mask is not None:  # an additive float mask (a caller's own 4-D mask)
        scores += mask[:, :, None]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = value.aggregate(weights)
    return out.reshape(B, Hq, T, -1).transpose(1, 2).contiguous(), weights.reshape(B, Hq, T, -1)


def _dense_attention(module, query, key, value, attention_mask, scaling, dropout):
    """Exact values (a prefill before anything is coded, or another cache): PyTorch's fused attention, which never
    materialises the (T × S) weights — at an 8k prefill the eager product would hold gigabytes per layer."""
    T, S = query.shape[2], key.shape[2]
    is_causal = attention_mask is None and T > 1 and T == S  # the mask SDPA's own path would skip too
    mask = None if is_causal else _full_mask(attention_mask, T, S, query.device)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                           is_causal=is_causal,
                                                           dropout_p=dropout if module.training else 0.0,
                                                           enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _full_mask(attention_mask: torch.Tensor | None, T: int, S: int, device) -> torch.Tensor | None:
    """The call's 4-D mask cut to the S keys; where transformers skipped it (no padding), the causal mask it stands
    for: queries are the last T of S positions (None for one query, which sees every key)."""
    if attention_mask is not None:
        return attention_mask[..., :S]
    if T == 1:
        return None
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]


AttentionInterface.register(CSR_ATTENTION, csr_attention)
AttentionMaskInterface.register(CSR_ATTENTION, sdpa_mask)  # boolean, None where SDPA's would be skipped
