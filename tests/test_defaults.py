"""Defaults live in one place (`csr_core.defaults`) and both runtimes and the embedded configs agree with it."""

import inspect

import yaml

from csr_core import defaults
from csr_runtime.cache import CSRCache
from mlx_backend.cache import make_csr_cache

NAMES = {"online_atoms": "ONLINE_ATOMS", "guard_atoms": "GUARD_ATOMS", "guard_threshold": "GUARD_THRESHOLD",
         "sink_tokens": "SINK_TOKENS", "window": "WINDOW", "coef_format": "COEF_FORMAT", "index_bits": "INDEX_BITS"}


def test_both_runtimes_default_to_the_same_settings():
    for function in (CSRCache.__init__, make_csr_cache):
        params = inspect.signature(function).parameters
        for name, constant in NAMES.items():
            assert params[name].default == getattr(defaults, constant), (function.__qualname__, name)


def test_the_embedded_eval_config_names_the_default_cache():
    methods = yaml.safe_load(open("configs/eval.yaml"))["methods"]
    default = [m for m in methods if m["name"] == "CSR-3 (defaults)"]
    assert default and set(default[0]) == {"name", "type", "sparsity"}  # nothing but the sparsity: the defaults
