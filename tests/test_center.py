"""Centering: vectors are coded relative to the calibration mean μ stored in the dictionary file (x − μ)."""

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from csr_core.dictionary_file import DictionaryFile, KindDictionaries, coding_space, load_dictionary, save_dictionary
from csr_core.models import model_fingerprint
from csr_runtime.cache import CSRCache
from tests.conftest import tiny_llama
from tests.test_cache import complete_dictionary, orthonormal, random_atoms

N_LAYERS, H, D = 2, 2, 16


def one_atom_values(fingerprint, center: bool) -> tuple[DictionaryFile, np.ndarray, np.ndarray]:
    """Values coded with s = 1 over 32 random atoms, keys with a complete basis; μ random of norm ≈ 4."""
    rng = np.random.default_rng(0)
    mu = rng.standard_normal((N_LAYERS, H, D)).astype(np.float32)
    atoms = random_atoms(32, D, 5)
    keys = KindDictionaries(1, D, [0] * N_LAYERS, [orthonormal(D, 0)])
    values = KindDictionaries(1, 1, [0] * N_LAYERS, [atoms], center=mu if center else None)
    return DictionaryFile(fingerprint, keys, values), mu, atoms


def known_values(mu: np.ndarray, atoms: np.ndarray, T: int = 10) -> np.ndarray:
    """(1, H, T, D) values of layer 0: v = μ_h + c · atom_j, one atom each, so s = 1 codes x − μ exactly."""
    rng = np.random.default_rng(1)
    j, c = rng.integers(0, len(atoms), (H, T)), rng.uniform(1.0, 3.0, (H, T))
    return (mu[0][:, None, :] + c[..., None] * atoms[j]).astype(np.float32)[None]


SETTINGS = dict(online_atoms=0, guard_atoms=0, sink_tokens=0, window=0, coef_format="fp16", sparsity_values=1)


@pytest.mark.parametrize("center", [True, False])
def test_one_atom_codes_the_centered_value_exactly_known_answer(center):
    lm = tiny_llama(n_layers=N_LAYERS, heads=4, kv_heads=H, head_dim=D)
    dictionary, mu, atoms = one_atom_values(model_fingerprint(lm, "tiny"), center)
    values = torch.from_numpy(known_values(mu, atoms))
    cache = CSRCache(lm, dictionary, sparsity_keys=D, **SETTINGS)
    layer = cache.layers[0]
    layer.update(torch.randn(values.shape, generator=torch.Generator().manual_seed(2)), values)
    _, read = layer.read_back()
    error = float((read - values).abs().max())
    if center:
        assert error < 5e-3  # fp16 coefficients
    else:  # one atom cannot carry μ as well: the mean is what the atom is spent on
        assert error > 0.5


@pytest.mark.parametrize("center", [True, False])
def test_mlx_runtime_codes_the_centered_value_exactly_known_answer(center):
    import mlx.core as mx  # installed with the test extras (mlx-linux): no skip
    from mlx_backend.cache import make_csr_cache
    from mlx_backend.cache import model_fingerprint as mlx_fingerprint
    from tests.test_mlx import tiny_mlx_llama

    model = tiny_mlx_llama(N_LAYERS)
    dictionary, mu, atoms = one_atom_values(mlx_fingerprint(model, "tiny"), center)
    values = known_values(mu, atoms)
    cache = make_csr_cache(model, dictionary, sparsity_keys=D, **SETTINGS)[0]
    cache.update_and_fetch(mx.array(np.random.default_rng(2).standard_normal(values.shape).astype(np.float32)),
                           mx.array(values))
    error = float(np.abs(np.array(cache._decoded_values()) - values).max())
    assert error < 5e-3 if center else error > 0.5


def centered_complete_dictionary(lm):
    d = complete_dictionary(lm, N_LAYERS)
    rng = np.random.default_rng(3)
    for kind in (d.keys, d.values):
        kind.center = rng.standard_normal((N_LAYERS, H, D)).astype(np.float32)
    return d


def test_centered_file_round_trip_and_complete_dictionary_reproduces_dynamic_cache(tmp_path):
    lm = tiny_llama(n_layers=N_LAYERS, heads=4, kv_heads=H, head_dim=D)
    path = save_dictionary(tmp_path / "d.safetensors", centered_complete_dictionary(lm))
    loaded = load_dictionary(path, model=model_fingerprint(lm, "tiny"))
    np.testing.assert_array_equal(loaded.keys.center, centered_complete_dictionary(lm).keys.center)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    cache, reference = CSRCache(lm, loaded, online_atoms=0, guard_atoms=0, coef_format="fp16"), DynamicCache()
    with torch.no_grad():
        for part in (ids[:, :12], ids[:, 12:13], ids[:, 13:]):
            torch.testing.assert_close(lm(part, cache=cache).logits, lm(part, cache=reference).logits,
                                       atol=5e-3, rtol=0)


def test_center_of_the_wrong_shape_is_rejected_with_its_name(tmp_path):
    lm = tiny_llama(n_layers=N_LAYERS, heads=4, kv_heads=H, head_dim=D)
    d = centered_complete_dictionary(lm)
    d.values.center = d.values.center[:, :1]
    with pytest.raises(ValueError, match=r"values/center has shape \(2, 1, 16\).*expected finite \(n_layers, n_kv_heads, "
                                         r"d_h\) = \(2, 2, 16\)"):
        save_dictionary(tmp_path / "bad.safetensors", d)


def test_coding_space_subtracts_the_center_then_whitens():
    rng = np.random.default_rng(4)
    x, mu, A = rng.standard_normal((6, 4)), rng.standard_normal((2, 4)), rng.standard_normal((2, 4, 4))
    expected = np.stack([A[t % 2] @ (x[t] - mu[t % 2]) for t in range(6)])  # rows are head-minor: row t is head t % 2
    np.testing.assert_allclose(coding_space(x, 2, mu, A), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(coding_space(x, 2), x, rtol=1e-6)
