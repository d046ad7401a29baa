"""The batch-row operations of transformers' cache contract, for layers that store per-row state:
beam search (`reorder_cache`), contrastive search and assisted decoding (`batch_select_indices`,
`batch_repeat_interleave`). A layer implements `_take_rows(rows)`: row i becomes old row rows[i]."""

from __future__ import annotations

import torch


class BatchRowsMixin:
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def _select_rows(self, rows) -> None:
        if not self.is_initialized:
            return
        rows = torch.as_tensor(rows, device=self.device)
        self._take_rows(rows.nonzero().flatten() if rows.dtype == torch.bool else rows.long())

    def _take_rows(self, rows: torch.LongTensor) -> None:
        raise NotImplementedError
