"""Every CSR cache option is checked when the cache is built, in both runtimes, with the option named."""

import warnings

import pytest

from csr_runtime.cache import CSRCache
from mlx_backend.cache import make_csr_cache
from tests.conftest import tiny_llama
from tests.test_cache import random_dictionary
from tests.test_mlx import tiny_mlx_llama

BAD = [
    (dict(sparsity=0), "sparsity \\(CSR-s\\) must be a positive int"),
    (dict(sparsity=-2), "sparsity \\(CSR-s\\) must be a positive int"),
    (dict(sparsity=4.0), "sparsity \\(CSR-s\\) must be a positive int"),
    (dict(sparsity=2000), "keys sparsity has to be an int in 1..16"),
    (dict(sparsity_keys=0, sparsity_values=1), "sparsity_keys must be a positive int"),  # 0 is not "absent"
    (dict(sparsity_keys=2, sparsity_values=9), "values sparsity has to be an int in 1..8"),
    (dict(method="foo"), "method has to be 'mp'"),
    (dict(online_atoms=-1), "online_atoms must be an int >= 0"),
    (dict(guard_atoms=-3), "guard_atoms must be an int >= 0"),
    (dict(window=-1), "window must be an int >= 0"),
    (dict(coding_batch=0), "coding_batch must be an int >= 1"),
    (dict(sink_tokens=2.5), "sink_tokens must be an int >= 0"),
    (dict(guard_threshold=-1), "guard_threshold is a relative squared residual"),
    (dict(guard_threshold=0), "guard_threshold is a relative squared residual"),
    (dict(index_bits=17), "index_bits has to be None"),
    (dict(coef_format="int4"), "coef_format has to be one of"),
    (dict(code_bits_per_channel=-1.0), "code_bits_per_channel must be a number > 0"),
    (dict(online_sampling="newest"), "online_sampling has to be one of"),
]


def build(runtime, **options):
    if runtime == "torch":
        lm = tiny_llama(n_layers=2)
        return CSRCache(lm, random_dictionary(lm), **options)
    lm = tiny_llama(n_layers=2)  # same architecture fields as tiny_mlx_llama: its dictionary fits both
    return make_csr_cache(tiny_mlx_llama(), random_dictionary(lm), **options)


@pytest.mark.parametrize("runtime", ["torch", "mlx"])
@pytest.mark.parametrize("options,message", BAD, ids=[str(o) for o, _ in BAD])
def test_bad_option_fails_at_construction_with_its_name(runtime, options, message):
    with pytest.raises(ValueError, match=message):
        build(runtime, **options)


@pytest.mark.parametrize("runtime", ["torch", "mlx"])
def test_codes_dearer_than_fp16_warn(runtime):
    with pytest.warns(UserWarning, match="more than the 16 of an fp16 cache"):
        build(runtime, sparsity_keys=16, sparsity_values=8, coef_format="fp16", index_bits=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(runtime, sparsity=4)  # 1-ish bits per channel: no warning
