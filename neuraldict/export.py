"""Export trained dictionaries to the dictionary file format (docs/dictionary-format.md)."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import torch

from csr_core.dictionary_file import KINDS, DictionaryFile, KindDictionaries, ModelFingerprint, bf16_atoms, save_dictionary

CHECKPOINT_KEY = "csr_structure"  # what a NeuralDict checkpoint stores besides its weights
WHITENING_KEY = "csr_whitening"  # kind → (A, A⁻¹) of the attention metric, where the dictionaries were trained on A x
CENTER_KEY = "csr_center"  # kind → μ (n_layers, H, d_h): the dictionaries were trained on A (x − μ)


def structure_dictionary(
    atoms: dict[str, torch.Tensor], structure: dict, provenance: dict | None = None, whitening: dict | None = None,
    centers: dict | None = None,
) -> DictionaryFile:
    """atoms: {"keys/group_0": (N, w), ...} + the structure a NeuralDict records (+ its whitening and centers)
    → a DictionaryFile."""
    whitening, centers = whitening or {}, centers or {}
    kinds = {}
    for kind in KINDS:
        s = structure[kind]
        n_groups = max(s["layer_to_group"]) + 1
        tensors = [atoms[f"{kind}/group_{g}"].detach().cpu().double() for g in range(n_groups)]
        # float64 normalisation, then bf16 values of unit norm (`bf16_atoms`: exact scores from two bf16 products)
        tensors = [bf16_atoms(torch.nn.functional.normalize(t, dim=-1).float().numpy()) for t in tensors]
        A, A_inv = (t.float().numpy() for t in whitening[kind]) if kind in whitening else (None, None)
        kinds[kind] = KindDictionaries(s_n=s["s_n"], sparsity=s["sparsity"], layer_to_group=s["layer_to_group"], atoms=tensors,
                                       metric=s.get("metric", "l2"), whiten=A, unwhiten=A_inv,
                                       center=centers[kind].float().numpy() if kind in centers else None)
    provenance = {"exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **(provenance or {})}
    return DictionaryFile(ModelFingerprint(**structure["model"]), kinds["keys"], kinds["values"], provenance)


def export_checkpoint(ckpt_path: str, output: str | None = None) -> Path:
    """Write the dictionary file of a NeuralDict checkpoint (default: next to it, `.safetensors`)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{ckpt_path} is not a NeuralDict checkpoint (no {CHECKPOINT_KEY!r} entry)")
    prefix = "dictionaries."
    atoms = {_unescape(k[len(prefix):]): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    provenance = {"checkpoint": str(ckpt_path), "global_step": checkpoint.get("global_step")}
    dictionary = structure_dictionary(atoms, checkpoint[CHECKPOINT_KEY], provenance, checkpoint.get(WHITENING_KEY),
                                      checkpoint.get(CENTER_KEY))
    output = Path(output) if output else Path(ckpt_path).with_suffix(".safetensors")
    from neuraldict.model_card import write_card

    path = save_dictionary(output, dictionary)
    write_card(path, dictionary)
    return path


def _escape(name: str) -> str:
    """ParameterDict keys cannot hold '/' or '.': "keys/group_3" ↔ "keys__group_3"."""
    return name.replace("/", "__")


def _unescape(key: str) -> str:
    return key.replace("__", "/")
