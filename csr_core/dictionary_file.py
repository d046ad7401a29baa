"""Dictionary file format v2: the contract between `neuraldict`, `csr_runtime` and `mlx_backend`.

A dictionary file is one safetensors file. Its tensors are the offline dictionaries, one per
merged-layer group and per kind (K or V), stored with **atoms as rows**:

    keys/group_{g}   : (N_g, d_h / s_n_K)  float32, unit-norm rows
    values/group_{g} : (N_g, d_h / s_n_V)  float32, unit-norm rows

(`W_D` in the paper has atoms as columns; rows make the gather `D[idx]` of the runtimes cheap.)
Version 2 adds, optionally per kind, the coding metric's whitening (see `csr_runtime.metric`):

    keys/whiten, keys/unwhiten     : (n_layers, n_kv_heads, d_h, d_h) float32, A and A⁻¹
    values/whiten, values/unwhiten : the same for values

and, optionally per kind, the mean every vector is coded relative to:

    keys/center, values/center     : (n_layers, n_kv_heads, d_h) float32, μ (pre-RoPE for keys)

A kind's dictionaries are trained on A (x − μ) (A = I without a whitening, μ = 0 without a center): the
runtimes code A (x − μ) and decode with A⁻¹ x̂ + μ (`coding_space`). Version-1 files (neither) still load.
Its metadata holds one JSON document under the key ``csr_dictionary``; `docs/dictionary-format.md`
describes every field. This module needs numpy and safetensors only, never torch: `mlx_backend`
reads it on a Mac without torch installed. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
METRICS = ("l2", "attention")
METADATA_KEY = "csr_dictionary"
KINDS = ("keys", "values")
INDEX_LIMIT = 32768  # int16 indices: offline + online + guard atoms must stay below this
_NORM_TOLERANCE = 5e-3  # float32 rows are unit-norm to ~1e-7; bf16 rows (`bf16_atoms`) to 2⁻⁸


@dataclass(frozen=True)
class ModelFingerprint:
    """What a dictionary must agree with in the model it is used on."""

    model_id: str
    n_layers: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_type: str = "default"

    def mismatches(self, other: "ModelFingerprint") -> list[str]:
        """Names and values of the architecture fields that differ (model_id is informative only)."""
        out = []
        for name in ("n_layers", "n_kv_heads", "head_dim", "rope_theta", "rope_type"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name}: dictionary has {mine!r}, model has {theirs!r}")
        return out


@dataclass
class KindDictionaries:
    """The offline dictionaries of one kind (keys or values).

    atoms[g] : (N_g, d_h / s_n) float32, unit-norm rows, for merged-layer group g.
    layer_to_group[l] = g says which dictionary serves layer l.
    """

    s_n: int
    sparsity: int
    layer_to_group: list[int]
    atoms: list[np.ndarray]
    metric: str = "l2"  # "attention": atoms live in the whitened space A x
    allocation: list[int] | None = None  # v2: atoms per chunk for each layer, chosen under a bit budget
    error_curve: np.ndarray | None = None  # v2: (n_layers, k_max + 1) mean squared error after k atoms per chunk
    whiten: np.ndarray | None = None  # (n_layers, n_kv_heads, d_h, d_h) A, with metric "attention"
    unwhiten: np.ndarray | None = None  # A⁻¹
    center: np.ndarray | None = None  # (n_layers, n_kv_heads, d_h) μ: vectors are coded as x − μ
    sensitivity: np.ndarray | None = None  # v2: (n_layers,) output KL per unit of error_curve, measured per layer

    def for_layer(self, layer: int) -> np.ndarray:
        return self.atoms[self.layer_to_group[layer]]


@dataclass
class DictionaryFile:
    model: ModelFingerprint
    keys: KindDictionaries
    values: KindDictionaries
    provenance: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)  # the cache settings this file was evaluated with (RUNTIME_KEYS)

    def kind(self, kind: str) -> KindDictionaries:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return self.keys if kind == "keys" else self.values

    def resolve_sparsity(
        self, sparsity: int | None = None, sparsity_keys: int | list[int] | None = None,
        sparsity_values: int | list[int] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Per layer: (s for keys, s per value chunk).

        `sparsity = s` is the paper's CSR-s: keys s, values s / s_n_V per chunk in every layer; otherwise the
        given per-kind values (one int, or one per layer); with none given, the file's allocation if it has one,
        else the sparsities the dictionaries were trained at."""
        n = self.model.n_layers
        if sparsity is not None:
            if isinstance(sparsity, bool) or not isinstance(sparsity, int) or sparsity < 1:
                raise ValueError(f"sparsity (CSR-s) must be a positive int, got {sparsity!r}")
            if sparsity_keys is not None or sparsity_values is not None:
                raise ValueError("give either sparsity (CSR-s naming) or sparsity_keys / sparsity_values, not both")
            s_n = self.values.s_n
            if sparsity % s_n:
                raise ValueError(f"CSR-{sparsity} splits values into s_n = {s_n} chunks: sparsity must be a multiple of {s_n}")
            return [sparsity] * n, [sparsity // s_n] * n
        out = []
        for kind, given in (("keys", sparsity_keys), ("values", sparsity_values)):
            d = self.kind(kind)
            if given is None:
                given = d.allocation if d.allocation is not None else d.sparsity
            per_layer = [given] * n if isinstance(given, int) else list(given)
            if len(per_layer) != n or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in per_layer):
                raise ValueError(f"sparsity_{kind} must be a positive int or {n} positive ints (one per layer), got {given!r}")
            out.append(per_layer)
        return out[0], out[1]

    def check_model(self, model: ModelFingerprint, *, path: str | os.PathLike = "dictionary") -> None:
        """Raise ValueError if this dictionary was made for another architecture than `model`."""
        diffs = self.model.mismatches(model)
        if diffs:
            raise ValueError(
                f"{path} was trained for {self.model.model_id!r}, not for {model.model_id!r} "
                f"({'; '.join(diffs)}): train a dictionary for this model with "
                f"`lightning fit --config configs/llama.yaml --data.model {model.model_id}`"
            )


