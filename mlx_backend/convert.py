"""Make an mlx-lm model folder from the embedded SmolLM2 or a local Hugging Face folder.

mlx-lm loads Hugging Face Llama folders directly, with one catch this module fixes: transformers ≥ 5
writes RoPE settings as `rope_parameters`, which mlx-lm does not read, so it would silently fall
back to θ = 10 000 (SmolLM2 uses 100 000). The folder gets a config with `rope_theta` (and
`rope_scaling`) spelled out. On a Mac with network, `mlx_lm.load("<hub id>")` also works directly.

    python -m mlx_backend.convert --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from csr_core.paths import cache_root

EMBEDDED_MODEL = "smollm2-135m-instruct"


def conversion_key(source: Path) -> str:
    """What a converted folder is cached under: the source folder's name, plus a hash of its resolved path and
    its config.json, so two different folders called `model` (or one folder whose config changed) never share
    a conversion."""
    config = (source / "config.json").read_bytes()
    digest = hashlib.sha256(str(source.resolve()).encode() + b"\0" + config).hexdigest()[:12]
    return f"{source.name}-{digest}"


def mlx_model_dir(model: str = EMBEDDED_MODEL) -> Path:
    """The mlx-lm folder for `model`, converted on first use (the embedded GGUF needs torch once)."""
    if model == EMBEDDED_MODEL:
        from csr_core.models import converted_embedded_model  # GGUF → safetensors, needs torch once

        source = converted_embedded_model()
    else:
        source = Path(model)
    if not (source / "config.json").is_file():
        raise ValueError(f"{model!r} is neither the embedded model nor a local Hugging Face folder; on a machine "
                         f"with network, mlx_lm.load({model!r}) loads a hub id directly")
    target = cache_root() / "mlx" / conversion_key(source)
    if (target / "config.json").is_file():
        return target
    print(f"Converting {source} into an mlx-lm folder {target} (links the weights; seconds) ...", flush=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and f.name != "config.json":
            try:  # weights are large: link them where the file system allows it
                (tmp / f.name).symlink_to(f.resolve())
            except OSError:
                shutil.copy2(f, tmp / f.name)
    config = json.loads((source / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def mlx_source(model: str = EMBEDDED_MODEL) -> str:
    """What to hand `mlx_lm.load`: the converted folder for the embedded alias or a local Hugging Face folder,
    the name itself for anything else (a Hub id such as `mlx-community/...`, downloaded by mlx-lm when online)."""
    if model == EMBEDDED_MODEL or (Path(model).expanduser() / "config.json").is_file():
        return str(mlx_model_dir(str(Path(model).expanduser()) if model != EMBEDDED_MODEL else model))
    if Path(model).expanduser().exists():
        raise ValueError(f"{model!r} is a local path without a config.json: not a Hugging Face or mlx-lm model folder")
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Convert a model into an mlx-lm folder")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="the embedded alias or a local Hugging Face folder")
    print(mlx_model_dir(p.parse_args(argv).model))


if __name__ == "__main__":
    main()
