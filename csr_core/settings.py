"""Every option of a CSR cache over one dictionary file, as both runtimes resolve it: the caller's options
(None = not given), else the file's `runtime` settings, else `csr_core.defaults`; all checked; the
per-layer sparsities resolved (explicit, budget, the file's allocation, or its trained sparsity)."""

from __future__ import annotations

from csr_core.allocation import resolve_sparsity
from csr_core.options import check_cache_options, with_file_settings

# the fields of both runtimes' CSRSettings that come straight from the options
SETTING_FIELDS = ("method", "online_atoms", "online_sampling", "guard_atoms", "guard_threshold", "window", "coding_batch",
                  "refine_fraction", "refine_atoms", "sink_tokens", "index_bits", "coef_format")


def cache_settings(dictionary, *, method: str, online_sampling: str, index_bits: int | None, **given) -> dict:
    """`given`: sparsity, sparsity_keys, sparsity_values, code_bits_per_channel, key_weight, online_atoms,
    guard_atoms, guard_threshold, window, coding_batch, refine_fraction, refine_atoms, sink_tokens, coef_format.
    Returns them resolved, with
    `sparsity_keys` / `sparsity_values` as per-layer lists, and the three fixed options."""
    o = with_file_settings(given, dictionary.runtime)
    o.update(method=method, online_sampling=online_sampling, index_bits=index_bits)
    check_cache_options(**{k: o[k] for k in SETTING_FIELDS}, code_bits_per_channel=o["code_bits_per_channel"])
    o["sparsity_keys"], o["sparsity_values"] = resolve_sparsity(
        dictionary, sparsity=o["sparsity"], sparsity_keys=o["sparsity_keys"], sparsity_values=o["sparsity_values"],
        code_bits_per_channel=o["code_bits_per_channel"], key_weight=o["key_weight"], index_bits=index_bits,
        online_atoms=o["online_atoms"], guard_atoms=o["guard_atoms"], coef_format=o["coef_format"],
        refine_fraction=o["refine_fraction"], refine_atoms=o["refine_atoms"])
    return o
