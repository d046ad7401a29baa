"""Bits where attention feels them: measure each layer's error curves, and allocate a budget with them.

For every layer λ and kind (keys, values), MP codes held-out (validation) vectors with the layer's
offline dictionary — in the space the dictionary lives in (A (x − μ)), so with an attention-metric file the
error is the attention metric — and records the mean squared error e_λ,kind(k) after k = 0 … k_max
atoms (MP is greedy: the first k atoms of a k_max-atom code are the k-atom code). Then, from one
atom everywhere, the next atom goes to the (layer, kind) with the largest

    w_kind · σ_λ,kind · (e(k) − e(k + 1)) / (bits of one more atom in every KV head),

until the budget is spent. σ is the layer's measured sensitivity, the output KL per unit of e
(`neuraldict/sensitivity.py`; `sensitivity_tokens=0` leaves it out), so the product is the KL an atom saves. `key_weight` (w_keys / w_values) sets the exchange rate between the key
error (logit² units with the attention metric) and the value error (output² units): choose it on the
validation split with `csr-eval --split validation`.

    neuraldict allocate --dictionary runs/.../dictionary.safetensors --bits_per_channel 1.0

The curves go into the file too, so a runtime can allocate any other budget itself
(`CSRCache(..., code_bits_per_channel=b)`); `lightning fit` stores them in every file it exports.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from csr_core import defaults
from csr_core.allocation import greedy_allocation, refinement_bits_per_channel
from csr_core.code_layout import COEF_BITS, index_bits_for
from csr_core.dictionary_file import KINDS, RUNTIME_KEYS, DictionaryFile, coding_space, load_dictionary, save_dictionary
from csr_runtime.sparse_coding import sparse_encode, split_chunks


def error_curves(dictionary: DictionaryFile, vectors, *, max_sparsity: int, max_vectors: int = 4096) -> dict:
    """{kind: (n_layers, max_sparsity + 1) mean squared error after k atoms per chunk}.

    vectors(layer, kind) → (n, d_h) head vectors (pre-RoPE keys), rows head-minor (n = tokens · H)."""
    curves = {}
    n_layers, H = dictionary.model.n_layers, dictionary.model.n_kv_heads
    g = torch.Generator().manual_seed(0)
    for kind in KINDS:
        d = dictionary.kind(kind)
        curve = np.zeros((n_layers, max_sparsity + 1))
        for layer in tqdm(range(n_layers), desc=f"Error curves ({kind})", dynamic_ncols=True):
            x = torch.from_numpy(coding_space(vectors(layer, kind), H, None if d.center is None else d.center[layer],
                                              None if d.whiten is None else d.whiten[layer]))  # A (x − μ)
            x = x[torch.randperm(len(x), generator=g)[:max_vectors]]
            chunks = split_chunks(x, d.s_n).flatten(0, 1)
            atoms = torch.from_numpy(d.for_layer(layer))
            idx, coef = sparse_encode(chunks, atoms, s=max_sparsity)
            residual = chunks.clone()
            curve[layer, 0] = float(residual.square().sum(-1).mean()) * d.s_n
            for k in range(max_sparsity):
                residual -= coef[:, k : k + 1] * atoms[idx[:, k]]
                curve[layer, k + 1] = float(residual.square().sum(-1).mean()) * d.s_n  # per head vector
        curves[kind] = curve
    return curves


def allocate(
    dictionary: str,
    bits_per_channel: float = 1.0,
    output: str | None = None,
    key_weight: float = 1.0,
    max_sparsity: int = 8,
    online_atoms: int | None = None,
    guard_atoms: int | None = None,
    coef_format: str | None = None,
    corpus: str | None = None,
    tokens: int = 2048,
    model: str | None = None,
    runtime: dict | None = None,
    sensitivity_tokens: int = 1024,
) -> Path:
    """Write a copy of `dictionary` with its error curves and an allocation of `bits_per_channel` (codes only).

    Args:
        dictionary: the dictionary file (from `lightning fit`).
        bits_per_channel: budget for the codes (indices + coefficients) of keys and values, averaged over layers,
            refinement included (the runtime's `refine_fraction` / `refine_atoms`: `runtime`'s, else csr_core.defaults).
        output: the new file (default: `<dictionary>-<bits>bit.safetensors` next to it).
        key_weight: exchange rate of key error against value error (choose on the validation split).
        max_sparsity: most atoms per chunk one layer may get.
        online_atoms, guard_atoms: the extra atoms a runtime adds (they set the index width: ⌈log2(N + extra)⌉);
            default: `runtime`'s, else csr_core.defaults.
        coef_format: the runtime's coefficient format ("fp8", "e3m1", "int8", "fp16"), for the bits of one atom; default as above.
        corpus: text whose validation split gives the vectors (default: the file's training corpus).
        tokens: validation tokens.
        model: the model (default: the file's model_id).
        runtime: cache settings to store in the file as the ones it was evaluated with, e.g.
            '{"guard_atoms": 256, "guard_threshold": 0.1}' (keys: csr_core.dictionary_file.RUNTIME_KEYS);
            CSRCache / make_csr_cache use them where the caller gives none.
        sensitivity_tokens: validation tokens on which each layer's sensitivity (output KL per unit of error) is
            measured and stored to weigh the error curves (neuraldict/sensitivity.py); 0: every layer alike.
    """
    from neuraldict.collect import collect_kv

    d = load_dictionary(dictionary)
    runtime = dict(runtime or {})
    unknown = set(runtime) - set(RUNTIME_KEYS)
    if unknown:
        raise ValueError(f"runtime settings {sorted(unknown)} are not cache options; use keys from {list(RUNTIME_KEYS)}")
    online_atoms = online_atoms if online_atoms is not None else runtime.get("online_atoms", defaults.ONLINE_ATOMS)
    guard_atoms = guard_atoms if guard_atoms is not None else runtime.get("guard_atoms", defaults.GUARD_ATOMS)
    coef_format = coef_format or runtime.get("coef_format", defaults.COEF_FORMAT)
    corpus = corpus or d.provenance.get("corpus", "python-docs")
    collection = collect_kv(model=model or d.model.model_id, corpus=corpus, split="validation", max_tokens=tokens,
                            window=min(512, tokens))
    curves = error_curves(d, collection.vectors, max_sparsity=max_sparsity)
    sensitivity = {kind: None for kind in KINDS}
    if sensitivity_tokens:
        from neuraldict.sensitivity import measure_sensitivity

        sensitivity = measure_sensitivity(d, model=model or d.model.model_id, corpus=corpus, tokens=sensitivity_tokens)
    extra = online_atoms + guard_atoms
    # one (index, coefficient) pair; int8's per-chunk scale is left out of the exchange rates
    atom_bits = {kind: index_bits_for(max(a.shape[0] for a in d.kind(kind).atoms) + extra) + COEF_BITS[coef_format]
                 for kind in KINDS}
    s_n = {kind: d.kind(kind).s_n for kind in KINDS}
    # the runtime's refinement (csr_core.allocation.resolve_sparsity) comes out of the same budget
    refinement = refinement_bits_per_channel(
        atom_bits, head_dim=d.model.head_dim, s_n=s_n,
        refine_fraction=runtime.get("refine_fraction", defaults.REFINE_FRACTION),
        refine_atoms=runtime.get("refine_atoms", defaults.REFINE_ATOMS))
    allocation = greedy_allocation(curves, atom_bits, bits_per_channel=bits_per_channel - refinement,
                                   n_kv_heads=d.model.n_kv_heads, head_dim=d.model.head_dim, s_n=s_n,
                                   key_weight=key_weight, sensitivity=sensitivity)
    provenance = {**d.provenance, "allocation": {"bits_per_channel": bits_per_channel, "key_weight": key_weight,
                                                 "online_atoms": online_atoms, "guard_atoms": guard_atoms,
                                                 "coef_format": coef_format, "corpus": corpus, "tokens": tokens,
                                                 "sensitivity_tokens": sensitivity_tokens}}
    result = dataclasses.replace(
        d, provenance=provenance, runtime={**d.runtime, **runtime},
        **{kind: dataclasses.replace(d.kind(kind), allocation=allocation[kind], error_curve=curves[kind],
                                                        sensitivity=sensitivity[kind]) for kind in KINDS})
    output = Path(output) if output else Path(dictionary).with_name(f"{Path(dictionary).stem}-{bits_per_channel:g}bit.safetensors")
    save_dictionary(output, result)
    print(f"Allocation for {bits_per_channel:g} bits per channel (codes), atoms per chunk by layer:")
    for kind in KINDS:
        print(f"  {kind:6s} {allocation[kind]}  (mean {np.mean(allocation[kind]):.2f})")
    print(f"Dictionary file: {output}")
    return output
