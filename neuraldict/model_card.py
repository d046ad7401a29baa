"""The model card of a dictionary file: written next to every exported dictionary (`<name>.card.md`) and
uploaded as the repository's README.md by `neuraldict push`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np

from csr_core.defaults import COEF_FORMAT, GUARD_ATOMS, ONLINE_ATOMS
from csr_core.dictionary_file import KINDS, DictionaryFile
from csr_core.options import codes_bits_per_channel


def card_path(dictionary_path: str | Path) -> Path:
    return Path(dictionary_path).with_suffix(".card.md")


def bits_per_channel(d: DictionaryFile, sparsity: int, *, paper: bool) -> float:
    """CSR-s's codes alone, keys and values averaged: the paper's int16 + fp16 layout or the packed default."""
    n = d.model.n_layers
    layout = dict(index_bits=16, coef_format="fp16") if paper else dict(index_bits=None, coef_format=COEF_FORMAT)
    return codes_bits_per_channel(d, [sparsity] * n, [max(1, sparsity // d.values.s_n)] * n, online_atoms=ONLINE_ATOMS,
                                  guard_atoms=GUARD_ATOMS, **layout)


def model_card(d: DictionaryFile, *, command: str | None = None) -> str:
    m, p = d.model, d.provenance
    command = command or p.get("command") or " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        "---", "library_name: csr-neuraldict", f"base_model: {m.model_id}", "tags: [kv-cache, compression, csr]", "---",
        "", f"# CSR dictionary for `{m.model_id}`", "",
        "Dictionaries for a CSR (Cache Sparse Representation) KV cache: `CSRCache(model, \"<this repo or file>\")` "
        "(PyTorch) or `make_csr_cache(model, ...)` (MLX), package `csr-neuraldict`.", "",
        "## Base model", "",
        "| model | layers | KV heads | head_dim | RoPE θ | RoPE type |", "|---|---|---|---|---|---|",
        f"| `{m.model_id}` | {m.n_layers} | {m.n_kv_heads} | {m.head_dim} | {m.rope_theta:g} | {m.rope_type} |", "",
        "## Training", "",
        f"- trainer: {p.get('trainer', 'unknown')}, steps: {p.get('global_step', 'unknown')}, exported {p.get('exported', '?')}",
        f"- calibration corpus: `{p.get('corpus', 'unknown')}`, {p.get('train_tokens', 'unknown')} tokens",
        f"- made by: `{command}`", "",
        "## Dictionaries", "",
        "| kind | groups (merged layers) | atoms per group | s_n | metric | trained sparsity |", "|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        k = d.kind(kind)
        lines.append(f"| {kind} | {len(k.atoms)} | {k.atoms[0].shape[0]} | {k.s_n} | {k.metric} | {k.sparsity} |")
    if all(d.kind(kind).error_curve is not None for kind in KINDS):
        lines += ["", "## Held-out error (mean over layers, relative to k = 0)", "",
                  "| atoms per chunk | " + " | ".join(KINDS) + " |", "|---|---|---|"]
        curves = {kind: d.kind(kind).error_curve for kind in KINDS}
        for j in (1, 2, 4, 8, 12):
            if all(j < c.shape[1] for c in curves.values()):
                rel = [float((c[:, j] / c[:, 0].clip(min=1e-30)).mean()) for c in curves.values()]
                lines.append(f"| {j} | " + " | ".join(f"{r:.3f}" for r in rel) + " |")
    if all(d.kind(kind).sensitivity is not None for kind in KINDS):
        sens = {kind: d.kind(kind).sensitivity for kind in KINDS}
        most = {kind: int(np.argmax(s)) for kind, s in sens.items()}
        lines += ["", "## Layer sensitivity (output KL per unit of error; weighs the error curves in bit budgets)", "",
                  *[f"- {kind}: median {float(np.median(s)):.3g}, range {float(s.min()):.3g} … {float(s.max()):.3g} "
                    f"(most sensitive: layer {most[kind]})" for kind, s in sens.items()]]
    if d.runtime:
        lines += ["", "## Cache settings this dictionary was evaluated with", "",
                  "`CSRCache` / `make_csr_cache` use these where the caller gives none:", "",
                  *[f"- `{k}`: {v!r}" for k, v in sorted(d.runtime.items())]]
    lines += ["", "## Bits per channel of the codes (CSR-s, keys and values averaged)", "",
              f"| s | paper layout (int16 + fp16) | packed (default: ⌈log2 N⌉-bit indices, {COEF_FORMAT}, "
              f"{ONLINE_ATOMS}+{GUARD_ATOMS} extra atoms) |", "|---|---|---|"]
    for s in (1, 2, 4, 8):
        lines.append(f"| {s} | {bits_per_channel(d, s, paper=True):.2f} | {bits_per_channel(d, s, paper=False):.2f} |")
    lines += ["", "Online/guard atoms, sinks and windows add to these; `CSRCache.bits_per_channel()` counts every byte."]
    return "\n".join(lines) + "\n"


def write_card(dictionary_path: str | Path, d: DictionaryFile, *, command: str | None = None) -> Path:
    path = card_path(dictionary_path)
    path.write_text(model_card(d, command=command))
    return path
