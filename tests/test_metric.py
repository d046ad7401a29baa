"""The attention metric: its matrices against brute force, and coding in it against plain L2."""

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from csr_core.dictionary_file import load_dictionary, save_dictionary
from csr_core.models import model_fingerprint
from csr_runtime.cache import CSRCache
from csr_runtime.metric import key_metric, rope_rotations, value_metric, whitening
from csr_runtime.sparse_coding import sparse_decode, sparse_encode
from tests.conftest import tiny_llama
from tests.test_cache import complete_dictionary


def test_value_metric_is_the_output_projections_squared_error():
    g = torch.Generator().manual_seed(0)
    n_heads, n_kv, d, hidden = 6, 2, 8, 24
    W = torch.randn(hidden, n_heads * d, generator=g, dtype=torch.float64)
    M = value_metric(W, n_heads, n_kv)
    e = torch.randn(n_kv, d, generator=g, dtype=torch.float64)
    for h in range(n_kv):  # query heads 3h..3h+2 read KV head h
        brute = sum(float((W[:, j * d : (j + 1) * d] @ e[h]).square().sum()) for j in range(3 * h, 3 * h + 3))
        assert float(e[h] @ M[h] @ e[h]) == pytest.approx(brute, rel=1e-10)


def test_rope_rotations_match_transformers_rope():
    lm = tiny_llama(n_layers=1, head_dim=16)
    x = torch.randn(1, 1, 5, 16)
    positions = torch.tensor([[0, 1, 7, 100, 250]])
    cos, sin = lm.model.rotary_emb(x, positions)
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    R = rope_rotations(lm.model.rotary_emb.inv_freq, positions[0])
    torch.testing.assert_close(torch.einsum("tij,tj->ti", R, x[0, 0].double()).float(), rotated[0, 0], atol=1e-5, rtol=0)


def test_key_metric_is_the_mean_squared_logit_error_over_distances():
    g = torch.Generator().manual_seed(1)
    d, n = 8, 50
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    q = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, d, dtype=torch.float64)
    e = torch.randn(d, generator=g, dtype=torch.float64)
    M = key_metric((q.T @ q / n)[None], inv_freq, max_distance=64, n_distances=64)[0]
    # q at position m, key error at n = m − Δ: the logit error is (R(m) q)·(R(m − Δ) e)
    brute = np.mean([float(((rope_rotations(inv_freq, torch.tensor([30]))[0] @ q.T).T
                            @ (rope_rotations(inv_freq, torch.tensor([30 - delta]))[0] @ e)).square().mean())
                     for delta in range(64)])
    assert float(e @ M @ e) == pytest.approx(brute, rel=1e-9)


def test_whitening_factors_the_metric():
    g = torch.Generator().manual_seed(2)
    B = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    M = B @ B.transpose(-1, -2)
    A, A_inv = whitening(M, floor=0)
    scale = M.diagonal(dim1=-2, dim2=-1).sum(-1) / 6  # normalised to mean eigenvalue 1
    torch.testing.assert_close((A.double().transpose(-1, -2) @ A.double()) * scale[:, None, None], M, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(A @ A_inv, torch.eye(6).expand(3, 6, 6), atol=1e-4, rtol=0)


def test_coding_in_the_whitened_space_minimises_the_metric_known_answer():
    # M = diag(100, 1, 1, 1), atoms = the whitened basis, s = 1, x = (0.5, 1, 0, 0):
    # plain L2 MP keeps the larger coordinate (e2) and leaves metric error 100 · 0.5² = 25;
    # MP on A x = (5, 1, 0, 0) keeps e1 and leaves error 1² = 1, the optimum.
    M = torch.diag(torch.tensor([100.0, 1.0, 1.0, 1.0]))
    A, A_inv = whitening(M, floor=0)
    x = torch.tensor([[0.5, 1.0, 0.0, 0.0]])
    metric_error = lambda x_hat: float((x - x_hat) @ M @ (x - x_hat).T)
    D = torch.eye(4)
    plain = sparse_decode(*sparse_encode(x, D, s=1), D)
    whitened = sparse_decode(*sparse_encode(x @ A.T, D, s=1), D) @ A_inv.T
    assert metric_error(plain) == pytest.approx(25.0)
    assert metric_error(whitened) == pytest.approx(1.0, rel=1e-4)


def _whitened_dictionary(lm, n_layers=2):
    d = complete_dictionary(lm, n_layers)
    g = torch.Generator().manual_seed(3)
    for kind in (d.keys, d.values):
        M = torch.randn(n_layers, 2, 16, 16, generator=g, dtype=torch.float64)
        A, A_inv = whitening(M @ M.transpose(-1, -2) + torch.eye(16))
        kind.metric, kind.whiten, kind.unwhiten = "attention", A.numpy(), A_inv.numpy()
    return d


def test_whitened_dictionary_file_round_trip_and_exact_cache(tmp_path):
    lm = tiny_llama(n_layers=2, heads=4, kv_heads=2)
    path = save_dictionary(tmp_path / "d.safetensors", _whitened_dictionary(lm))
    loaded = load_dictionary(path, model=model_fingerprint(lm, "tiny"))
    assert loaded.keys.metric == "attention" and loaded.keys.whiten.shape == (2, 2, 16, 16)
    # a complete dictionary in the whitened space still reproduces DynamicCache: A⁻¹ undoes A
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    cache = CSRCache(lm, loaded, online_atoms=0, guard_atoms=0, coef_format="fp16")
    reference = DynamicCache()
    with torch.no_grad():
        for part in (ids[:, :12], ids[:, 12:13], ids[:, 13:]):
            torch.testing.assert_close(lm(part, past_key_values=cache).logits, lm(part, past_key_values=reference).logits,
                                       atol=5e-3, rtol=0)


def test_whitening_must_match_the_metric_and_invert(tmp_path):
    lm = tiny_llama(n_layers=2, heads=4, kv_heads=2)
    d = _whitened_dictionary(lm)
    d.values.unwhiten = d.values.unwhiten * 2
    with pytest.raises(ValueError, match="values/unwhiten is not the inverse of values/whiten"):
        save_dictionary(tmp_path / "bad.safetensors", d)
    d = _whitened_dictionary(lm)
    d.keys.metric = "l2"
    with pytest.raises(ValueError, match="keys.metric = 'l2' needs tensors keys/whiten"):
        save_dictionary(tmp_path / "bad.safetensors", d)
    d.keys.metric = "cosine"
    with pytest.raises(ValueError, match=r"keys.metric = 'cosine'; supported: \['l2', 'attention'\]"):
        save_dictionary(tmp_path / "bad.safetensors", d)