def save_dictionary(path: str | os.PathLike, dictionary: DictionaryFile) -> Path:
    """Validate and write `dictionary` atomically (temp file + rename). Returns the path."""
    _validate(dictionary, source=str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for kind in KINDS:
        d = dictionary.kind(kind)
        for g, atoms in enumerate(d.atoms):
            tensors[f"{kind}/group_{g}"] = np.ascontiguousarray(atoms, dtype=np.float32)
        if d.error_curve is not None:
            tensors[f"{kind}/error_curve"] = np.ascontiguousarray(d.error_curve, dtype=np.float32)
        if d.whiten is not None:
            tensors[f"{kind}/whiten"] = np.ascontiguousarray(d.whiten, dtype=np.float32)
            tensors[f"{kind}/unwhiten"] = np.ascontiguousarray(d.unwhiten, dtype=np.float32)
        if d.center is not None:
            tensors[f"{kind}/center"] = np.ascontiguousarray(d.center, dtype=np.float32)
        if d.sensitivity is not None:
            tensors[f"{kind}/sensitivity"] = np.ascontiguousarray(d.sensitivity, dtype=np.float32)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": asdict(dictionary.model),
        "provenance": dictionary.provenance,
    }
    if dictionary.runtime:
        meta["runtime"] = dict(dictionary.runtime)
    for kind in KINDS:
        d = dictionary.kind(kind)
        meta[kind] = {
            "s_n": d.s_n,
            "sparsity": d.sparsity,
            "layer_to_group": list(d.layer_to_group),
            "n_atoms": [int(a.shape[0]) for a in d.atoms],
            "metric": d.metric,
        }
        if d.allocation is not None:
            meta[kind]["allocation"] = list(d.allocation)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


HUB_FILENAME = "dictionary.safetensors"
# cache settings a file may carry (`runtime`): the ones it was evaluated with, used when a caller gives none
RUNTIME_KEYS = ("sparsity", "sparsity_keys", "sparsity_values", "code_bits_per_channel", "key_weight", "online_atoms",
                "guard_atoms", "guard_threshold", "window", "refine_fraction", "refine_atoms", "sink_tokens", "coef_format")


def is_hub_id(source: str | os.PathLike) -> bool:
    """`org/name` that is not a local path: a Hugging Face Hub repository."""
    text = str(source)
    parts = text.split("/")
    return (not Path(text).expanduser().exists() and len(parts) == 2 and all(parts)
            and not text.startswith((".", "~")) and not text.endswith((".safetensors", ".st")))


