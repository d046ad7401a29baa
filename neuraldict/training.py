"""NeuralDict: learn CSR dictionaries by back-propagating through matching pursuit (paper §NeuralDict).

One dictionary W_D per merged-layer group and per kind, stored with atoms as rows, (N, d_h / s_n).
For a batch x of chunks (the paper's s_n split of each head vector):

    r      = MP(x, W_D, s)                          # indices by argmax |⟨R, d⟩|; coefficients differentiable
    L_MSE  = mean_x ‖x − W_D r‖²
    L_div  = ‖I − W_D W_Dᵀ‖²_F / N²                 # Gram of the atoms
    β      = clamp(0.1 · L̂_MSE / L̂_div, 0, 1)       # hats: detached values
    L      = L_MSE + β · L_div

and after every optimizer step each atom is renormalised to unit l2 norm. Dictionaries start from
spherical k-means centroids (`kmeans.py`). Held-out relative error ‖x − x̂‖² / ‖x‖² is logged per
dictionary as `val_rel_err/{kind}/group_{g}`. At the end of `fit` the dictionary file is exported.
"""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LightningCLI
from tqdm.auto import tqdm

from csr_core.dictionary_file import INDEX_LIMIT, KINDS, save_dictionary
from csr_runtime.sparse_coding import sparse_decode, sparse_encode, split_chunks
from neuraldict.export import CENTER_KEY, CHECKPOINT_KEY, WHITENING_KEY, _escape, structure_dictionary
from neuraldict.kmeans import kmeans_dictionary


def diversity_loss(dictionary: torch.Tensor) -> torch.Tensor:
    """L_div = ‖I − W_D W_Dᵀ‖²_F / N² for atoms as rows: dictionary (N, d).

    Through the d × d Gram instead of the N × N one: ‖I − D Dᵀ‖²_F = N − 2‖D‖²_F + ‖Dᵀ D‖²_F (expand the
    square; tr(D Dᵀ D Dᵀ) = tr(Dᵀ D Dᵀ D)). O(N d²) instead of O(N² d): 30× faster at N = 2048, d = 64.
    """
    n = dictionary.shape[0]
    # in float32 for half-precision dictionaries: ‖Dᵀ D‖²_F ~ N² / d overflows fp16
    atoms = dictionary.float() if dictionary.dtype in (torch.float16, torch.bfloat16) else dictionary
    return (n - 2 * (atoms**2).sum() + ((atoms.T @ atoms) ** 2).sum()) / n**2


def neuraldict_loss(x: torch.Tensor, dictionary: torch.Tensor, s: int, diversity_scale: float = 0.1):
    """x: (n, d) chunks, dictionary: (N, d) → (L, L_MSE, L_div, β) with the paper's adaptive β."""
    idx, coef = sparse_encode(x, dictionary, s=s)  # MP; differentiable through coefficients and residuals
    mse = ((x - sparse_decode(idx, coef, dictionary)) ** 2).sum(-1).mean()
    div = diversity_loss(dictionary)
    beta = (diversity_scale * mse.detach() / div.detach().clamp_min(1e-12)).clamp(0.0, 1.0)
    return mse + beta * div, mse, div, beta


@torch.no_grad()
def renormalise_atoms(dictionary: torch.Tensor) -> None:
    """In place: every atom (row) back to unit l2 norm, as the paper does after each update."""
    dictionary.copy_(torch.nn.functional.normalize(dictionary, dim=-1))


def train_dictionary(
    x: torch.Tensor, init: torch.Tensor, *, s: int, steps: int, batch_size: int = 1024,
    learning_rate: float = 1e-3, diversity_scale: float = 0.1, seed: int = 0,
) -> torch.Tensor:
    """NeuralDict for one dictionary without Lightning (benchmarks, baselines comparison).

    x: (n, d) training chunks, init: (N, d) unit rows → trained (N, d) unit rows. Same loss, optimiser
    and renormalisation as the `NeuralDict` LightningModule.
    """
    dictionary = torch.nn.Parameter(init.clone().float())
    optimizer = torch.optim.Adam([dictionary], lr=learning_rate)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = x[torch.randint(len(x), (batch_size,), generator=g)].float()
        loss = neuraldict_loss(batch, dictionary, s, diversity_scale)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        renormalise_atoms(dictionary)
    return dictionary.detach()


