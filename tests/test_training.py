import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from csr_core.dictionary_file import bf16_atoms, load_dictionary
from csr_core.models import load_model, model_fingerprint
from neuraldict.merge import divergence_matrix, group_layers
from neuraldict.training import NeuralDict, diversity_loss, neuraldict_loss, run_lightning_cli
from tests.test_sparse_coding import reference_mp, unit_dictionary


def test_in_loss_mp_equals_reference_mp():
    D = unit_dictionary(48, 12, seed=7)
    x = torch.randn(30, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    _, mse, _, _ = neuraldict_loss(x, D, 4)
    idx, coef = reference_mp(x.numpy(), D.numpy(), 4)
    x_hat = np.einsum("ns,nsd->nd", coef, D.numpy()[idx])
    expected = ((x.numpy() - x_hat) ** 2).sum(-1).mean()
    assert abs(mse.item() - expected) < 1e-6 * max(1.0, expected)


def test_gradients_flow_through_matching_pursuit():
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    D0 = unit_dictionary(9, 5, seed=1)

    def mse(D):
        return neuraldict_loss(x, D, 3)[1]

    assert torch.autograd.gradcheck(mse, (D0.clone().requires_grad_(),), eps=1e-6, atol=1e-5)
    D = D0.clone().requires_grad_()
    mse(D).backward()
    assert D.grad.abs().sum() > 0


def test_diversity_term_equals_its_formula():
    D = unit_dictionary(20, 6, seed=3)  # atoms as rows; the paper's W_D = Dᵀ
    W = D.T
    expected = ((torch.eye(20, dtype=torch.float64) - W.T @ W) ** 2).sum() / 20**2
    torch.testing.assert_close(diversity_loss(D), expected)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert abs(diversity_loss(Q.T).item()) < 1e-14  # orthonormal atoms: no penalty
    # computed through the d × d Gram: same value and gradient as the N × N formula
    A = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    B = A.detach().clone().requires_grad_()
    diversity_loss(A).backward()
    (((torch.eye(40, dtype=torch.float64) - B @ B.T) ** 2).sum() / 40**2).backward()
    torch.testing.assert_close(A.grad, B.grad)


def test_mp_gradient_equals_the_gradient_through_all_scores():
    """MP scores atoms without autograd and recomputes the chosen coefficients: same gradient as the dense graph."""
    x = torch.randn(50, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    D0 = unit_dictionary(32, 8, seed=6)

    def dense_mse(D):
        residual = x
        for _ in range(3):
            scores = residual @ D.T
            i = scores.abs().argmax(-1)
            residual = residual - scores.gather(-1, i[:, None]) * D[i]
        return (residual**2).sum(-1).mean()

    fast, dense = D0.clone().requires_grad_(), D0.clone().requires_grad_()
    neuraldict_loss(x, fast, 3)[1].backward()
    dense_mse(dense).backward()
    torch.testing.assert_close(fast.grad, dense.grad)


def test_adaptive_beta_is_clamped():
    D = unit_dictionary(16, 4, seed=2)
    big = torch.randn(8, 4, dtype=torch.float64) * 100
    small = torch.randn(8, 4, dtype=torch.float64) * 1e-4
    _, mse, div, beta = neuraldict_loss(big, D, 2)
    assert beta.item() == 1.0
    _, mse, div, beta = neuraldict_loss(small, D, 2)
    assert 0 < beta.item() < 1 and abs(beta.item() - 0.1 * mse.item() / div.item()) < 1e-12


def test_merging_groups_equal_distributions_and_splits_different_ones():
    # Two distributions that differ in their mean direction, as KV distributions of distant layers do.
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(2, 0.1, 16)
    mean_a, mean_b = torch.zeros(16), torch.zeros(16)
    mean_a[0], mean_b[1] = 3.0, 3.0
    make = lambda mean: torch.randn(6000, 16, generator=g) * scale + mean
    layers = [make(mean_a), make(mean_a), make(mean_a), make(mean_b), make(mean_b)]
    M = divergence_matrix(layers, bins=50)
    assert M[0, 1] < 0.2 and M[3, 4] < 0.2 and M[2, 3] > 0.5
    assert group_layers(M, delta1=0.2, delta2=0.4) == [0, 0, 0, 1, 1]
    assert group_layers(M, delta1=0.2, delta2=0.0) == [0, 1, 2, 3, 4]  # δ2 = 0 forbids any merge


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_atoms=2, sparsity_keys=4), "n_atoms = 2 must be at least sparsity_keys = 4"),
    (dict(sparsity_values=0), "sparsity_values must be >= 1"),
    (dict(n_atoms=40000), "outside 1..32767"),
    (dict(s_n_values=0), "s_n_values must be >= 1"),
])
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeuralDict(**kwargs)


