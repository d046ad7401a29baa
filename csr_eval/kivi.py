"""KIVI baseline (Liu et al. 2024, arXiv 2402.02750): tuning-free asymmetric 2/4-bit KV quantisation.

As in the paper: keys are quantised **per channel** (each channel of a group of G consecutive tokens
shares a scale and zero-point), values **per token** (groups of G consecutive channels of one token),
and the newest `residual_length` tokens stay in full precision; older tokens move to the quantised
part G at a time. Codes are bit-packed (4 codes per byte at 2 bits, 2 at 4 bits) and the scale and
zero-point are fp16, so `memory_bytes()` is what a real implementation stores: KIVI-2 costs
2 + 32/G = 3 bits per channel before the residual, not 2.

Departure from the paper: none in the arithmetic; it has fused CUDA kernels, this is plain torch.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from csr_runtime.batch_rows import BatchRowsMixin


def quantize(x: torch.Tensor, bits: int):
    """Asymmetric uniform quantisation over the last axis (one group).

    x: (..., G) → codes (..., G) uint8 in [0, 2^bits), scale (..., 1) fp16, zero (..., 1) fp16, with
    x ≈ codes · scale + zero and |x − x̂| ≤ scale / 2 up to the fp16 rounding of scale and zero.
    """
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8).to(torch.float16)
    zero = lo.to(torch.float16)
    codes = ((x - zero.float()) / scale.float()).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + zero.float()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., G) uint8 codes of `bits` bits → (..., G·bits/8) bytes."""
    per_byte = 8 // bits
    c = codes.unflatten(-1, (codes.shape[-1] // per_byte, per_byte)).to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    return ((packed.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)).flatten(-2).to(torch.uint8)


class KIVILayer(BatchRowsMixin, CacheLayerMixin):
    is_sliding = False
    is_croppable = True  # within the full-precision residual (assisted decoding); deeper crops raise

    def __init__(self, bits: int = 2, group_size: int = 32, residual_length: int = 128):
        super().__init__()
        if bits not in (2, 4):
            raise ValueError(f"KIVI `bits` has to be one of [2, 4] but got {bits}")
        if residual_length % group_size:
            raise ValueError(f"residual_length ({residual_length}) must be a multiple of group_size ({group_size})")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.quantized: dict[str, list[torch.Tensor]] = {"keys": [], "values": []}  # packed, scale, zero
        self.n_quantized = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        if key_states.shape[-1] % self.group_size:
            raise ValueError(f"head_dim {key_states.shape[-1]} is not a multiple of KIVI's group_size {self.group_size}")
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys_out = torch.cat([self._dequantized("keys"), self.keys, key_states], dim=-2)
        values_out = torch.cat([self._dequantized("values"), self.values, value_states], dim=-2)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        G = self.group_size
        move = (self.keys.shape[-2] - self.residual_length) // G * G
        if move > 0:
            self._quantize(self.keys[..., :move, :], self.values[..., :move, :])
            # clone: a slice would keep the whole older tensor alive, uncounted by memory_bytes()
            self.keys, self.values = self.keys[..., move:, :].clone(), self.values[..., move:, :].clone()
        return keys_out, values_out

    def _quantize(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        B, H, T, d = keys.shape
        G = self.group_size
        # keys per channel: (B, H, T/G, d, G) — a group runs along tokens
        k_groups = keys.float().unflatten(2, (T // G, G)).transpose(-1, -2)
        # values per token: (B, H, T, d/G, G) — a group runs along channels
        v_groups = values.float().unflatten(-1, (d // G, G))
        for kind, groups in (("keys", k_groups), ("values", v_groups)):
            codes, scale, zero = quantize(groups, self.bits)
            new = [pack(codes, self.bits), scale, zero]
            old = self.quantized[kind]
            dim = 2  # token-block axis for keys, token axis for values
            self.quantized[kind] = new if not old else [torch.cat([o, n], dim=dim) for o, n in zip(old, new)]
        self.n_quantized += T

    def _dequantized(self, kind: str) -> torch.Tensor:
        if not self.quantized[kind]:
            return (self.keys if kind == "keys" else self.values)[..., :0, :]
        packed, scale, zero = self.quantized[kind]
        x = dequantize(unpack(packed, self.bits), scale, zero)
        if kind == "keys":  # (B, H, T/G, d, G) → (B, H, T, d)
            x = x.transpose(-1, -2).flatten(2, 3)
        else:  # (B, H, T, d/G, G) → (B, H, T, d)
            x = x.flatten(-2)
        return x.to(self.dtype)

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.n_quantized + self.keys.shape[-2]

    def reset(self) -> None:
        self.keys = self.values = None
        self.quantized = {"keys": [], "values": []}
        self.n_quantized = 0
        self.is_initialized = False

    def crop(self, max_length: int) -> None:
        """Drop the newest tokens: `crop(-n)` removes n (transformers 5), `crop(L)` keeps the first L (4.x)."""
        seq = self.get_seq_length()
        keep = seq + max_length if max_length <= 0 else max_length  # crop(0): nothing to remove (transformers 5)
        if not self.is_initialized or keep >= seq:
            return
        if keep < self.n_quantized:
            raise NotImplementedError(
                f"KIVI cannot crop to {keep} tokens: the first {self.n_quantized} are quantised in groups of "
                f"{self.group_size}. Use a residual_length at least as long as the tokens rolled back "
                f"(assisted decoding: num_assistant_tokens), or DynamicCache")
        self.keys, self.values = self.keys[..., : keep - self.n_quantized, :], self.values[..., : keep - self.n_quantized, :]

    def _take_rows(self, rows: torch.LongTensor) -> None:
        self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)
        self.quantized = {kind: [t.index_select(0, rows) for t in parts] for kind, parts in self.quantized.items()}

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def held_tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.keys, self.values) if t is not None]
        return out + [t for kind in self.quantized.values() for t in kind]


class KIVICache(Cache):
    """KIVI-2 / KIVI-4 as a `transformers` Cache: `KIVICache(n_layers, bits=2)`."""

    def __init__(self, n_layers: int, *, bits: Literal[2, 4] = 2, group_size: int = 32, residual_length: int = 128):
        super().__init__(layers=[KIVILayer(bits, group_size, residual_length) for _ in range(n_layers)])

    def memory_bytes(self) -> int:
        return sum(t.nbytes for layer in self.layers for t in layer.held_tensors())