class NeuralDict(L.LightningModule):
    def __init__(
        self,
        n_atoms: int = 2048,
        sparsity_keys: int = 4,
        sparsity_values: int = 4,
        s_n_keys: int = 1,
        s_n_values: int = 1,
        learning_rate: float = 1e-3,
        diversity_scale: float = 0.1,
        kmeans_iterations: int = 10,
        kmeans_vectors: int = 16384,
        export_path: str | None = None,
        allocation_max_sparsity: int = 12,
        sensitivity_tokens: int = 1024,
    ):
        """
        Args:
            n_atoms: atoms N per dictionary (the paper: 8192 or 16384 for 7B models; int16 caps it below 32768).
            sparsity_keys: MP sparsity s used in training for keys (per chunk).
            sparsity_values: MP sparsity s used in training for values (per chunk).
            s_n_keys: chunks per key head vector (paper: 1).
            s_n_values: chunks per value head vector (paper: 2 at d_h = 128; 1 measured better at d_h = 64).
            learning_rate: Adam learning rate.
            diversity_scale: the 0.1 in β = clamp(0.1 · L_MSE / L_div, 0, 1).
            kmeans_iterations: iterations of the k-means initialisation.
            kmeans_vectors: training vectors (chunks) per dictionary used by the k-means initialisation.
            export_path: where the dictionary file goes (default: `dictionary.safetensors` in the run folder).
            allocation_max_sparsity: the exported error curves run to this many atoms per chunk (the most a
                budget allocation can give one layer).
            sensitivity_tokens: validation tokens on which each layer's sensitivity (output KL per unit of
                coding error, neuraldict/sensitivity.py) is measured after training and exported to weigh the
                error curves; one forward pass per layer and kind. 0: every layer alike.
        """
        super().__init__()
        for name, s in (("sparsity_keys", sparsity_keys), ("sparsity_values", sparsity_values)):
            if s < 1:
                raise ValueError(f"{name} must be >= 1, got {s}")
            if n_atoms < s:
                raise ValueError(f"n_atoms = {n_atoms} must be at least {name} = {s}")
        for name, s_n in (("s_n_keys", s_n_keys), ("s_n_values", s_n_values)):
            if s_n < 1:
                raise ValueError(f"{name} must be >= 1, got {s_n}")
        if not 1 <= n_atoms < INDEX_LIMIT:
            raise ValueError(f"n_atoms = {n_atoms} is outside 1..{INDEX_LIMIT - 1}, the range of int16 indices")
        if sensitivity_tokens < 0:
            raise ValueError(f"sensitivity_tokens must be >= 0 (0: no sensitivity), got {sensitivity_tokens}")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.save_hyperparameters()
        self.dictionaries = torch.nn.ParameterDict()
        self.structure: dict = {}
        self.whitening: dict = {}
        self.centers: dict = {}
        self.initial_errors: dict[str, float] = {}
        self._val_sums: dict[str, torch.Tensor] = {}

    # -- structure -------------------------------------------------------------------------------
    def sparsity(self, kind: str) -> int:
        return self.hparams.sparsity_keys if kind == "keys" else self.hparams.sparsity_values

    def s_n(self, kind: str) -> int:
        return self.hparams.s_n_keys if kind == "keys" else self.hparams.s_n_values

    def chunks(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """(n, d_h) head vectors → (n · s_n, d_h / s_n) chunks for the dictionary `name`."""
        return split_chunks(x, self.s_n(name.split("/")[0])).flatten(0, 1)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        head_dim = dm.fingerprint.head_dim
        for kind in KINDS:
            if head_dim % self.s_n(kind):
                raise ValueError(f"head_dim = {head_dim} is not divisible by s_n_{kind} = {self.s_n(kind)}")
        self.structure = {
            "model": asdict(dm.fingerprint),
            **{kind: {"s_n": self.s_n(kind), "sparsity": self.sparsity(kind), "layer_to_group": dm.layer_to_group[kind],
                      "n_atoms": self.hparams.n_atoms, "metric": "attention" if kind in dm.whitening else "l2",
                      **({"center": True} if kind in dm.centers else {})}
               for kind in KINDS},
        }
        self.whitening = dm.whitening  # kind → (A, A⁻¹): the dictionaries live in the space of A (x − μ)
        self.centers = dm.centers  # kind → μ (n_layers, H, d_h)
        if len(self.dictionaries):
            return
        g = torch.Generator().manual_seed(0)
        for name, pool in tqdm(dm.train_pools.items(), desc="k-means initialisation", unit="dictionary",
                               total=len(dm.train_pools), dynamic_ncols=True):
            chunks = self.chunks(name, pool)
            sample = chunks[torch.randperm(len(chunks), generator=g)[: self.hparams.kmeans_vectors]].float()
            if len(sample) < self.hparams.n_atoms:
                raise ValueError(f"{name} has {len(sample)} training chunks, fewer than n_atoms = {self.hparams.n_atoms}: "
                                 f"collect more tokens (data.train_tokens) or lower model.n_atoms")
            atoms = kmeans_dictionary(sample, self.hparams.n_atoms, iterations=self.hparams.kmeans_iterations)
            self.dictionaries[_escape(name)] = torch.nn.Parameter(atoms)
        with torch.no_grad():
            for name, pool in dm.val_pools.items():
                self.initial_errors[name] = self._relative_error(name, pool)

    def dictionary(self, name: str) -> torch.Tensor:
        return self.dictionaries[_escape(name)]

    def _relative_error(self, name: str, vectors: torch.Tensor) -> float:
        x = self.chunks(name, vectors.to(self.device, torch.float32))
        D = self.dictionary(name)
        idx, coef = sparse_encode(x, D.detach(), s=self.sparsity(name.split("/")[0]))
        return float(((x - sparse_decode(idx, coef, D)) ** 2).sum() / (x**2).sum())

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total, rel = 0.0, []
        for name, vectors in batch.items():
            x = self.chunks(name, vectors)
            loss, mse, div, beta = neuraldict_loss(x, self.dictionary(name), self.sparsity(name.split("/")[0]),
                                                    self.hparams.diversity_scale)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss for dictionary {name} at step {self.global_step} "
                    f"(L_MSE={mse.item():.4g}, L_div={div.item():.4g}): lower model.learning_rate"
                )
            total = total + loss
            rel.append(mse.detach() / (x**2).sum(-1).mean())
        self.log("train_rel_err", torch.stack(rel).mean(), prog_bar=True)
        self.log("train_loss", total.detach() / len(batch))
        return total

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for p in self.dictionaries.values():
            renormalise_atoms(p)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)

    # -- held-out error --------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        for name, vectors in batch.items():
            x = self.chunks(name, vectors)
            D = self.dictionary(name)
            idx, coef = sparse_encode(x, D, s=self.sparsity(name.split("/")[0]))
            sums = torch.stack([((x - sparse_decode(idx, coef, D)) ** 2).sum(), (x**2).sum()])
            self._val_sums[name] = self._val_sums.get(name, 0) + sums

    def on_validation_epoch_end(self) -> None:
        per_kind = {kind: [] for kind in KINDS}
        for name, (err, norm) in self._val_sums.items():
            rel = err / norm
            self.log(f"val_rel_err/{name}", rel, sync_dist=True)
            per_kind[name.split("/")[0]].append(rel)
        for kind, values in per_kind.items():
            if values:
                self.log(f"val_rel_err_{kind}", torch.stack(values).mean(), prog_bar=True, sync_dist=True)

    # -- checkpoints and export ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.structure
        checkpoint[WHITENING_KEY] = self.whitening
        checkpoint[CENTER_KEY] = self.centers

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError("this checkpoint was not written by NeuralDict (no dictionary structure in it)")
        if self.structure and saved != self.structure:
            diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {self.structure.get(k)!r}"
                     for k in sorted(set(saved) | set(self.structure)) if saved.get(k) != self.structure.get(k)]
            raise ValueError("the checkpoint was trained for another model or config; " + "; ".join(diffs))

    def export(self, path: str | Path) -> Path:
        atoms = {name: self.dictionary(name) for name in self._names()}
        dm = self.trainer.datamodule
        provenance = {"trainer": "NeuralDict", "corpus": dm.hparams.corpus, "train_tokens": dm.hparams.train_tokens,
                      "global_step": self.global_step, "hparams": dict(self.hparams)}
        dictionary = structure_dictionary(atoms, self.structure, provenance, self.whitening, self.centers)
        # the held-out error after k = 0…k_max atoms per layer: runtimes allocate any bit budget with it
        from neuraldict.allocate import error_curves

        validation = dm._collect("validation", dm.hparams.val_tokens)
        curves = error_curves(dictionary, validation.vectors, max_sparsity=self.hparams.allocation_max_sparsity)
        for kind in KINDS:
            dictionary.kind(kind).error_curve = curves[kind]
        if self.hparams.sensitivity_tokens:
            from neuraldict.sensitivity import measure_sensitivity

            sensitivity = measure_sensitivity(dictionary, model=dm.hparams.model, corpus=dm.hparams.corpus,
                                              tokens=self.hparams.sensitivity_tokens, window=dm.hparams.window,
                                              device=dm.hparams.collect_device)
            for kind in KINDS:
                dictionary.kind(kind).sensitivity = sensitivity[kind]
        from neuraldict.model_card import write_card

        path = save_dictionary(path, dictionary)
        write_card(path, dictionary)
        return path

    def _names(self) -> list[str]:
        return [f"{kind}/group_{g}" for kind in KINDS for g in range(max(self.structure[kind]["layer_to_group"]) + 1)]

    def on_fit_end(self) -> None:
        out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective under DDP: every rank
        if self.trainer.is_global_zero:
            self._export_with_report(out_dir)
        self.trainer.strategy.barrier("export")  # under DDP, the other ranks wait for rank 0's export

    def _export_with_report(self, out_dir: Path) -> None:
        path = Path(self.hparams.export_path) if self.hparams.export_path else out_dir / "dictionary.safetensors"
        self.export(path)
        report_dir = path.parent
        rows = self._summary_rows()
        _write_summary(rows, report_dir)
        dm = self.trainer.datamodule
        if dm.divergences:
            from neuraldict.merge import plot_divergence

            plot_divergence(dm.divergences, dm.layer_to_group, report_dir / "layer_divergence.png")
            for kind, matrix in dm.divergences.items():
                np.savetxt(report_dir / f"divergence_{kind}.csv", matrix, delimiter=",", fmt="%.4f")
        _print_summary(rows)
        print(f"\nDictionary file: {path}\nReport: {report_dir / 'summary.md'}")

    def _summary_rows(self) -> list[dict]:
        dm = self.trainer.datamodule
        rows = []
        with torch.no_grad():
            for name in self._names():
                kind = name.split("/")[0]
                layers = dm.layers_of(name)
                rows.append({"dictionary": name, "layers": f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0]),
                             "N": self.hparams.n_atoms, "s": self.sparsity(kind), "s_n": self.s_n(kind),
                             "kmeans_rel_err": self.initial_errors.get(name, float("nan")),
                             "neuraldict_rel_err": self._relative_error(name, dm.val_pools[name])})
        return rows


