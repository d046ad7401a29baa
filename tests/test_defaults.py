"""Defaults live in one place (`csr_core.defaults`) and both runtimes and the embedded configs agree with it."""

import inspect

import pytest
import yaml

from csr_core import defaults
from csr_core.dictionary_file import load_dictionary, save_dictionary
from csr_runtime.cache import CSRCache
from mlx_backend.cache import make_csr_cache
from tests.conftest import tiny_llama
from tests.test_cache import random_dictionary
from tests.test_mlx import tiny_mlx_llama

NAMES = {"online_atoms": "ONLINE_ATOMS", "guard_atoms": "GUARD_ATOMS", "guard_threshold": "GUARD_THRESHOLD",
         "sink_tokens": "SINK_TOKENS", "window": "WINDOW", "coding_batch": "CODING_BATCH", "coef_format": "COEF_FORMAT",
         "index_bits": "INDEX_BITS", "refine_fraction": "REFINE_FRACTION", "refine_atoms": "REFINE_ATOMS"}


def settings_of(runtime, dictionary, **options):
    if runtime == "torch":
        lm = tiny_llama(n_layers=2)
        return CSRCache(lm, dictionary(lm), **options).settings
    return make_csr_cache(tiny_mlx_llama(), dictionary(tiny_llama(n_layers=2)), **options)[0].settings


@pytest.mark.parametrize("runtime", ["torch", "mlx"])
def test_both_runtimes_default_to_the_same_settings(runtime):
    settings = settings_of(runtime, random_dictionary)
    for name, constant in NAMES.items():
        assert getattr(settings, name) == getattr(defaults, constant), (runtime, name)
    assert inspect.signature(make_csr_cache).parameters.keys() - {"model"} == \
        inspect.signature(CSRCache.__init__).parameters.keys() - {"self", "model", "coded_layers"}


def file_with_runtime(lm):
    d = random_dictionary(lm)
    d.runtime = {"online_atoms": 16, "guard_atoms": 8, "sink_tokens": 2, "sparsity_keys": 3, "sparsity_values": 2}
    return d


@pytest.mark.parametrize("runtime", ["torch", "mlx"])
def test_settings_a_dictionary_file_carries_apply_when_the_caller_gives_none(runtime, tmp_path):
    s = settings_of(runtime, file_with_runtime)
    assert (s.online_atoms, s.guard_atoms, s.sink_tokens, s.guard_threshold) == (16, 8, 2, defaults.GUARD_THRESHOLD)
    assert s.sparsity_keys == [3, 3] and s.sparsity_values == [2, 2]
    given = settings_of(runtime, file_with_runtime, online_atoms=4, sparsity_keys=1, sparsity_values=1)
    assert (given.online_atoms, given.guard_atoms, given.sparsity_keys) == (4, 8, [1, 1])  # the caller's win
    path = save_dictionary(tmp_path / "d.safetensors", file_with_runtime(tiny_llama(n_layers=2)))
    assert load_dictionary(path).runtime["online_atoms"] == 16  # it travels in the file


def test_the_embedded_eval_config_names_the_default_cache():
    methods = yaml.safe_load(open("configs/eval.yaml"))["methods"]
    default = [m for m in methods if m["name"] == "CSR-3 (defaults)"]
    assert default and set(default[0]) == {"name", "type", "sparsity"}  # nothing but the sparsity: the defaults


@pytest.mark.parametrize("section", ["model", "data"])
def test_the_embedded_fit_config_equals_the_training_defaults(section):
    """`lightning fit --config configs/llama.yaml` and the classes' own defaults train the same dictionary."""
    from neuraldict.data import KVDataModule
    from neuraldict.training import NeuralDict

    cls = NeuralDict if section == "model" else KVDataModule
    parameters = inspect.signature(cls.__init__).parameters
    config = yaml.safe_load(open("configs/llama.yaml"))[section]
    assert config == {k: parameters[k].default for k in config}