def resolve_dictionary(source: str | os.PathLike, *, revision: str | None = None, filename: str = HUB_FILENAME) -> Path:
    """A local path as is; a Hub repo id (`org/name`) → the file from the Hugging Face cache, downloaded if
    needed (`huggingface_hub`, which honours HF_HUB_OFFLINE, HF_HUB_CACHE and HF_TOKEN)."""
    if not is_hub_id(source):
        return Path(source).expanduser()
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers and mlx-lm
        raise ValueError(f"{source!r} looks like a Hub repo id: `pip install huggingface_hub` to load it") from None
    try:
        return Path(hf_hub_download(str(source), filename, revision=revision))
    except LocalEntryNotFoundError:
        raise ValueError(
            f"dictionary {source!r} ({filename}{f' @ {revision}' if revision else ''}) is not in the local Hugging Face "
            f"cache and the Hub cannot be reached (offline, or HF_HUB_OFFLINE=1): run once with network, or pass a "
            f"local file") from None
    except RepositoryNotFoundError:
        raise ValueError(f"dictionary {source!r}: no such Hub repository (or it is private: log in with "
                         f"`huggingface-cli login`)") from None
    except EntryNotFoundError:
        raise ValueError(f"Hub repository {source!r} has no file {filename!r}: pass filename= the dictionary's "
                         f"name in that repository") from None


def load_dictionary(path: str | os.PathLike, *, model: ModelFingerprint | None = None, revision: str | None = None,
                    filename: str = HUB_FILENAME) -> DictionaryFile:
    """Read and validate a dictionary file (a local path, or a Hub repo id `org/name` with optional `revision`
    and `filename`); with `model`, also check it was made for that model."""
    path = resolve_dictionary(path, revision=revision, filename=filename)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a dictionary file: pass the dictionary.safetensors inside it")
    if not path.is_file():
        raise FileNotFoundError(f"dictionary file {path} does not exist: `lightning fit --config configs/llama.yaml` "
                                f"exports one (runs/.../dictionary.safetensors)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            names = list(f.keys())
            if raw is None:
                raise ValueError(f"{path}: metadata key {METADATA_KEY!r} is missing: not a CSR dictionary file")
            tensors = {name: f.get_tensor(name) for name in names}
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); re-export or re-download "
                         f"it") from None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from None
    version = _field(meta, "format_version", path)
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ValueError(f"{path}: format_version {version!r} is unknown; this reader knows {list(READABLE_VERSIONS)}")
    m = _field(meta, "model", path)
    try:
        fingerprint = ModelFingerprint(**m)
    except TypeError as e:
        raise ValueError(f"{path}: field 'model' is malformed ({e})") from None
    for name, kinds_allowed in (("model_id", str), ("n_layers", int), ("n_kv_heads", int), ("head_dim", int),
                                ("rope_theta", (int, float)), ("rope_type", str)):
        value = getattr(fingerprint, name)
        if isinstance(value, bool) or not isinstance(value, kinds_allowed) or (kinds_allowed is int and value < 1):
            raise ValueError(f"{path}: field 'model.{name}' = {value!r} has the wrong type or value")
    expected = set()
    for kind in KINDS:
        n_atoms = _field(_field(meta, kind, path), "n_atoms", path, f"{kind}.n_atoms")
        if not isinstance(n_atoms, list) or not all(type(n) is int for n in n_atoms):
            raise ValueError(f"{path}: field '{kind}.n_atoms' must be a list of ints, got {n_atoms!r}")
        expected |= {f"{kind}/group_{g}" for g in range(len(n_atoms))}
        expected |= {f"{kind}/{extra}" for extra in ("error_curve", "whiten", "unwhiten", "center", "sensitivity")}
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise ValueError(f"{path}: tensors {unknown} are not part of the format (docs/dictionary-format.md)")
    wrong = sorted(name for name, t in tensors.items() if t.dtype != np.float32)
    if wrong:
        raise ValueError(f"{path}: tensors {wrong} must be float32, got {[str(tensors[n].dtype) for n in wrong]}")
    kinds = {}
    for kind in KINDS:
        k = _field(meta, kind, path)
        n_atoms = _field(k, "n_atoms", path, f"{kind}.n_atoms")
        atoms = []
        for g in range(len(n_atoms)):
            name = f"{kind}/group_{g}"
            if name not in tensors:
                raise ValueError(f"{path}: tensor {name!r} is missing (metadata lists {len(n_atoms)} groups)")
            atoms.append(tensors[name])
        kinds[kind] = KindDictionaries(
            s_n=_field(k, "s_n", path, f"{kind}.s_n"),
            sparsity=_field(k, "sparsity", path, f"{kind}.sparsity"),
            layer_to_group=list(_field(k, "layer_to_group", path, f"{kind}.layer_to_group")),
            atoms=atoms,
            metric=k.get("metric", "l2"),
            allocation=k.get("allocation"),
            error_curve=tensors.get(f"{kind}/error_curve"),
            whiten=tensors.get(f"{kind}/whiten"),
            unwhiten=tensors.get(f"{kind}/unwhiten"),
            center=tensors.get(f"{kind}/center"),
            sensitivity=tensors.get(f"{kind}/sensitivity"),
        )
        for g, (n, a) in enumerate(zip(n_atoms, atoms)):
            if a.shape[0] != n:
                raise ValueError(f"{path}: {kind}.n_atoms[{g}] = {n} but tensor {kind}/group_{g} has {a.shape[0]} rows")
    runtime = meta.get("runtime", {})
    if not isinstance(runtime, dict) or set(runtime) - set(RUNTIME_KEYS):
        raise ValueError(f"{path}: field 'runtime' must be a dict with keys from {list(RUNTIME_KEYS)}, got {runtime!r}")
    dictionary = DictionaryFile(fingerprint, kinds["keys"], kinds["values"], meta.get("provenance", {}), runtime)
    _validate(dictionary, source=str(path))
    if model is not None:
        dictionary.check_model(model, path=path)
    return dictionary