def test_non_finite_loss_names_the_dictionary():
    module = NeuralDict(n_atoms=8, sparsity_keys=2)
    module.dictionaries["keys__group_3"] = torch.nn.Parameter(unit_dictionary(8, 16, dtype=torch.float32))
    batch = {"keys/group_3": torch.full((4, 16), float("nan"))}
    with pytest.raises(FloatingPointError, match="dictionary keys/group_3 at step 0"):
        module.training_step(batch, 0)


import lightning as L  # noqa: E402


class AssertUnitNorm(L.Callback):
    """Fails the run if any atom is not unit norm after a training step; counts the steps it checked."""

    def __init__(self):
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        for p in pl_module.dictionaries.values():
            norms = p.detach().norm(dim=-1)
            assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), "atoms not renormalised"
        self.checked += 1


def tiny_fit_args(model_dir, out, *extra):
    return [
        "fit", "--config", "configs/llama.yaml",
        "--data.model", str(model_dir), "--data.train_tokens", "1024", "--data.val_tokens", "256",
        "--data.window", "64", "--data.batch_size", "64", "--data.batches_per_epoch", "3",
        "--data.merge_sample", "512", "--data.max_val_vectors", "128",
        "--model.n_atoms", "32", "--model.kmeans_iterations", "3",
        "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false",
        *extra,
    ]


def test_fit_exports_a_loadable_dictionary_and_resumes(tiny_model_dir, other_tiny_model_dir, tmp_path, capsys):
    cli = run_lightning_cli(tiny_fit_args(tiny_model_dir, tmp_path / "run",
                                          "--trainer.callbacks+=tests.test_training.AssertUnitNorm"))
    checks = [c for c in cli.trainer.callbacks if type(c).__name__ == "AssertUnitNorm"]
    assert cli.trainer.global_step == 3 and checks and checks[0].checked == 3
    out = capsys.readouterr().out
    assert "Dictionary file:" in out and "mean over" in out
    path = Path(out.split("Dictionary file: ")[1].split()[0])
    lm, _ = load_model(str(tiny_model_dir))
    dictionary = load_dictionary(path, model=model_fingerprint(lm, str(tiny_model_dir)))
    assert len(dictionary.keys.layer_to_group) == 3 and dictionary.values.s_n == 1  # configs/llama.yaml
    assert dictionary.keys.atoms[0].shape == (32, 16) and dictionary.values.atoms[0].shape == (32, 16)
    for atoms in dictionary.keys.atoms + dictionary.values.atoms:  # exported as bf16 values (two AMX products, not 3)
        np.testing.assert_array_equal(bf16_atoms(atoms), atoms)
    curve = dictionary.values.error_curve  # held-out error after 0..12 atoms: what runtimes allocate budgets with
    assert curve.shape == (3, 13) and (np.diff(curve, axis=1) <= 1e-6).all() and (curve[:, 12] < 0.5 * curve[:, 0]).all()
    for kind in ("keys", "values"):  # measured on the model after training: weighs the curves at run time
        assert dictionary.kind(kind).sensitivity.shape == (3,) and (dictionary.kind(kind).sensitivity > 0).all()
    assert (path.parent / "summary.csv").is_file() and (path.parent / "layer_divergence.png").is_file()
    assert "held-out error" in (path.parent / "dictionary.card.md").read_text().lower()  # the model card

    # Export on demand from the last checkpoint gives the same atoms.
    from neuraldict.export import export_checkpoint

    last = next((tmp_path / "run").rglob("last.ckpt"))
    exported = load_dictionary(export_checkpoint(str(last), str(tmp_path / "from_ckpt.safetensors")))
    np.testing.assert_allclose(exported.keys.atoms[1], dictionary.keys.atoms[1], atol=1e-6)
    np.testing.assert_array_equal(exported.values.center, dictionary.values.center)

    # center: true (configs/llama.yaml): the file carries each layer and head's calibration mean (keys before RoPE)
    train = cli.datamodule._collect("train", 1024)
    for kind in ("keys", "values"):
        mean = train.vectors(1, kind).reshape(-1, 2, 16).astype(np.float64).mean(0)
        np.testing.assert_allclose(dictionary.kind(kind).center[1], mean, rtol=1e-4, atol=1e-5)
    pool = cli.datamodule.train_pools[f"values/group_{dictionary.values.layer_to_group[0]}"].float()
    assert float(pool.mean(0).norm()) < 0.1 * float(pool.norm(dim=-1).mean())  # dictionaries train on x − μ

    # Resume: up to 3 epochs continues from step 3.
    resumed = run_lightning_cli(tiny_fit_args(tiny_model_dir, tmp_path / "run2", "--trainer.max_epochs", "3",
                                              "--ckpt_path", str(last)))
    assert resumed.trainer.global_step == 9

    # Resume with a model setting that differs from the checkpoint's: refused, every difference named.
    with pytest.raises(ValueError, match="n_atoms: checkpoint 32, given 16"):
        run_lightning_cli(tiny_fit_args(tiny_model_dir, tmp_path / "run4", "--ckpt_path", str(last),
                                        "--model.n_atoms", "16"))

    # A checkpoint from another model is refused with a clear message. (LightningCLI restores the
    # model's hyperparameters from the checkpoint itself; the data side is ours to check.)
    with pytest.raises(ValueError, match="trained for another model or config.*n_layers"):
        run_lightning_cli(tiny_fit_args(other_tiny_model_dir, tmp_path / "run3", "--ckpt_path", str(last)))


