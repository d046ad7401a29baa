"""The codebook one kind (keys or values) of one cache layer codes with, per batch row (paper §Inference):

    offline atoms (the dictionary file, shared by the layers of a merged group)
  + online atoms  (the prompt's own vectors, unit-normalised: "reverse" takes the most recent first, as
                   the paper's reverse sequential sampling; "uniform" samples at random)
  + guard atoms   (vectors the cache could not code well, stored as their own atom)

A row addresses at most `capacity` = offline + online + guard atoms, so its indices fit in
⌈log2 capacity⌉ bits; atoms beyond the budget are refused. Mirrors `csr_runtime/codebook.py`: same
class, fields and methods (MLX has no in-place growth, so `extra` is one array per row).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from csr_core.options import SAMPLINGS


class Codebook:
    def __init__(self, offline: mx.array, online_atoms: int, guard_atoms: int, online_sampling: str = "reverse"):
        if online_sampling not in SAMPLINGS:
            raise ValueError(f"online_sampling has to be one of {list(SAMPLINGS)}, got {online_sampling!r}")
        self.offline = offline  # (N_off, w) float32
        self.online_atoms, self.guard_atoms = max(online_atoms, 0), max(guard_atoms, 0)
        self.online_sampling = online_sampling
        self.extra: list[mx.array] | None = None  # per row: (M_b, w) float16, online then guard atoms
        self.n_extra: list[int] = []
        self.n_online: list[int] = []
        self._rows: dict[int, mx.array] = {}

    @property
    def capacity(self) -> int:
        """Atoms a row can address: offline + online + guard."""
        return self.offline.shape[0] + self.online_atoms + self.guard_atoms

    def to(self, device) -> None:
        """MLX arrays live in unified memory: nothing to move (mirrors the torch method)."""

    def row(self, b: int) -> mx.array:
        """(N_off + used extra atoms, w) float32: what row b's indices point into."""
        if self.extra is None or self.n_extra[b] == 0:
            return self.offline
        if b not in self._rows:
            self._rows[b] = mx.concatenate([self.offline, self.extra[b].astype(mx.float32)])
        return self._rows[b]

    def batch_table(self) -> mx.array:
        """(N_off + B·M, w) float32: the offline atoms, then every row's M = online + guard slots — one table for
        all rows, what `batch_index` points into (rows decode in one gather instead of one per row)."""
        if self.extra is None or max(self.n_extra, default=0) == 0:
            return self.offline
        slots, w = self.online_atoms + self.guard_atoms, self.offline.shape[1]
        padded = [mx.concatenate([e.astype(mx.float32), mx.zeros((slots - e.shape[0], w))]) for e in self.extra]
        return mx.concatenate([self.offline, *padded])

    def batch_index(self, idx: mx.array) -> mx.array:
        """idx: (B, ...) row-local indices (offline first, then the row's extra atoms) → indices into `batch_table`."""
        if self.extra is None or max(self.n_extra, default=0) == 0:
            return idx
        n_offline, slots = self.offline.shape[0], self.online_atoms + self.guard_atoms
        offset = (mx.arange(idx.shape[0]) * slots).reshape(-1, *[1] * (idx.ndim - 1)).astype(idx.dtype)
        return mx.where(idx >= n_offline, idx + offset, idx)

    def add_online(self, b: int, candidates: mx.array, generator: np.random.Generator | None = None) -> int:
        """Row b's online atoms from its own (n, w) vectors in time order (zero vectors skipped). Returns how many."""
        c = np.array(candidates)
        c = c[np.linalg.norm(c, axis=-1) > 0]
        if self.online_sampling == "reverse":  # most recent first, going backwards
            picked = c[::-1][: self.online_atoms]
        else:
            picked = c[(generator or np.random.default_rng(0)).permutation(len(c))[: self.online_atoms]]
        added = self._append(b, mx.array(picked.copy()), self.offline.shape[0] + self.online_atoms)
        self.n_online[b] = self.n_extra[b]
        return added

    def guard_room(self, b: int) -> int:
        """Guard atoms row b can still take."""
        used = self.n_extra[b] - self.n_online[b] if self.extra is not None else 0
        return max(self.guard_atoms - used, 0)

    def add_guard(self, b: int, vectors: mx.array) -> int:
        """Vectors (n, w) become row b's guard atoms, as many as the budget allows. Returns how many."""
        return self._append(b, vectors, self.capacity)

    def _append(self, b: int, atoms: mx.array, limit: int) -> int:
        room = limit - self.offline.shape[0] - self.n_extra[b]
        take = min(atoms.shape[0], max(room, 0))
        if take == 0:
            return 0
        unit = atoms[:take].astype(mx.float32)
        unit = unit / mx.maximum(mx.linalg.norm(unit, axis=-1, keepdims=True), 1e-12)
        self.extra[b] = mx.concatenate([self.extra[b], unit.astype(mx.float16)])
        self.n_extra[b] += take
        self._rows.pop(b, None)
        return take

    def start(self, batch: int) -> None:
        """Empty extra parts for a batch of rows (called when the first vectors are coded)."""
        if self.extra is None:
            self.extra = [mx.zeros((0, self.offline.shape[1]), dtype=mx.float16) for _ in range(batch)]
            self.n_extra, self.n_online = [0] * batch, [0] * batch

    def select_rows(self, rows) -> None:
        """Row i becomes old row rows[i] (batch selection)."""
        rows = [int(r) for r in np.array(rows).reshape(-1)]
        if self.extra is not None:
            self.extra = [self.extra[r] for r in rows]
            self.n_extra = [self.n_extra[r] for r in rows]
            self.n_online = [self.n_online[r] for r in rows]
        self._rows.clear()

    def copy(self) -> "Codebook":
        """Shares the offline atoms and every array (immutable); its own per-row lists, an empty memo."""
        new = Codebook.__new__(Codebook)
        new.__dict__.update(self.__dict__, _rows={}, n_extra=list(self.n_extra), n_online=list(self.n_online),
                            extra=None if self.extra is None else list(self.extra))
        return new

    def reset(self) -> None:
        self.extra, self.n_extra, self.n_online = None, [], []
        self._rows.clear()

    def forget_memo(self) -> None:
        """Drop the concatenated rows: nothing is held between steps that `held_tensors` does not count."""
        self._rows.clear()

    def held_tensors(self) -> list[mx.array]:
        return [] if self.extra is None else list(self.extra)
