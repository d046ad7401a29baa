"""The codebook one kind (keys or values) of one cache layer codes with, per batch row (paper §Inference):

    offline atoms (the dictionary file, shared by the layers of a merged group)
  + online atoms  (the prompt's own vectors, unit-normalised: "reverse" takes the most recent first, as
                   the paper's reverse sequential sampling; "uniform" samples at random)
  + guard atoms   (vectors the cache could not code well, stored as their own atom)

A row addresses at most `capacity` = offline + online + guard atoms, so its indices fit in
⌈log2 capacity⌉ bits (`code_layout.row_index_bits`); atoms beyond the budget are refused. Which vectors
become guard atoms is the cache's decision (it knows the coding error); the budget is kept here.
Mirrors `mlx_backend/codebook.py`: same class, fields and methods.
"""

from __future__ import annotations

from typing import Literal

import torch

from csr_core.options import SAMPLINGS

Sampling = Literal["reverse", "uniform"]


class Codebook:
    def __init__(self, offline: torch.Tensor, online_atoms: int, guard_atoms: int, online_sampling: Sampling = "reverse"):
        if online_sampling not in SAMPLINGS:
            raise ValueError(f"online_sampling has to be one of {list(SAMPLINGS)}, got {online_sampling!r}")
        self.offline = offline  # (N_off, w) float32
        self.online_atoms, self.guard_atoms = max(online_atoms, 0), max(guard_atoms, 0)
        self.online_sampling = online_sampling
        self.extra: torch.Tensor | None = None  # (B, M, w) float16: online then guard atoms per row (zeros unused)
        self.n_extra: list[int] = []  # used extra atoms per row
        self.n_online: list[int] = []
        self._rows: dict[int, torch.Tensor] = {}  # b → offline + extra atoms as one tensor, until row b changes

    @property
    def capacity(self) -> int:
        """Atoms a row can address: offline + online + guard."""
        return self.offline.shape[0] + self.online_atoms + self.guard_atoms

    def to(self, device) -> None:
        self.offline = self.offline.to(device)

    def row(self, b: int) -> torch.Tensor:
        """(N_off + used extra atoms, w) float32: what row b's indices point into."""
        if self.extra is None or self.n_extra[b] == 0:
            return self.offline
        if b not in self._rows:
            self._rows[b] = torch.cat([self.offline, self.extra[b, : self.n_extra[b]].float()])
        return self._rows[b]

    def rows_share_atoms(self) -> bool:
        """Whether every row addresses the offline atoms alone (no online or guard atoms added to any row)."""
        return self.extra is None or not any(self.n_extra)

    def batch_table(self) -> torch.Tensor:
        """(N_off + B·M, w) float32: the offline atoms, then every row's M extra slots — one table for all rows,
        what `batch_index` points into (rows decode in one gather instead of one per row)."""
        if self.extra is None or self.extra.shape[1] == 0:
            return self.offline
        return torch.cat([self.offline, self.extra.flatten(0, 1).float()])

    def batch_index(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, ...) row-local indices (offline first, then the row's extra atoms) → indices into `batch_table`."""
        if self.extra is None or self.extra.shape[1] == 0:
            return idx
        n_offline, slots = self.offline.shape[0], self.extra.shape[1]
        offset = torch.arange(idx.shape[0], device=idx.device).view(-1, *[1] * (idx.ndim - 1)) * slots
        return torch.where(idx >= n_offline, idx + offset.to(idx.dtype), idx)

    def add_online(self, b: int, candidates: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Row b's online atoms from its own (n, w) vectors in time order (zero vectors skipped). Returns how many."""
        candidates = candidates[candidates.norm(dim=-1) > 0]
        if self.online_sampling == "reverse":  # most recent first, going backwards
            picked = candidates.flip(0)[: self.online_atoms]
        else:
            order = torch.randperm(len(candidates), generator=generator)[: self.online_atoms]
            picked = candidates[order.to(candidates.device)]
        added = self._append(b, picked, self.offline.shape[0] + self.online_atoms)
        self.n_online[b] = self.n_extra[b]
        return added

    def guard_room(self, b: int) -> int:
        """Guard atoms row b can still take."""
        used = self.n_extra[b] - self.n_online[b] if self.extra is not None else 0
        return max(self.guard_atoms - used, 0)

    def add_guard(self, b: int, vectors: torch.Tensor) -> int:
        """Vectors (n, w) become row b's guard atoms, as many as the budget allows. Returns how many."""
        return self._append(b, vectors, self.capacity)

    def _append(self, b: int, atoms: torch.Tensor, limit: int) -> int:
        room = limit - self.offline.shape[0] - self.n_extra[b]
        take = min(len(atoms), max(room, 0))
        if take == 0:
            return 0
        need = self.n_extra[b] + take - self.extra.shape[1]
        if need > 0:
            self.extra = torch.cat([self.extra, self.extra.new_zeros(self.extra.shape[0], need, self.extra.shape[2])], dim=1)
        unit = torch.nn.functional.normalize(atoms[:take].float(), dim=-1)
        self.extra[b, self.n_extra[b] : self.n_extra[b] + take] = unit.to(torch.float16)
        self.n_extra[b] += take
        self._rows.pop(b, None)
        return take

    def start(self, batch: int) -> None:
        """Empty extra parts for a batch of rows (called when the first vectors are coded)."""
        if self.extra is None:
            self.extra = torch.zeros(batch, 0, self.offline.shape[1], dtype=torch.float16, device=self.offline.device)
            self.n_extra, self.n_online = [0] * batch, [0] * batch

    def select_rows(self, rows: torch.Tensor) -> None:
        """Row i becomes old row rows[i] (beam search, batch selection)."""
        if self.extra is not None:
            self.extra = self.extra.index_select(0, rows.to(self.extra.device))
            self.n_extra = [self.n_extra[r] for r in rows.tolist()]
            self.n_online = [self.n_online[r] for r in rows.tolist()]
        self._rows.clear()

    def reset(self) -> None:
        self.extra, self.n_extra, self.n_online = None, [], []
        self._rows.clear()

    def forget_memo(self) -> None:
        """Drop the concatenated rows: nothing is held between steps that `held_tensors` does not count."""
        self._rows.clear()

    def held_tensors(self) -> list[torch.Tensor]:
        return [] if self.extra is None else [self.extra]
