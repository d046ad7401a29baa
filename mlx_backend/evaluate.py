"""Perplexity of mlx-lm caches on the held-out corpus, with the protocol of `csr_eval.evaluate`.

A prefix of P tokens is prefilled into the cache; the following tokens are scored by decoding them in
chunks of c tokens from the cache. Compares KVCache, mlx-lm's 4-bit QuantizedKVCache and the CSR cache
in one run.

    python -m mlx_backend.evaluate --dictionary runs/llama/.../dictionary.safetensors
"""

from __future__ import annotations

import argparse
import math
import time

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from csr_core import defaults
from mlx_backend.cache import make_csr_cache
from mlx_backend.convert import EMBEDDED_MODEL, mlx_source


def chunked_log_probs(model, ids: list[int], prompt_cache, *, prefix: int, chunk: int) -> np.ndarray:
    """log p(ids[t]) for t = prefix .. L−1, each predicted from the cache (float32 numpy)."""
    logits = model(mx.array(ids[:prefix])[None], cache=prompt_cache)[0, -1:]
    rows = [logits]
    for start in range(prefix, len(ids) - 1, chunk):
        rows.append(model(mx.array(ids[start : min(start + chunk, len(ids) - 1)])[None], cache=prompt_cache)[0])
    logits = mx.concatenate(rows).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    targets = mx.array(ids[prefix:])
    return np.array(mx.take_along_axis(logp, targets[:, None], axis=-1)[:, 0])


def held_out_windows(tokenizer, corpus: str, length: int, count: int) -> list[list[int]]:
    from csr_core.corpus import load_corpus

    stream: list[int] = []
    for doc in load_corpus(corpus, "test"):
        stream += tokenizer.encode(doc.text, add_special_tokens=False) + [tokenizer.eos_token_id]
        if len(stream) >= length * count:
            break
    if len(stream) < length:
        raise ValueError(f"the test split of {corpus!r} has {len(stream)} tokens, fewer than one window of {length}")
    return [stream[i * length : (i + 1) * length] for i in range(min(count, len(stream) // length))]


def main(argv=None) -> None:
    from mlx_lm import load
    from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--dictionary", required=True)
    p.add_argument("--corpus", default="python-docs")
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--prefix-fraction", type=float, default=0.5)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--sparsity", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--online-atoms", type=int, default=None,
                   help=f"default: the dictionary file's setting, else {defaults.ONLINE_ATOMS}")
    p.add_argument("--guard-atoms", type=int, default=None,
                   help=f"default: the dictionary file's setting, else {defaults.GUARD_ATOMS}")
    p.add_argument("--sink-tokens", type=int, default=None,
                   help=f"default: the dictionary file's setting, else {defaults.SINK_TOKENS}")
    args = p.parse_args(argv)
    model, tokenizer = load(mlx_source(args.model))
    n_layers = len(model.layers)
    methods = {"KVCache": lambda: make_prompt_cache(model),
               "QuantizedKVCache 4-bit": lambda: [QuantizedKVCache(group_size=64, bits=4) for _ in range(n_layers)]}
    for s in args.sparsity:
        methods[f"CSR-{s}"] = lambda s=s: make_csr_cache(model, args.dictionary, sparsity=s, online_atoms=args.online_atoms,
                                                         guard_atoms=args.guard_atoms, sink_tokens=args.sink_tokens,
                                                         model_id=args.model)
    windows = held_out_windows(tokenizer, args.corpus, args.context_length, args.sequences)
    prefix = int(args.context_length * args.prefix_fraction)
    print("| method | perplexity | cache KiB | seconds |\n|---|---|---|---|")
    for name, make in methods.items():
        started, logps, nbytes = time.perf_counter(), [], 0
        for ids in tqdm(windows, desc=f"Evaluating {name}", unit="sequence", leave=False, dynamic_ncols=True):
            cache = make()
            logps.append(chunked_log_probs(model, ids, cache, prefix=prefix, chunk=args.chunk))
            nbytes = sum(c.nbytes for c in cache)
        ppl = math.exp(-float(np.concatenate(logps).mean()))
        print(f"| {name} | {ppl:.3f} | {nbytes / 2**10:.1f} | {time.perf_counter() - started:.1f} |", flush=True)


if __name__ == "__main__":
    main()