def _write_summary(rows: list[dict], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()) + " |" for r in rows]
    (folder / "summary.md").write_text("Held-out relative error ‖x − x̂‖² / ‖x‖² (MP at the training sparsity)\n\n" + "\n".join(lines) + "\n")


def _print_summary(rows: list[dict]) -> None:
    print("\nHeld-out relative error (MP, training sparsity)")
    print(f"{'dictionary':<18}{'layers':>8}{'s':>4}{'s_n':>5}{'k-means':>10}{'NeuralDict':>12}{'ratio':>8}")
    for r in rows:
        ratio = r["neuraldict_rel_err"] / r["kmeans_rel_err"] if r["kmeans_rel_err"] else float("nan")
        print(f"{r['dictionary']:<18}{r['layers']:>8}{r['s']:>4}{r['s_n']:>5}{r['kmeans_rel_err']:>10.4f}"
              f"{r['neuraldict_rel_err']:>12.4f}{ratio:>8.3f}")
    for kind in KINDS:
        sel = [r for r in rows if r["dictionary"].startswith(kind)]
        k, n = np.mean([r["kmeans_rel_err"] for r in sel]), np.mean([r["neuraldict_rel_err"] for r in sel])
        print(f"{kind:<6} mean over {len(sel)} dictionaries: k-means {k:.4f} → NeuralDict {n:.4f} ({n / k:.3f}×)")