def _field(meta: dict, name: str, path, label: str | None = None):
    if not isinstance(meta, dict) or name not in meta:
        raise ValueError(f"{path}: required field {label or name!r} is missing")
    return meta[name]


def _validate(d: DictionaryFile, *, source: str) -> None:
    head_dim = d.model.head_dim
    if (d.keys.sensitivity is None) != (d.values.sensitivity is None):
        raise ValueError(f"{source}: keys/sensitivity and values/sensitivity weigh the two kinds against each other: "
                         f"give both or neither")
    for kind in KINDS:
        k = d.kind(kind)
        if type(k.s_n) is not int or k.s_n < 1 or head_dim % k.s_n:
            raise ValueError(f"{source}: {kind}.s_n = {k.s_n!r} must be a positive divisor of head_dim = {head_dim}")
        if type(k.sparsity) is not int or k.sparsity < 1:
            raise ValueError(f"{source}: {kind}.sparsity = {k.sparsity!r} must be a positive integer")
        if len(k.layer_to_group) != d.model.n_layers:
            raise ValueError(
                f"{source}: {kind}.layer_to_group has {len(k.layer_to_group)} entries, "
                f"model.n_layers is {d.model.n_layers}"
            )
        if not k.atoms:
            raise ValueError(f"{source}: {kind} has no dictionaries")
        bad = sorted({g for g in k.layer_to_group if not (isinstance(g, int) and 0 <= g < len(k.atoms))}, key=str)
        if bad:
            raise ValueError(f"{source}: {kind}.layer_to_group names groups {bad}, only 0..{len(k.atoms) - 1} exist")
        if k.allocation is not None and (len(k.allocation) != d.model.n_layers
                                         or not all(isinstance(a, int) and a >= 1 for a in k.allocation)):
            raise ValueError(f"{source}: {kind}.allocation must hold {d.model.n_layers} positive ints (atoms per chunk, "
                             f"one per layer), got {k.allocation!r}")
        curve = k.error_curve
        if curve is not None and (curve.ndim != 2 or curve.shape[0] != d.model.n_layers or curve.shape[1] < 2
                                  or not np.isfinite(curve).all() or (curve < 0).any()):
            raise ValueError(f"{source}: {kind}/error_curve must be finite, non-negative, of shape (n_layers, k_max + 1) "
                             f"= ({d.model.n_layers}, ≥ 2); got {tuple(curve.shape)}")
        sens = k.sensitivity
        if sens is not None and (sens.shape != (d.model.n_layers,) or not np.isfinite(sens).all() or (sens < 0).any()):
            raise ValueError(f"{source}: {kind}/sensitivity must be finite, non-negative, of shape (n_layers,) = "
                             f"({d.model.n_layers},); got {tuple(sens.shape)}")
        if k.metric not in METRICS:
            raise ValueError(f"{source}: {kind}.metric = {k.metric!r}; supported: {list(METRICS)}")
        whitened = k.metric == "attention"
        if whitened != (k.whiten is not None) or whitened != (k.unwhiten is not None):
            raise ValueError(f"{source}: {kind}.metric = {k.metric!r} needs tensors {kind}/whiten and {kind}/unwhiten "
                             f"exactly when it is 'attention'")
        if whitened:
            shape = (d.model.n_layers, d.model.n_kv_heads, head_dim, head_dim)
            for name, t in (("whiten", k.whiten), ("unwhiten", k.unwhiten)):
                if tuple(t.shape) != shape or not np.isfinite(t).all():
                    raise ValueError(f"{source}: {kind}/{name} has shape {tuple(t.shape)} (or non-finite entries), "
                                     f"expected finite (n_layers, n_kv_heads, d_h, d_h) = {shape}")
            product = k.whiten.astype(np.float64) @ k.unwhiten.astype(np.float64)
            if np.abs(product - np.eye(head_dim)).max() > 1e-2:
                raise ValueError(f"{source}: {kind}/unwhiten is not the inverse of {kind}/whiten")
        shape = (d.model.n_layers, d.model.n_kv_heads, head_dim)
        if k.center is not None and (tuple(k.center.shape) != shape or not np.isfinite(k.center).all()):
            raise ValueError(f"{source}: {kind}/center has shape {tuple(k.center.shape)} (or non-finite entries), "
                             f"expected finite (n_layers, n_kv_heads, d_h) = {shape}")
        width = head_dim // k.s_n
        for g, a in enumerate(k.atoms):
            where = f"{source}: {kind}/group_{g}"
            if a.ndim != 2 or a.shape[1] != width:
                raise ValueError(f"{where} has shape {tuple(a.shape)}, expected (N, head_dim / s_n) = (N, {width})")
            if not 1 <= a.shape[0] < INDEX_LIMIT:
                raise ValueError(f"{where} has {a.shape[0]} atoms; int16 indices allow 1..{INDEX_LIMIT - 1}")
            if not np.isfinite(a).all():
                raise ValueError(f"{where} has non-finite entries")
            norms = np.linalg.norm(a.astype(np.float64), axis=1)
            worst = int(np.argmax(np.abs(norms - 1.0)))
            if abs(norms[worst] - 1.0) > _NORM_TOLERANCE:
                raise ValueError(f"{where}: atom {worst} has norm {norms[worst]:.4g}, atoms must be unit-norm")


def bf16_atoms(atoms: np.ndarray) -> np.ndarray:
    """Atoms (N, w) → their nearest bf16 values (ties to even), kept as float32: each entry moves by at most 2⁻⁸ of
    itself, so a unit norm by at most 2⁻⁸ (`_NORM_TOLERANCE` allows it). On a CPU with Intel AMX the runtime makes
    exact scores from such atoms with two bf16 products instead of three."""
    bits = np.ascontiguousarray(atoms, dtype=np.float32).view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def coding_space(vectors: np.ndarray, n_kv_heads: int, center: np.ndarray | None = None,
                 whiten: np.ndarray | None = None) -> np.ndarray:
    """One layer's (tokens · H, d_h) head vectors (rows head-minor) → A_h (x − μ_h) float32, the vectors its
    dictionaries code. center: (H, d_h) μ or None; whiten: (H, d_h, d_h) A or None."""
    x = np.asarray(vectors, dtype=np.float32).reshape(-1, n_kv_heads, vectors.shape[-1])
    if center is not None:
        x = x - center[None].astype(np.float32)
    if whiten is not None:
        x = np.einsum("hij,nhj->nhi", whiten.astype(np.float32), x)
    return x.reshape(len(vectors), -1)