def test_two_process_ddp_run_trains(tiny_model_dir, tmp_path):
    out = tmp_path / "ddp"
    args = tiny_fit_args(tiny_model_dir, out, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                         "--trainer.accelerator", "cpu",
                         "--model.s_n_values", "2", "--model.sparsity_values", "2")  # the paper's chunked values
    run = subprocess.run([sys.executable, "-m", "neuraldict.cli", *args], capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "terminate called" not in log  # every rank closed its process group before exiting
    assert "GLOBAL_RANK: 1" in log and "distributed_backend=gloo" in log
    checkpoint = torch.load(next(out.rglob("last.ckpt")), weights_only=True)
    assert checkpoint["global_step"] == 3
    dictionary = load_dictionary(Path(log.split("Dictionary file: ")[1].split()[0]))
    assert len(dictionary.values.layer_to_group) == 3
    assert dictionary.values.s_n == 2 and dictionary.values.atoms[0].shape == (32, 8)  # d_h = 16 in two chunks


@pytest.mark.parametrize("config", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config):
    text = config.read_text()
    if "trainer:" in text:  # a LightningCLI config
        cmd = [sys.executable, "-m", "neuraldict.cli", "fit", "--config", str(config), "--print_config"]
    elif config.stem in ("collect", "compare"):  # `neuraldict collect|compare`
        cmd = [sys.executable, "-m", "neuraldict.cli", config.stem, "--config", str(config), "--print_config"]
    else:  # csr-eval
        cmd = [sys.executable, "-m", "csr_eval.evaluate", "--config", str(config), "--print_config"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "model" in run.stdout


def test_s_n_that_does_not_divide_head_dim_fails_before_any_collection(tiny_model_dir, tmp_path):
    from csr_core.paths import cache_root

    before = sorted(p.name for p in (cache_root() / "kv").glob("*")) if (cache_root() / "kv").is_dir() else []
    with pytest.raises(ValueError, match="--model.s_n_values 3 does not divide head_dim = 16"):
        run_lightning_cli(tiny_fit_args(tiny_model_dir, tmp_path / "run", "--model.s_n_values", "3",
                                        "--data.train_tokens", "2048"))
    after = sorted(p.name for p in (cache_root() / "kv").glob("*")) if (cache_root() / "kv").is_dir() else []
    assert after == before  # nothing was collected


def test_attention_metric_fit_trains_on_whitened_vectors_and_exports_the_whitening(tiny_model_dir, tmp_path, capsys):
    from neuraldict.export import export_checkpoint

    run_lightning_cli(tiny_fit_args(tiny_model_dir, tmp_path / "run", "--data.metric", "attention",
                                    "--data.metric_tokens", "256", "--data.metric_distance", "64"))
    path = Path(capsys.readouterr().out.split("Dictionary file: ")[1].split()[0])
    d = load_dictionary(path)
    assert d.keys.metric == d.values.metric == "attention" and d.values.whiten.shape == (3, 2, 16, 16)
    # the value whitening is the output projection's metric: ‖A v‖² ∝ Σ_j ‖W_o,j v‖² for the query heads j of KV head 0
    lm, _ = load_model(str(tiny_model_dir))
    W = lm.model.layers[1].self_attn.o_proj.weight.detach().double()
    v = torch.randn(16, dtype=torch.float64)
    through_o = sum(float((W[:, j * 16 : (j + 1) * 16] @ v).square().sum()) for j in (0, 1))
    A = torch.from_numpy(d.values.whiten[1, 0]).double()
    ratios = [through_o / float((A @ v).square().sum())]
    v2 = torch.randn(16, dtype=torch.float64)
    ratios.append(sum(float((W[:, j * 16 : (j + 1) * 16] @ v2).square().sum()) for j in (0, 1)) / float((A @ v2).square().sum()))
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-3)  # one constant: the metric up to its normalisation
    last = next((tmp_path / "run").rglob("last.ckpt"))  # the checkpoint carries the whitening for a later export
    again = load_dictionary(export_checkpoint(str(last), str(tmp_path / "again.safetensors")))
    np.testing.assert_array_equal(again.keys.whiten, d.keys.whiten)


def test_neuraldict_help_lists_fit_and_every_subcommand(capsys):
    from neuraldict.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "collect", "export", "allocate", "compare"))
