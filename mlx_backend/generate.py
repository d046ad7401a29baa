"""`mlx_lm.generate` with the KV cache stored as CSR codes: mlx-lm's own command line and generation loop
(sampling, chat templates, streaming, `--max-tokens`, Hub ids when online), plus the CSR options.

    python -m mlx_backend.generate --csr-dictionary runs/llama/.../dictionary.safetensors \
        --prompt "What is the capital of France?" --max-tokens 40

Every flag of `mlx_lm.generate` works as there (`--temp`, `--top-p`, `--seed`, `--system-prompt`,
`--ignore-chat-template`, `--verbose` ...); `--model` defaults to the embedded SmolLM2, and local
Hugging Face folders are converted for mlx-lm (`mlx_backend.convert`). mlx-lm builds the CSR cache
itself (`cache.install`). `--compare-kv-cache` runs the same command once more with mlx-lm's plain cache.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from csr_core import defaults
from csr_core.code_layout import COEF_FORMATS
from mlx_backend.cache import cache_nbytes, install
from mlx_backend.convert import EMBEDDED_MODEL, mlx_source

# CSR option → make_csr_cache keyword
CSR_OPTIONS = {"csr_sparsity": "sparsity", "csr_online_atoms": "online_atoms", "csr_guard_atoms": "guard_atoms",
               "csr_window": "window", "csr_coding_batch": "coding_batch", "csr_sink_tokens": "sink_tokens",
               "csr_refine_fraction": "refine_fraction", "csr_refine_atoms": "refine_atoms",
               "csr_coef_format": "coef_format"}
# mlx-lm flags that build another cache than the one CSR installs
CONFLICTS = {"kv_bits": "--kv-bits", "prompt_cache_file": "--prompt-cache-file", "draft_model": "--draft-model",
             "max_kv_size": "--max-kv-size"}


def add_csr_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CSR cache")
    g.add_argument("--csr-dictionary", required=True, help="dictionary file (from `lightning fit`) or Hub repo id")
    g.add_argument("--csr-sparsity", type=int, default=None,
                   help="CSR-s: keys s atoms, values s / s_n per chunk (default: the file's allocation or sparsity)")
    for name, constant in (("online-atoms", "ONLINE_ATOMS"), ("guard-atoms", "GUARD_ATOMS"), ("window", "WINDOW"),
                           ("coding-batch", "CODING_BATCH"), ("refine-atoms", "REFINE_ATOMS"), ("sink-tokens", "SINK_TOKENS")):
        g.add_argument(f"--csr-{name}", type=int, default=None,
                       help=f"default: the dictionary file's setting, else {getattr(defaults, constant)}")
    g.add_argument("--csr-refine-fraction", type=float, default=None,
                   help=f"share of coded vectors that get --csr-refine-atoms more atoms (the worst coded); default: the "
                        f"dictionary file's setting, else {defaults.REFINE_FRACTION}")
    g.add_argument("--csr-coef-format", default=None, choices=list(COEF_FORMATS),
                   help=f"default: the dictionary file's setting, else {defaults.COEF_FORMAT}")
    g.add_argument("--compare-kv-cache", action="store_true",
                   help="run the same generation again with mlx-lm's plain KVCache (speed, memory, text)")


def setup_arg_parser() -> argparse.ArgumentParser:
    """mlx-lm's parser, `--model` defaulting to the embedded SmolLM2, with the CSR options added."""
    from mlx_lm.generate import setup_arg_parser as mlx_lm_parser

    p = mlx_lm_parser()
    p.description = __doc__.splitlines()[0]
    p.set_defaults(model=EMBEDDED_MODEL)
    add_csr_arguments(p)
    return p


def main(argv: list[str] | None = None) -> None:
    from mlx_lm.models.cache import KVCache

    mlx_lm_generate = importlib.import_module("mlx_lm.generate")  # the module (`mlx_lm.generate` is also a function)

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = setup_arg_parser()
    args = parser.parse_args(argv)  # every flag checked (and --help answered) before anything loads
    for dest, flag in CONFLICTS.items():
        if getattr(args, dest, None) is not None:
            parser.error(f"{flag} builds a cache of its own; it cannot be combined with the CSR cache")
    csr_only = argparse.ArgumentParser(add_help=False)
    add_csr_arguments(csr_only)
    _, mlx_lm_argv = csr_only.parse_known_args(argv)  # what is left is mlx-lm's own command line
    mlx_lm_argv += ["--model", mlx_source(args.model)]
    options = {keyword: getattr(args, dest) for dest, keyword in CSR_OPTIONS.items()}
    built = []

    def load_with(make_cache):
        def load(*a, **kw):
            model, *rest = original_load(*a, **kw)
            make_cache(model)
            recording = model.make_cache
            model.make_cache = lambda: built.append(recording()) or built[-1]
            return (model, *rest)
        return load

    def csr(model):
        install(model, args.csr_dictionary, model_id=args.model, **options)

    def plain(model):
        model.make_cache = lambda: [KVCache() for _ in model.layers]

    original_load, original_argv = mlx_lm_generate.load, sys.argv
    runs = [("CSR", csr)] + ([("KVCache", plain)] if args.compare_kv_cache else [])
    try:
        for name, make_cache in runs:
            if len(runs) > 1:
                print(f"==== {name} ====")
            mlx_lm_generate.load, sys.argv = load_with(make_cache), ["mlx_backend.generate", *mlx_lm_argv]
            mlx_lm_generate.main()
            print(f"{name} cache: {cache_nbytes(built[-1]) / 2**10:.1f} KiB after {built[-1][0].offset} tokens")
    finally:
        mlx_lm_generate.load, sys.argv = original_load, original_argv


if __name__ == "__main__":
    main()
