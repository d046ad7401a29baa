"""Atoms per layer and kind under a budget in bits per channel: the greedy allocation (pure numpy).

Given, per kind, the mean squared coding error e_λ(k) of every layer λ after k = 0 … k_max atoms per
chunk (measured at training time, in the space the dictionary lives in; stored in the dictionary file
as `error_curve`), start from one atom everywhere and give the next atom to the (layer, kind) with the
largest `w_kind · σ_λ,kind · (e(k) − e(k + 1)) / bits of one more atom`, until the budget is spent. On
convex curves this greedy choice is optimal. σ_λ,kind is the layer's measured sensitivity (output KL per
unit of error, `sensitivity` in the file; 1 where the file has none), so that the product is the KL an
atom buys; `key_weight` = w_keys / w_values is a further exchange rate between the two kinds' errors
(chosen on the validation split).
"""

from __future__ import annotations

from csr_core.code_layout import COEF_BITS, row_index_bits
from csr_core.options import check_sparsity

KINDS = ("keys", "values")


def greedy_allocation(curves: dict, atom_bits: dict, *, bits_per_channel: float, n_kv_heads: int, head_dim: int,
                      s_n: dict, key_weight: float = 1.0, sensitivity: dict | None = None) -> dict[str, list[int]]:
    """Atoms per chunk {kind: [k_λ]} with Σ code bits ≤ the budget (codes only; byte padding aside).

    atom_bits[kind]: bits of one (index, coefficient) pair; one more atom per chunk costs
    n_kv_heads · s_n · atom_bits bits a token. sensitivity[kind]: (n_layers,) weights of the layers' errors
    (None: every layer alike)."""
    n_layers = next(iter(curves.values())).shape[0]
    sensitivity = sensitivity or {}
    curves = {kind: curves[kind] * (1.0 if sensitivity.get(kind) is None else sensitivity[kind][:, None])
              for kind in KINDS}
    budget = bits_per_channel * n_layers * 2 * n_kv_heads * head_dim  # bits a token, every layer, K and V
    cost = {kind: n_kv_heads * s_n[kind] * atom_bits[kind] for kind in KINDS}
    minimum = n_layers * sum(cost.values())
    if budget < minimum:
        raise ValueError(f"a budget of {bits_per_channel} bits per channel cannot give every layer one atom per chunk: "
                         f"that takes {minimum / (n_layers * 2 * n_kv_heads * head_dim):.3f} bits per channel at "
                         f"{atom_bits} bits an atom")
    weight = {"keys": key_weight, "values": 1.0}
    k = {kind: [1] * n_layers for kind in KINDS}
    spent = minimum
    while True:
        best, gain = None, 0.0
        for kind in KINDS:
            for layer in range(n_layers):
                j = k[kind][layer]
                if j + 1 >= curves[kind].shape[1] or spent + cost[kind] > budget:
                    continue
                g = weight[kind] * (curves[kind][layer, j] - curves[kind][layer, j + 1]) / cost[kind]
                if g > gain:
                    best, gain = (kind, layer), g
        if best is None:
            return k
        k[best[0]][best[1]] += 1
        spent += cost[best[0]]


def refinement_bits_per_channel(atom_bits: dict, *, head_dim: int, s_n: dict, refine_fraction: float,
                                refine_atoms: int) -> float:
    """What refinement costs, keys and values averaged: per coded vector (a chunk of d_h / s_n channels) one flag bit
    + refine_fraction · refine_atoms atoms."""
    if refine_fraction <= 0:
        return 0.0
    per_kind = [(1 + refine_fraction * refine_atoms * atom_bits[kind]) * s_n[kind] / head_dim for kind in KINDS]
    return sum(per_kind) / len(per_kind)


def resolve_sparsity(dictionary, *, sparsity=None, sparsity_keys=None, sparsity_values=None,
                     code_bits_per_channel: float | None = None, key_weight: float = 1.0, index_bits: int | None = None,
                     online_atoms: int = 0, guard_atoms: int = 0, coef_format: str = "fp8", refine_fraction: float = 0.0,
                     refine_atoms: int = 0) -> tuple[list[int], list[int]]:
    """Per layer (s for keys, s per value chunk), for both runtimes. In order of precedence:
    `sparsity` (CSR-s) or `sparsity_keys` / `sparsity_values`; a budget `code_bits_per_channel` for the codes,
    refinement included (what `refine_fraction` of `refine_atoms` more atoms costs is taken off first), spent by
    `greedy_allocation` on the file's error curves (an atom costs the runtime's index bits, from the row
    dictionary's size, + its coefficient bits); the file's stored allocation; the sparsities the
    dictionaries were trained at."""
    keys, values = _resolve(dictionary, sparsity, sparsity_keys, sparsity_values, code_bits_per_channel, key_weight,
                            index_bits, online_atoms, guard_atoms, coef_format, refine_fraction, refine_atoms)
    check_sparsity(dictionary, keys, values, index_bits=index_bits, online_atoms=online_atoms, guard_atoms=guard_atoms,
                   coef_format=coef_format)
    return keys, values


def _resolve(dictionary, sparsity, sparsity_keys, sparsity_values, code_bits_per_channel, key_weight, index_bits,
             online_atoms, guard_atoms, coef_format, refine_fraction, refine_atoms):
    if code_bits_per_channel is None:
        return dictionary.resolve_sparsity(sparsity, sparsity_keys, sparsity_values)
    if sparsity is not None or sparsity_keys is not None or sparsity_values is not None:
        raise ValueError("give either a sparsity or code_bits_per_channel (a budget the cache allocates), not both")
    curves = {kind: dictionary.kind(kind).error_curve for kind in KINDS}
    if any(c is None for c in curves.values()):
        raise ValueError("this dictionary file has no error curves to allocate a budget with: add them with "
                         "`neuraldict allocate --dictionary <file>` (files from `lightning fit` carry them)")
    atom_bits = {kind: row_index_bits(index_bits, max(a.shape[0] for a in dictionary.kind(kind).atoms), online_atoms,
                                      guard_atoms) + COEF_BITS[coef_format] for kind in KINDS}
    m = dictionary.model
    s_n = {kind: dictionary.kind(kind).s_n for kind in KINDS}
    refinement = refinement_bits_per_channel(atom_bits, head_dim=m.head_dim, s_n=s_n, refine_fraction=refine_fraction,
                                             refine_atoms=refine_atoms)
    if refinement and code_bits_per_channel - refinement <= 0:
        raise ValueError(f"code_bits_per_channel = {code_bits_per_channel} does not cover the refinement "
                         f"({refinement:.3f} bits per channel at refine_fraction = {refine_fraction}, refine_atoms = "
                         f"{refine_atoms}): raise the budget or lower the refinement")
    try:
        allocation = greedy_allocation(curves, atom_bits, bits_per_channel=code_bits_per_channel - refinement,
                                       n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, s_n=s_n, key_weight=key_weight,
                                       sensitivity={kind: dictionary.kind(kind).sensitivity for kind in KINDS})
    except ValueError as e:
        if not refinement:
            raise
        raise ValueError(f"{e} (code_bits_per_channel = {code_bits_per_channel} less {refinement:.3f} for the "
                         f"refinement of refine_fraction = {refine_fraction} by refine_atoms = {refine_atoms}; refine_fraction=0 "
                         f"turns it off)") from None
    return allocation["keys"], allocation["values"]
