"""Bit allocation: the budget is respected, atoms go where they cut the error most, and runtimes use it."""

import numpy as np
import pytest
import torch

from csr_runtime.cache import CSRCache
from csr_runtime.dictionary_file import load_dictionary, save_dictionary
from neuraldict.allocate import error_curves, greedy_allocation
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
