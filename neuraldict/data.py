"""The LightningDataModule: KV shards → merged-layer groups → batches of head vectors per dictionary.

`prepare_data` runs the KV collection (train and validation document splits) if its shards are
missing; `setup` groups layers (`merge.py`) and builds one pool of vectors per dictionary, named
``"{kind}/group_{g}"``. A training batch is a dict ``{name: (batch_size, head_dim) float32}`` with one
random batch per dictionary, so every dictionary takes one step per training step.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from csr_core.corpus import EMBEDDED_CORPUS
from csr_core.dictionary_file import KINDS, coding_space
from csr_core.models import EMBEDDED_MODEL
from neuraldict.collect import KVCollection, collect_kv
from neuraldict.merge import divergence_matrix, group_layers


class KVDataModule(L.LightningDataModule):
    def __init__(
        self,
        model: str = EMBEDDED_MODEL,
        corpus: str = EMBEDDED_CORPUS,
        train_tokens: int = 16384,
        val_tokens: int = 2048,
        window: int = 512,
        merge: Literal["jsd", "none"] = "jsd",
        delta1: float = 0.4,
        delta2: float = 0.8,
        merge_bins: int = 50,
        merge_sample: int = 8192,
        batch_size: int = 512,
        batches_per_epoch: int = 50,
        max_val_vectors: int = 4096,
        collect_device: str = "cpu",
        collect_dtype: str = "float32",
        seed: int = 0,
        metric: Literal["l2", "attention"] = "l2",
        metric_tokens: int = 4096,
        metric_distance: int = 2048,
        center: bool = True,
    ):
        """
        Args:
            model: Hugging Face id, local folder, or the embedded SmolLM2.
            corpus: "python-docs" (embedded), "hf:<dataset>[:<config>]", or a text file / folder / glob.
            train_tokens: calibration tokens collected from the train split.
            val_tokens: held-out tokens collected from the validation split.
            window: tokens per forward pass during collection.
            merge: "jsd" groups consecutive layers by Jensen–Shannon divergence; "none" keeps one dictionary per layer.
            delta1: largest divergence allowed between any two layers of a group.
            delta2: largest sum of adjacent-layer divergences in a group.
            merge_bins: histogram bins per PCA axis (the paper's 200 measures sampling noise at our data sizes; see BENCHMARKS.md).
            merge_sample: vectors per layer used to estimate the divergences.
            batch_size: head vectors per dictionary per training step.
            batches_per_epoch: training steps per epoch.
            max_val_vectors: held-out vectors per dictionary.
            collect_device: device of the model during collection ("cpu", "cuda").
            collect_dtype: dtype of the model during collection ("float32", "bfloat16", "float16").
            seed: seed of the batch sampling.
            metric: "l2" codes ‖x − x̂‖²; "attention" codes keys in the metric of the pre-RoPE queries and values
                in the metric of the output projection (`csr_runtime.metric`): dictionaries are trained on whitened
                vectors and the whitening goes into the dictionary file.
            metric_tokens: calibration tokens (train split) whose queries measure the key metric.
            metric_distance: relative positions 0..metric_distance−1 the key metric averages RoPE over.
            center: code every vector relative to its layer and head's calibration mean μ (keys before RoPE); μ goes
                into the dictionary file. Measured better than raw vectors (BENCHMARKS.md "Centering").
        """
        super().__init__()
        if merge not in ("jsd", "none"):
            raise ValueError(f"merge must be 'jsd' or 'none', got {merge!r}")
        if metric not in ("l2", "attention"):
            raise ValueError(f"metric must be 'l2' or 'attention', got {metric!r}")
        sizes = dict(train_tokens=train_tokens, val_tokens=val_tokens, batch_size=batch_size,
                     batches_per_epoch=batches_per_epoch, max_val_vectors=max_val_vectors, merge_bins=merge_bins,
                     metric_tokens=metric_tokens, metric_distance=metric_distance)
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.save_hyperparameters()
        self.layer_to_group: dict[str, list[int]] = {}
        self.divergences: dict[str, np.ndarray] = {}
        self.train_pools: dict[str, torch.Tensor] = {}
        self.val_pools: dict[str, torch.Tensor] = {}
        self.whitening: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # kind → (A, A⁻¹): (n_layers, H, d, d)
        self.centers: dict[str, torch.Tensor] = {}  # kind → μ: (n_layers, H, d), with `center`

    def _collect(self, split: str, tokens: int, *, verify: bool = False) -> KVCollection:
        h = self.hparams
        return collect_kv(model=h.model, corpus=h.corpus, split=split, max_tokens=tokens, window=h.window,
                          device=h.collect_device, dtype=h.collect_dtype, verify=verify)

    def prepare_data(self) -> None:
        # checksums once, before training (later calls check sizes only)
        self._collect("train", self.hparams.train_tokens, verify=True)
        self._collect("validation", self.hparams.val_tokens, verify=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_pools:
            return
        h = self.hparams
        train, val = self._collect("train", h.train_tokens), self._collect("validation", h.val_tokens)
        self.fingerprint = train.model
        n_layers = train.model.n_layers
        for kind in KINDS:
            if h.merge == "none":
                self.layer_to_group[kind] = list(range(n_layers))
                continue
            self.divergences[kind] = self._divergences(train, kind)
            self.layer_to_group[kind] = group_layers(self.divergences[kind], delta1=h.delta1, delta2=h.delta2)
        if h.metric == "attention":
            self.whitening = self._attention_whitening(train)
        if h.center:
            self.centers = {kind: self._means(train, kind) for kind in KINDS}
        g = torch.Generator().manual_seed(h.seed)
        H = train.model.n_kv_heads
        for kind in KINDS:
            groups = self.layer_to_group[kind]
            center, whiten = self.centers.get(kind), self.whitening.get(kind, (None,))[0]
            vectors = lambda collection, l: coding_space(
                collection.vectors(l, kind), H, None if center is None else center[l].numpy(),
                None if whiten is None else whiten[l].numpy()).astype(np.float16)
            for group in range(max(groups) + 1):
                layers = [l for l in range(n_layers) if groups[l] == group]
                name = f"{kind}/group_{group}"
                self.train_pools[name] = torch.from_numpy(np.concatenate([vectors(train, l) for l in layers]))
                held_out = torch.from_numpy(np.concatenate([vectors(val, l) for l in layers]))
                keep = torch.randperm(len(held_out), generator=g)[: h.max_val_vectors]
                self.val_pools[name] = held_out[keep].float()

    @staticmethod
    def _means(collection: KVCollection, kind: str) -> torch.Tensor:
        """(n_layers, H, d_h) float32: every layer and head's mean vector over the calibration tokens."""
        H = collection.model.n_kv_heads
        means = [collection.vectors(l, kind).reshape(-1, H, collection.model.head_dim).mean(0, dtype=np.float64)
                 for l in range(collection.model.n_layers)]
        return torch.from_numpy(np.stack(means).astype(np.float32))

    def _attention_whitening(self, collection: KVCollection) -> dict:
        """The attention metric's whitening, measured once and cached next to the shards."""
        h = self.hparams
        cached = collection.path / f"whitening_t{h.metric_tokens}_d{h.metric_distance}.pt"
        if cached.is_file():
            return {kind: tuple(t.detach() for t in pair) for kind, pair in torch.load(cached, weights_only=True).items()}
        from csr_core.corpus import load_corpus
        from csr_core.models import load_model
        from neuraldict.attention_metric import attention_whitening
        from neuraldict.collect import token_windows

        lm, tokenizer = load_model(h.model, device=h.collect_device, dtype=h.collect_dtype)
        windows = token_windows(tokenizer, load_corpus(h.corpus, "train"), window=h.window, max_tokens=h.metric_tokens,
                                source=f"train split of {h.corpus!r}")
        result = attention_whitening(lm, windows, max_distance=h.metric_distance)
        torch.save(result, cached)
        return result

    def _divergences(self, collection: KVCollection, kind: str) -> np.ndarray:
        """The layer divergence matrix, cached next to the shards."""
        h = self.hparams
        cached = collection.path / f"divergence_{kind}_bins{h.merge_bins}_n{h.merge_sample}.npy"
        if cached.is_file():
            return np.load(cached)
        g = torch.Generator().manual_seed(0)
        layers = []
        for layer in tqdm(range(collection.model.n_layers), desc=f"Layer merging: sampling {kind}", unit="layer",
                          dynamic_ncols=True):
            v = collection.vectors(layer, kind)
            pick = torch.randperm(len(v), generator=g)[: h.merge_sample].sort().values.numpy()
            layers.append(torch.from_numpy(v[pick].astype(np.float32)))
        matrix = divergence_matrix(layers, bins=h.merge_bins)
        np.save(cached, matrix)
        return matrix

    def layers_of(self, name: str) -> list[int]:
        kind, group = name.split("/group_")
        return [l for l, g in enumerate(self.layer_to_group[kind]) if g == int(group)]

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        epoch = self.trainer.current_epoch if self.trainer else 0
        seed = self.hparams.seed + 1000 * epoch + rank  # each DDP rank draws its own batches
        return DataLoader(_RandomBatches(self.train_pools, self.hparams.batch_size, self.hparams.batches_per_epoch, seed),
                          batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_FixedBatches(self.val_pools, self.hparams.batch_size), batch_size=None)


class _RandomBatches(IterableDataset):
    """`steps` dicts {name: (batch_size, d) float32}, rows drawn at random from each pool."""

    def __init__(self, pools: dict[str, torch.Tensor], batch_size: int, steps: int, seed: int):
        self.pools, self.batch_size, self.steps, self.seed = pools, batch_size, steps, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            yield {name: pool[torch.randint(len(pool), (self.batch_size,), generator=g)].float()
                   for name, pool in self.pools.items()}


class _FixedBatches(IterableDataset):
    """Every held-out vector once: dicts {name: (≤ batch_size, d)}; a name drops out when its pool is done."""

    def __init__(self, pools: dict[str, torch.Tensor], batch_size: int):
        self.pools, self.batch_size = pools, batch_size

    def __len__(self) -> int:
        return max(-(-len(p) // self.batch_size) for p in self.pools.values())

    def __iter__(self):
        for step in range(len(self)):
            sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
            yield {name: pool[sl] for name, pool in self.pools.items() if len(pool[sl])}
