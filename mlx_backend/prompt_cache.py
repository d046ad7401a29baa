"""Save and load CSR prompt caches: mlx-lm's `save_prompt_cache` / `load_prompt_cache`, for CSR caches.

mlx-lm's loader rebuilds only its own cache classes (it looks their names up in its own module), so CSR
prompt caches have their own pair, in the same container (one safetensors file): every array a layer
holds — window, sinks, packed codes, each row's online and guard atoms — and, as JSON metadata, the
cache settings and each layer's counters. The offline dictionaries are not copied: `load_prompt_cache`
reads the dictionary file again and checks it against the model, as `make_csr_cache` does.

    save_prompt_cache("prompt.safetensors", cache)                       # after a prefill
    cache = load_prompt_cache("prompt.safetensors", model, "dictionary.safetensors")
    mlx_lm.generate(model, tokenizer, prompt=rest, prompt_cache=cache)   # continues where it stopped
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import mlx.core as mx

from mlx_backend.cache import CSRKVCache, make_csr_cache

METADATA_KEY = "csr_prompt_cache"
FORMAT_VERSION = 1


def save_prompt_cache(path: str | os.PathLike, cache: list[CSRKVCache], metadata: dict[str, str] | None = None) -> None:
    """Write `cache` (a list of CSRKVCache, one per layer) to `path`; `metadata` is kept as strings."""
    if not cache or not all(isinstance(layer, CSRKVCache) for layer in cache):
        raise ValueError("save_prompt_cache takes the CSR prompt cache of `make_csr_cache` (a list of CSRKVCache); "
                         "save other caches with mlx_lm.models.cache.save_prompt_cache")
    arrays, layers = {}, []
    for l, layer in enumerate(cache):
        held, meta = layer.save_state()
        arrays.update({f"{l}.{name}": a for name, a in held.items()})
        layers.append(meta)
    info = {"format_version": FORMAT_VERSION, "settings": asdict(cache[0].settings), "layers": layers}
    mx.save_safetensors(str(path), arrays, {**(metadata or {}), METADATA_KEY: json.dumps(info)})


def load_prompt_cache(path: str | os.PathLike, model, dictionary, *, return_metadata: bool = False):
    """Rebuild the CSR prompt cache saved in `path` for `model` with its `dictionary` (a path or DictionaryFile)."""
    arrays, metadata = mx.load(str(path), return_metadata=True)
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not a CSR prompt cache (no {METADATA_KEY!r} metadata): load caches saved by "
                         f"mlx-lm with mlx_lm.models.cache.load_prompt_cache")
    info = json.loads(metadata.pop(METADATA_KEY))
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: CSR prompt cache format {info.get('format_version')!r}; this reader knows {FORMAT_VERSION}")
    settings = dict(info["settings"])
    settings.pop("s_n_values")  # the dictionary's
    cache = make_csr_cache(model, dictionary, **settings)
    if len(cache) != len(info["layers"]):
        raise ValueError(f"{path} holds {len(info['layers'])} layers, the model has {len(cache)}")
    for l, (layer, meta) in enumerate(zip(cache, info["layers"])):
        prefix = f"{l}."
        layer.load_state({name[len(prefix):]: a for name, a in arrays.items() if name.startswith(prefix)}, meta)
    return (cache, metadata) if return_metadata else cache
