import pytest
import torch

from neuraldict.compare import compare
from neuraldict.ksvd import ksvd_dictionary


def sparse_signals(n, n_atoms, d, s, seed):
    """Noiseless signals, each a combination of s atoms of a known random dictionary (coefficients ±[1, 2])."""
    g = torch.Generator().manual_seed(seed)
    true = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g, dtype=torch.float64), dim=-1)
    idx = torch.stack([torch.randperm(n_atoms, generator=g)[:s] for _ in range(n)])
    coef = torch.randn(n, s, generator=g, dtype=torch.float64).sign() * (1 + torch.rand(n, s, generator=g, dtype=torch.float64))
    return (coef[..., None] * true[idx]).sum(1), true, g


def test_ksvd_error_never_increases_and_recovers_the_atoms():
    x, true, g = sparse_signals(n=3000, n_atoms=30, d=24, s=2, seed=0)
    init = torch.nn.functional.normalize(x[torch.randperm(len(x), generator=g)[:30]], dim=-1)
    history = []
    D = ksvd_dictionary(x, init, s=2, iterations=25, history=history)
    assert all(b <= a + 1e-12 for a, b in zip(history, history[1:])), history
    assert history[-1] < 0.1 * history[0]
    recovered = float(((D @ true.T).abs().max(0).values > 0.99).double().mean())
    assert recovered >= 0.9, recovered


def test_ksvd_rejects_bad_input():
    with pytest.raises(ValueError, match="must share d"):
        ksvd_dictionary(torch.randn(10, 5), torch.randn(4, 6), s=1)
    with pytest.raises(ValueError, match="at least one training vector"):
        ksvd_dictionary(torch.randn(0, 5), torch.randn(4, 5), s=1)


def test_compare_reports_every_method_on_the_same_vectors(tiny_model_dir, tmp_path):
    rows = compare(model=str(tiny_model_dir), train_tokens=1024, val_tokens=256, window=64, layers=[1], n_atoms=16,
                   sparsities=[1, 2, 4], max_train_vectors=2048, max_test_vectors=256, ksvd_iterations=3,
                   neuraldict_steps=5, downstream_context=64, downstream_sequences=1, output=str(tmp_path / "report"))
    assert len(rows) == 5 * 2 * 2 * 3  # methods × kinds × coders × sparsities
    for kind in ("keys", "values"):
        err = {(r["method"], r["coder"], r["s"]): r["rel_err"] for r in rows if r["kind"] == kind}
        for m in ("random", "kmeans", "ksvd", "sklearn", "neuraldict"):
            assert err[(m, "mp", 1)] == pytest.approx(err[(m, "omp", 1)], rel=1e-5)  # MP = OMP at s = 1
            assert err[(m, "omp", 4)] < err[(m, "omp", 2)] < err[(m, "omp", 1)] <= 1.0
        for m in ("kmeans", "ksvd", "neuraldict"):
            assert err[(m, "mp", 1)] < err[("random", "mp", 1)]
    bits = {r["s"]: r["bits_per_channel"] for r in rows if r["kind"] == "values"}
    assert bits[2] == 32 * 2 * 2 / 16  # 32·s·s_n/d_h with s_n = 2, d_h = 16
    for name in ("compare.md", "compare.csv", "error_vs_s.png", "error_vs_bits.png"):
        assert (tmp_path / "report" / name).is_file()
    # downstream perplexity: the full-precision reference, then one CSR run per method on the same text
    lines = (tmp_path / "report" / "downstream.csv").read_text().splitlines()[1:]
    ppl = {line.split(",")[0]: float(line.split(",")[1]) for line in lines}
    assert list(ppl) == ["full precision", "random", "kmeans", "ksvd", "sklearn", "neuraldict"]
    assert all(1 < p < 1e6 for p in ppl.values())
    assert ppl["random"] != ppl["full precision"]  # layer 1 really is read back from codes
    assert "Downstream perplexity" in (tmp_path / "report" / "compare.md").read_text()


def test_compare_rejects_bad_config(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="methods must be among"):
        compare(model=str(tiny_model_dir), methods=["pca"], output=str(tmp_path))
    with pytest.raises(ValueError, match="n_atoms = 4 must be at least the largest sparsity 16"):
        compare(model=str(tiny_model_dir), n_atoms=4, output=str(tmp_path))
    with pytest.raises(ValueError, match="set s_n_keys: 1 or downstream_sparsity: 0"):
        compare(model=str(tiny_model_dir), s_n_keys=2, output=str(tmp_path))
