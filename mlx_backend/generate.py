"""Generate text with an mlx-lm model whose KV cache is stored as CSR codes, next to a plain KVCache.

    python -m mlx_backend.generate --dictionary runs/llama/.../dictionary.safetensors \
        --prompt "The capital of France is" --max-tokens 40
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from csr_core import defaults
from csr_core.code_layout import COEF_FORMATS
from csr_core.prompts import chat_prompt
from mlx_backend.cache import cache_nbytes, make_csr_cache
from mlx_backend.convert import EMBEDDED_MODEL, mlx_source


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EMBEDDED_MODEL, help="embedded alias, local HF or mlx-lm folder, or a Hub id (downloaded by mlx-lm when online)")
    p.add_argument("--dictionary", required=True, help="dictionary file from `lightning fit`")
    p.add_argument("--prompt", default="The three most important ideas of the Python language are")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy), as mlx_lm.generate")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0: off), as mlx_lm.generate")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    p.add_argument("--raw-prompt", action="store_true", help="send the prompt as is (default: the chat template of "
                   "an Instruct model, raw text for a base model)")
    p.add_argument("--compare-kv-cache", action="store_true",
                   help="also generate with mlx-lm's plain KVCache and print its speed, memory and text")
    p.add_argument("--sparsity", type=int, default=None,
                   help="CSR-s: keys s atoms, values s / s_n per chunk (default: the dictionary file's allocation or sparsity)")
    p.add_argument("--online-atoms", type=int, default=None,
                   help=f"default: the dictionary file's setting, else {defaults.ONLINE_ATOMS}")
    p.add_argument("--guard-atoms", type=int, default=None,
                   help=f"default: the dictionary file's setting, else {defaults.GUARD_ATOMS}")
    p.add_argument("--window", type=int, default=None,
                   help=f"default: the dictionary file's setting, else {defaults.WINDOW}")
    p.add_argument("--sink-tokens", type=int, default=None,
                   help=f"default: the dictionary file's setting, else {defaults.SINK_TOKENS}")
    p.add_argument("--coef-format", default=None, choices=list(COEF_FORMATS),
                   help=f"default: the dictionary file's setting, else {defaults.COEF_FORMAT}")
    return p


def run(model, tokenizer, prompt: str, prompt_cache, max_tokens: int, sampler=None, stream: bool = False):
    from mlx_lm import stream_generate

    started, text, n = time.perf_counter(), "", 0
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, prompt_cache=prompt_cache,
                                    sampler=sampler):
        if stream:
            print(response.text, end="", flush=True)
        text += response.text
        n = response.generation_tokens
        tps = response.generation_tps
    return text, tps, time.perf_counter() - started, n


def main(argv=None) -> None:
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    args = setup_arg_parser().parse_args(argv)
    model, tokenizer = load(mlx_source(args.model))
    csr = make_csr_cache(model, args.dictionary, sparsity=args.sparsity, online_atoms=args.online_atoms,
                         guard_atoms=args.guard_atoms, window=args.window, sink_tokens=args.sink_tokens,
                         coef_format=args.coef_format, model_id=args.model)
    from mlx_lm.sample_utils import make_sampler

    if args.seed is not None:
        mx.random.seed(args.seed)
    sampler = make_sampler(temp=args.temp, top_p=args.top_p)
    prompt = chat_prompt(tokenizer, args.prompt, chat=not args.raw_prompt)
    if args.raw_prompt:
        print(args.prompt, end="", flush=True)
    text, tps, seconds, n = run(model, tokenizer, prompt, csr, args.max_tokens, sampler, stream=True)
    print("\n")
    line = f"CSR-{args.sparsity or 'file'}: {tps:.1f} tokens/s, cache {cache_nbytes(csr) / 2**10:.1f} KiB"
    if not args.compare_kv_cache:
        print(line)
        return
    plain = make_prompt_cache(model)
    plain_text, plain_tps, _, _ = run(model, tokenizer, prompt, plain, args.max_tokens, sampler)
    print(f"{line} | KVCache: {plain_tps:.1f} tokens/s, cache {sum(c.nbytes for c in plain) / 2**10:.1f} KiB")
    print(f"KVCache text: {plain_text}")


if __name__ == "__main__":
    main()
