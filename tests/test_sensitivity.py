"""Layer sensitivity: each layer's coding is measured alone, in the dictionary's space, and weighs the allocation."""

import numpy as np
import pytest
import torch

from csr_core.allocation import greedy_allocation
from csr_core.dictionary_file import load_dictionary, save_dictionary
from csr_runtime.cache import CSRCache
from neuraldict.sensitivity import code_and_decode, layer_sensitivity
from tests.conftest import tiny_llama
from tests.test_cache import complete_dictionary, random_dictionary


def test_a_complete_dictionary_codes_exactly_and_the_error_is_in_the_dictionarys_space():
    lm = tiny_llama(n_layers=2, kv_heads=2)
    d = complete_dictionary(lm)
    x = torch.randn(3, 5, 2 * 16)
    x_hat, error = code_and_decode(x, d, "keys", 1, sparsity=16)
    torch.testing.assert_close(x_hat, x, atol=1e-4, rtol=0)
    assert error < 1e-8
    d.keys.center = np.full((2, 2, 16), 5.0, dtype=np.float32)
    x_hat, error = code_and_decode(x + 5.0, d, "keys", 0, sparsity=1)  # one atom of x − μ, μ added back
    residual = (x_hat - 5.0 - x).view(-1, 16)
    assert error == pytest.approx(float(residual.square().sum(-1).mean()), rel=1e-5)
    assert error < float(x.view(-1, 16).square().sum(-1).mean())


def test_only_the_measured_layer_is_coded():
    """A layer whose values are all zero codes them exactly (μ = 0, coefficient 0) and its attention outputs 0
    whatever its keys: both its sensitivities are 0, while coding the other layers moves the output."""
    lm = tiny_llama(n_layers=3, kv_heads=2)
    with torch.no_grad():
        lm.model.layers[1].self_attn.v_proj.weight.zero_()
    d = random_dictionary(lm, n_layers=3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    sens = layer_sensitivity(lm, ids, d, sparsity=1)
    assert sens["values"][1] == 0.0 and sens["values"][0] > 0 and sens["values"][2] > 0
    assert sens["keys"][1] == 0.0 and sens["keys"][0] > 0 and sens["keys"][2] > 0
    with torch.no_grad():
        reference = lm(ids).logits
    assert torch.equal(lm(ids).logits, reference)  # the hooks are gone afterwards


def test_sensitivity_weighs_the_allocation_and_travels_in_the_file(tmp_path):
    flat = np.stack([1.0 / (1 + np.arange(9))] * 2)  # two layers with the same error curve
    curves = {"keys": flat, "values": flat}
    args = dict(bits_per_channel=1.0, n_kv_heads=3, head_dim=64, s_n={"keys": 1, "values": 1})
    plain = greedy_allocation(curves, {"keys": 19, "values": 19}, **args)
    assert abs(plain["keys"][0] - plain["keys"][1]) <= 1  # alike, but for the last atom of an odd budget
    weighted = greedy_allocation(curves, {"keys": 19, "values": 19}, **args,
                                 sensitivity={"keys": np.array([10.0, 1.0]), "values": np.array([1.0, 1.0])})
    assert weighted["keys"][0] > weighted["keys"][1] + 1 and sum(weighted["keys"]) > sum(plain["keys"])

    lm = tiny_llama(n_layers=2, kv_heads=2)
    d = random_dictionary(lm)
    k = np.arange(13)
    d.keys.error_curve = d.values.error_curve = np.stack([1.0 / (1 + k)] * 2)
    path = save_dictionary(tmp_path / "plain.safetensors", d)
    d.keys.sensitivity, d.values.sensitivity = np.array([10.0, 1.0]), np.array([1.0, 1.0])
    weighted_path = save_dictionary(tmp_path / "weighted.safetensors", d)
    np.testing.assert_array_equal(load_dictionary(weighted_path).keys.sensitivity, [10.0, 1.0])
    options = dict(code_bits_per_channel=4.0, online_atoms=0, guard_atoms=0)
    plain_keys = CSRCache(lm, path, **options).settings.sparsity_keys
    weighted_keys = CSRCache(lm, weighted_path, **options).settings.sparsity_keys
    assert abs(plain_keys[0] - plain_keys[1]) <= 1 and weighted_keys[0] > weighted_keys[1] + 1


@pytest.mark.parametrize("keys,values,match", [
    (np.array([1.0, -1.0]), np.array([1.0, 1.0]), "keys/sensitivity must be finite, non-negative"),
    (np.array([1.0, 1.0, 1.0]), np.array([1.0, 1.0]), r"of shape \(n_layers,\) = \(2,\)"),
    (np.array([1.0, 1.0]), None, "give both or neither"),
])
def test_a_bad_sensitivity_is_refused(tmp_path, keys, values, match):
    d = random_dictionary(tiny_llama(n_layers=2, kv_heads=2))
    d.keys.sensitivity, d.values.sensitivity = keys, values
    with pytest.raises(ValueError, match=match):
        save_dictionary(tmp_path / "bad.safetensors", d)
