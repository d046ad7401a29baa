"""`BatchCSRKVCache`: CSR caches of sequences of different lengths decoded as one batch by mlx-lm
(`batch_generate`, `BatchGenerator`, the server's batching). Mirrors `csr_runtime/batch_rows.py`, the
batch-row operations of transformers' contract.

mlx-lm builds one cache per sequence (`make_prompt_cache`, CSR caches after `cache.install`), then calls
`merge` on them; the batch cache it gets back has to take right-padded prompts (`prepare` / `finalize`),
decode left-padded rows (`make_mask`, a per-row `offset`), and drop, join and hand back rows (`filter`,
`extend`, `extract`). Here each row stays its own `CSRKVCache` (B = 1) — its codes, online and guard
atoms and counters are exactly those of a single run — and the batch only aligns their keys and values
to the right for attention:

    row b's slots:  [ padding (max L − L_b) | row b's cached tokens (L_b) | this call's tokens ]

so a batch decodes what each sequence would decode alone, with padding masked out. Padding of a
right-padded prompt never reaches a row's cache (`prepare(lengths=...)` says how many tokens are real).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import create_causal_mask


class BatchCSRKVCache:
    def __init__(self, rows: list):
        self.rows = list(rows)  # one CSRKVCache (B = 1, or still empty) per sequence
        self._real: list[int] | None = None  # tokens of the prompt being processed that are real, per row

    # -- mlx-lm's batch protocol -------------------------------------------------------------------
    @classmethod
    def merge(cls, caches: list) -> "BatchCSRKVCache":
        """One batch from single-sequence CSR caches (each is copied: the batch never changes them)."""
        rows = []
        for c in caches:
            if isinstance(c, BatchCSRKVCache):
                rows += [r.copy() for r in c.rows]
            elif c.keys is not None and c.keys.shape[0] != 1:
                raise ValueError(f"merge takes single-sequence CSR caches, got one with {c.keys.shape[0]} rows")
            else:
                rows.append(c.copy())
        return cls(rows)

    def prepare(self, *, lengths=None, right_padding=None, left_padding=None) -> None:
        """The next prompt is right-padded: only the first lengths[b] of its tokens are row b's."""
        if left_padding is not None and max(left_padding) > 0:
            raise ValueError("BatchCSRKVCache takes right-padded prompts (mlx-lm's BatchGenerator); left padding of "
                             "the input is not supported")
        self._real = None if lengths is None else [int(n) for n in lengths]

    def finalize(self) -> None:
        """The padded prompt is done; rows already hold only their real tokens."""
        self._real = None

    def filter(self, batch_indices) -> None:
        self.rows = [self.rows[int(i)] for i in batch_indices]
        if self._real is not None:
            self._real = [self._real[int(i)] for i in batch_indices]

    def extend(self, other: "BatchCSRKVCache") -> None:
        self.rows += other.rows

    def extract(self, idx: int):
        """Row idx as a single-sequence CSR cache (a copy)."""
        return self.rows[idx].copy()

    # -- the cache protocol --------------------------------------------------------------------------
    @property
    def offset(self) -> mx.array:
        """(B,) each row's next RoPE position: its own length."""
        return mx.array([r.offset for r in self.rows])

    def _lengths(self) -> list[int]:
        return [r.offset for r in self.rows]

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None, **kwargs):
        lengths = self._lengths()
        longest = max(lengths)
        return create_causal_mask(N, offset=longest, window_size=window_size,
                                  left_padding=mx.array([longest - n for n in lengths]))

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """keys, values: (B, H, T, d_h), keys after RoPE → (B, H, max L + T, d_h), rows aligned to the right."""
        T = keys.shape[2]
        outs = []
        for b, row in enumerate(self.rows):
            real = T if self._real is None else min(T, self._real[b])
            k, v = row.update_and_fetch(keys[b : b + 1, :, :real], values[b : b + 1, :, :real])
            # a padded tail: returned for this call's attention (its queries are padding too), never stored
            outs.append((mx.concatenate([k, keys[b : b + 1, :, real:]], axis=2),
                         mx.concatenate([v, values[b : b + 1, :, real:]], axis=2)))
            if self._real is not None:
                self._real[b] -= real
        width = max(k.shape[2] for k, _ in outs)
        pad = lambda a: mx.pad(a, [(0, 0), (0, 0), (width - a.shape[2], 0), (0, 0)])
        return mx.concatenate([pad(k) for k, _ in outs]), mx.concatenate([pad(v) for _, v in outs])

    def empty(self) -> bool:
        return all(r.empty() for r in self.rows)

    def size(self) -> int:
        return max(self._lengths(), default=0)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        return max((r.trim(n) for r in self.rows), default=0)

    @property
    def state(self) -> list[mx.array]:
        return [a for r in self.rows for a in r.state]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)
