"""Bit allocation: the budget is respected, atoms go where they cut the error most, and runtimes use it."""

import numpy as np
import pytest
import torch

from csr_core.allocation import greedy_allocation
from csr_core.dictionary_file import load_dictionary, save_dictionary
from csr_runtime.cache import CSRCache
from neuraldict.allocate import error_curves
from tests.conftest import tiny_llama
from tests.test_cache import random_dictionary


def _curves():
    # layer 0's keys barely improve with more atoms; layer 1's values improve a lot
    k = np.arange(9)
    return {"keys": np.stack([1.0 / (1 + 0.01 * k), 1.0 / (1 + 0.5 * k)]),
            "values": np.stack([1.0 / (1 + 0.2 * k), 1.0 / (1 + 2.0 * k)])}


@pytest.mark.parametrize("bits", [0.5, 1.0, 1.7])
def test_allocation_respects_the_budget_and_spends_it(bits):
    atom_bits = {"keys": 19, "values": 19}
    alloc = greedy_allocation(_curves(), atom_bits, bits_per_channel=bits, n_kv_heads=3, head_dim=64,
                              s_n={"keys": 1, "values": 1})
    spent = sum(3 * 19 * k for kind in alloc for k in alloc[kind])
    budget = bits * 2 * 2 * 3 * 64
    assert spent <= budget < spent + 3 * 19 or any(k == 8 for kind in alloc for k in alloc[kind])  # spent, to one atom
    assert all(k >= 1 for kind in alloc for k in alloc[kind])


def test_allocation_gives_atoms_where_the_error_falls_most():
    alloc = greedy_allocation(_curves(), {"keys": 19, "values": 19}, bits_per_channel=1.0, n_kv_heads=3, head_dim=64,
                              s_n={"keys": 1, "values": 1})
    assert alloc["keys"][1] > alloc["keys"][0] == 1  # layer 0's keys gain almost nothing from more atoms
    # greedy on convex curves is optimal: no atom left out is worth more than the last atom given
    gain = lambda kind, l, j: _curves()[kind][l, j] - _curves()[kind][l, j + 1]
    given = min(gain(kind, l, k - 1) for kind in alloc for l, k in enumerate(alloc[kind]) if k > 1)
    left = max(gain(kind, l, k) for kind in alloc for l, k in enumerate(alloc[kind]) if k < 8)
    assert left <= given
    heavier_keys = greedy_allocation(_curves(), {"keys": 19, "values": 19}, bits_per_channel=1.0, n_kv_heads=3,
                                     head_dim=64, s_n={"keys": 1, "values": 1}, key_weight=10.0)
    assert sum(heavier_keys["keys"]) > sum(alloc["keys"])


def test_a_budget_below_one_atom_everywhere_is_refused():
    with pytest.raises(ValueError, match="cannot give every layer one atom per chunk"):
        greedy_allocation(_curves(), {"keys": 19, "values": 19}, bits_per_channel=0.2, n_kv_heads=3, head_dim=64,
                          s_n={"keys": 1, "values": 1})


def test_error_curves_fall_with_every_atom():
    lm = tiny_llama(n_layers=2, kv_heads=2)
    d = random_dictionary(lm)
    rng = np.random.default_rng(0)
    curves = error_curves(d, lambda layer, kind: rng.standard_normal((200, 16)).astype(np.float16), max_sparsity=4)
    for curve in curves.values():
        assert curve.shape == (2, 5) and (np.diff(curve, axis=1) < 0).all()
        assert curve[:, 0] == pytest.approx(16, rel=0.15)  # E‖x‖² of standard normal vectors in 16 dimensions


def test_runtimes_use_the_files_allocation_by_default(tmp_path):
    lm = tiny_llama(n_layers=2, kv_heads=2)
    d = random_dictionary(lm)
    d.keys.allocation, d.values.allocation = [1, 3], [2, 1]
    path = save_dictionary(tmp_path / "d.safetensors", d)
    cache = CSRCache(lm, load_dictionary(path), online_atoms=0, guard_atoms=0)
    assert cache.settings.sparsity_keys == [1, 3] and cache.settings.sparsity_values == [2, 1]
    with torch.no_grad():
        lm(torch.randint(0, 128, (1, 10)), past_key_values=cache)
    assert [layer.stores["keys"].layout.k for layer in cache.layers] == [1, 3]
    assert CSRCache(lm, path, sparsity=4).settings.sparsity_keys == [4, 4]  # an explicit setting wins
    d.keys.allocation = [1, 0]
    with pytest.raises(ValueError, match="keys.allocation must hold 2 positive ints"):
        save_dictionary(tmp_path / "bad.safetensors", d)


