"""Checks of a CSR cache's options, shared by both runtimes: every value is checked when the cache is
built, so a wrong one fails with its name before any forward pass, never silently clamped."""

from __future__ import annotations

import warnings

from csr_core import defaults
from csr_core.code_layout import COEF_FORMATS, CodeLayout, row_index_bits

METHODS = ("mp", "omp")
SAMPLINGS = ("reverse", "uniform")
SPARSITY_OPTIONS = ("sparsity", "sparsity_keys", "sparsity_values", "code_bits_per_channel")
DEFAULTS = {"key_weight": defaults.KEY_WEIGHT, "online_atoms": defaults.ONLINE_ATOMS, "guard_atoms": defaults.GUARD_ATOMS,
            "guard_threshold": defaults.GUARD_THRESHOLD, "window": defaults.WINDOW, "coding_batch": defaults.CODING_BATCH,
            "refine_fraction": defaults.REFINE_FRACTION, "refine_atoms": defaults.REFINE_ATOMS,
            "sink_tokens": defaults.SINK_TOKENS, "coef_format": defaults.COEF_FORMAT}


def with_file_settings(given: dict, runtime: dict | None) -> dict:
    """The cache options in force: each one the caller gave (not None), else the dictionary file's `runtime`
    setting, else `csr_core.defaults`. The sparsity options go together: a caller who names any of them
    gets none of the file's."""
    runtime = runtime or {}
    out = dict(given)
    if all(given.get(k) is None for k in SPARSITY_OPTIONS):
        out.update({k: runtime.get(k) for k in SPARSITY_OPTIONS})
    for name, default in DEFAULTS.items():
        if out.get(name) is None:
            out[name] = runtime.get(name, default)
    return out


def _count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def check_cache_options(*, method: str, online_atoms: int, online_sampling: str, guard_atoms: int,
                        guard_threshold: float, window: int, coding_batch: int, refine_fraction: float,
                        refine_atoms: int, sink_tokens: int,
                        index_bits: int | None, coef_format: str, code_bits_per_channel: float | None) -> None:
    """ValueError naming the first option out of range."""
    if method not in METHODS:
        raise ValueError(f"method has to be 'mp' (matching pursuit) or 'omp' (orthogonal MP), got {method!r}")
    if online_sampling not in SAMPLINGS:
        raise ValueError(f"online_sampling has to be one of {list(SAMPLINGS)}, got {online_sampling!r}")
    if coef_format not in COEF_FORMATS:
        raise ValueError(f"coef_format has to be one of {list(COEF_FORMATS)} but got {coef_format!r}")
    for name, value in (("window", window), ("sink_tokens", sink_tokens), ("online_atoms", online_atoms),
                        ("guard_atoms", guard_atoms)):
        _count(name, value)
    if isinstance(coding_batch, bool) or not isinstance(coding_batch, int) or coding_batch < 1:
        raise ValueError(f"coding_batch must be an int >= 1 (1: every new token is coded at once), got {coding_batch!r}")
    if isinstance(refine_fraction, bool) or not isinstance(refine_fraction, (int, float)) or not 0 <= refine_fraction <= 1:
        raise ValueError(f"refine_fraction is the share of coded vectors that get more atoms, in [0, 1] (0: none), "
                         f"got {refine_fraction!r}")
    if isinstance(refine_atoms, bool) or not isinstance(refine_atoms, int) or refine_atoms < 1:
        raise ValueError(f"refine_atoms must be an int >= 1 (the atoms a refined vector gets on top of its code), "
                         f"got {refine_atoms!r}")
    if isinstance(guard_threshold, bool) or not isinstance(guard_threshold, (int, float)) or not guard_threshold > 0:
        raise ValueError(f"guard_threshold is a relative squared residual in (0, 1]: vectors coded worse become guard "
                         f"atoms; got {guard_threshold!r} (to disable guard atoms, set guard_atoms=0)")
    if index_bits is not None and (isinstance(index_bits, bool) or not isinstance(index_bits, int) or not 1 <= index_bits <= 16):
        raise ValueError(f"index_bits has to be None (as many as the dictionary needs) or an int in 1..16, got {index_bits!r}")
    if code_bits_per_channel is not None and not (isinstance(code_bits_per_channel, (int, float)) and code_bits_per_channel > 0):
        raise ValueError(f"code_bits_per_channel must be a number > 0, got {code_bits_per_channel!r}")


def codes_bits_per_channel(dictionary, sparsity_keys: list[int], sparsity_values: list[int], *,
                           index_bits: int | None, online_atoms: int, guard_atoms: int, coef_format: str) -> float:
    """Bits per channel of the packed codes alone (one token's codes of all KV heads packed together, as the
    runtimes store them), keys and values averaged over layers; index_bits=16 with fp16 is the paper's
    32 · s · s_n / d_h."""
    m = dictionary.model
    bits = 0
    for kind, ks in (("keys", sparsity_keys), ("values", sparsity_values)):
        d = dictionary.kind(kind)
        ib = row_index_bits(index_bits, max(a.shape[0] for a in d.atoms), online_atoms, guard_atoms)
        bits += sum(CodeLayout(groups=m.n_kv_heads * d.s_n, k=k, index_bits=ib, coef_format=coef_format).nbytes * 8
                    for k in ks)
    return bits / (2 * len(sparsity_keys) * m.n_kv_heads * m.head_dim)


def check_sparsity(dictionary, sparsity_keys: list[int], sparsity_values: list[int], *, index_bits: int | None,
                   online_atoms: int, guard_atoms: int, coef_format: str) -> None:
    """Per-layer sparsities within what the dictionary allows: 1 ≤ s ≤ the chunk width (more atoms than
    dimensions never lower the error further), and a warning when the codes cost more than an fp16 cache."""
    m = dictionary.model
    for kind, ks in (("keys", sparsity_keys), ("values", sparsity_values)):
        d = dictionary.kind(kind)
        width = m.head_dim // d.s_n
        bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= width]
        if bad:
            raise ValueError(f"{kind} sparsity has to be an int in 1..{width} (the width of a {kind[:-1]} chunk, "
                             f"d_h / s_n = {m.head_dim} / {d.s_n}), got {bad[0]!r}")
    per_channel = codes_bits_per_channel(dictionary, sparsity_keys, sparsity_values, index_bits=index_bits,
                                         online_atoms=online_atoms, guard_atoms=guard_atoms, coef_format=coef_format)
    if per_channel > 16:
        warnings.warn(f"these sparsities cost {per_channel:.1f} bits per channel for the codes alone, more than the "
                      f"16 of an fp16 cache: a full-precision cache is smaller and exact", stacklevel=3)