class NeuralDictCLI(LightningCLI):
    """LightningCLI that checks what it can before the long work starts, and resumes honestly."""

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the model's settings by the checkpoint's when resuming; a setting given here
        # that differs from the checkpoint's would be dropped without a word, so it is refused instead.
        sub = self.config.get("subcommand")
        given = self.config[sub].get("model") if sub else None
        given = given.as_dict() if hasattr(given, "as_dict") else dict(given or {})
        super()._parse_ckpt_path()
        if not sub or not self.config[sub].get("ckpt_path"):
            return
        stored = self.config[sub].get("model")
        stored = stored.as_dict() if hasattr(stored, "as_dict") else dict(stored or {})
        differences = [f"{k}: checkpoint {stored.get(k)!r}, given {v!r}" for k, v in sorted(given.items())
                       if k in stored and stored.get(k) != v]
        if differences:
            raise ValueError(
                f"resuming from {self.config[sub].ckpt_path} continues the run it was saved from, but these model "
                f"settings differ from the checkpoint's: {'; '.join(differences)}. Resume with the checkpoint's "
                f"settings (trainer settings such as --trainer.max_epochs may change), or start a new run without "
                f"--ckpt_path")

    def before_fit(self) -> None:
        # structural settings against the model's config, before minutes of KV collection
        from csr_core.models import fingerprint_without_weights

        head_dim = fingerprint_without_weights(self.datamodule.hparams.model).head_dim
        for kind in KINDS:
            if head_dim % self.model.s_n(kind):
                raise ValueError(f"--model.s_n_{kind} {self.model.s_n(kind)} does not divide head_dim = {head_dim} of "
                                 f"{self.datamodule.hparams.model!r}: use a divisor of {head_dim}")


def run_lightning_cli(args: list[str] | None = None) -> LightningCLI:
    from neuraldict.data import KVDataModule

    return NeuralDictCLI(NeuralDict, KVDataModule, args=args, seed_everything_default=0,
                         save_config_kwargs={"overwrite": True})