def test_a_cache_spends_a_code_budget_with_the_files_error_curves(tmp_path):
    from mlx_backend.cache import make_csr_cache
    from tests.test_mlx import tiny_mlx_llama

    lm = tiny_llama(n_layers=2, kv_heads=2)
    d = random_dictionary(lm)
    k = np.arange(13)
    d.keys.error_curve = np.stack([1.0 / (1 + 0.1 * k), 1.0 / (1 + 1.0 * k)])
    d.values.error_curve = np.stack([1.0 / (1 + 2.0 * k), 1.0 / (1 + 0.5 * k)])
    path = save_dictionary(tmp_path / "d.safetensors", d)
    cache = CSRCache(lm, path, code_bits_per_channel=2.0, online_atoms=0, guard_atoms=0, coef_format="fp8",
                     refine_fraction=0)  # the budget covers the refinement: tests/test_refine.py
    # 64 atoms: 6-bit indices + 8-bit fp8 = 14 bits a pair; a key atom costs 2 heads · 14 bits, a value atom 2 · 2 · 14
    s = cache.settings
    spent = sum(2 * 14 * k for k in s.sparsity_keys) + sum(2 * 2 * 14 * k for k in s.sparsity_values)
    assert 2.0 * 2 * 2 * 2 * 16 - 2 * 2 * 14 < spent <= 2.0 * 2 * 2 * 2 * 16  # spent to the last affordable atom
    assert min(s.sparsity_keys + s.sparsity_values) >= 1
    assert cache.nominal_bits_per_channel() <= 2.0 + 8 * 2 / (2 * 2 * 16)  # + at most a padding byte per code
    assert s.sparsity_keys[1] >= s.sparsity_keys[0]  # layer 1's keys gain more per atom
    mlx_cache = make_csr_cache(tiny_mlx_llama(), str(path), code_bits_per_channel=2.0, online_atoms=0, guard_atoms=0,
                               refine_fraction=0)
    assert mlx_cache[0].settings.sparsity_keys == s.sparsity_keys  # both runtimes allocate alike
    with pytest.raises(ValueError, match="cannot give every layer one atom per chunk"):
        CSRCache(lm, path, code_bits_per_channel=1.0, refine_fraction=0)  # one atom everywhere takes 1.31 bits here
    with pytest.raises(ValueError, match="cannot give every layer one atom.*less 1.125 for the refinement"):
        CSRCache(lm, path, code_bits_per_channel=1.5)  # default refinement: (1 + 0.25 · 4 · 11) / 16 and / 8 bits, 1.125 on average
    with pytest.raises(ValueError, match="no error curves"):
        CSRCache(lm, random_dictionary(lm), code_bits_per_channel=1.0)
    with pytest.raises(ValueError, match="not both"):
        CSRCache(lm, path, code_bits_per_channel=2.0, sparsity=2)


def test_neuraldict_allocate_stores_the_allocation_and_runtime_settings(tiny_model_dir, tmp_path):
    """`neuraldict allocate --runtime ...` end to end on a tiny model: the file carries both, and a cache built
    with no options uses them."""
    from csr_core.models import load_model, model_fingerprint
    from neuraldict.allocate import allocate

    lm, _ = load_model(str(tiny_model_dir))
    d = random_dictionary(tiny_llama(n_layers=3))
    d.model = model_fingerprint(lm, str(tiny_model_dir))
    for kind in ("keys", "values"):
        d.kind(kind).layer_to_group = [0, 0, 0]
    path = save_dictionary(tmp_path / "d.safetensors", d)
    out = allocate(str(path), bits_per_channel=3.0, max_sparsity=4, tokens=256, model=str(tiny_model_dir),
                   runtime={"guard_atoms": 8, "guard_threshold": 0.1})
    stored = load_dictionary(out)
    assert stored.runtime == {"guard_atoms": 8, "guard_threshold": 0.1} and stored.keys.allocation is not None
    assert stored.keys.sensitivity.shape == stored.values.sensitivity.shape == (3,)  # measured on the model
    assert (stored.keys.sensitivity > 0).all()
    settings = CSRCache(lm, out, model_id=str(tiny_model_dir)).settings
    assert (settings.guard_atoms, settings.guard_threshold) == (8, 0.1)
    assert settings.sparsity_keys == stored.keys.allocation
    with pytest.raises(ValueError, match="are not cache options"):
        allocate(str(path), model=str(tiny_model_dir), tokens=256, runtime={"guard_atom": 8})
