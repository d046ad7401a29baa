"""Benchmark: MLX runtime vs PyTorch kernels and vs mlx-lm's own caches, in one run.

1. MP throughput (vectors/s) of the MLX kernel vs the torch kernel on the same real SmolLM2 keys.
2. Decode tokens/s and cache bytes of the CSR cache vs mlx-lm's KVCache and 4-bit QuantizedKVCache
   after a prefill of `--context` held-out tokens.

    python benchmarks/mlx_speed.py --dictionary runs/llama/neuraldict/version_1/dictionary.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

from csr_core.dictionary_file import load_dictionary
from csr_runtime.sparse_coding import sparse_encode as torch_encode
from mlx_backend.cache import make_csr_cache
from mlx_backend.convert import mlx_model_dir
from mlx_backend.evaluate import held_out_windows
from mlx_backend.sparse_coding import sparse_encode as mlx_encode
from neuraldict.collect import collect_kv


def decode_speed(model, ids, cache, steps):
    logits = model(mx.array(ids)[None], cache=cache)
    token = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(token)
    started = time.perf_counter()
    for _ in range(steps):
        token = mx.argmax(model(token, cache=cache)[:, -1:], axis=-1)
        mx.eval(token)
    return steps / (time.perf_counter() - started), sum(c.nbytes for c in cache)


def main(argv=None) -> None:
    from mlx_lm import load
    from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dictionary", required=True)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sparsity", type=int, default=4)
    p.add_argument("--output", default="benchmarks/results/mlx_speed.md")
    args = p.parse_args(argv)

    # GEMM rate of each library on this machine, for context (mlx[cpu] on Linux has no Accelerate BLAS)
    a_t, a_mx = torch.randn(1024, 1024), mx.random.normal((1024, 1024))
    started = time.perf_counter()
    a_t @ a_t
    torch_gflops = 2 * 1024**3 / (time.perf_counter() - started) / 1e9
    mx.eval(a_mx @ a_mx)
    started = time.perf_counter()
    mx.eval(a_mx @ a_mx)
    mlx_gflops = 2 * 1024**3 / (time.perf_counter() - started) / 1e9

    x = collect_kv(split="train", max_tokens=16384).vectors(15, "keys")[:20000].astype(np.float32)
    D = load_dictionary(args.dictionary).keys.for_layer(15)
    started = time.perf_counter()
    torch_encode(torch.from_numpy(x), torch.from_numpy(D), s=args.sparsity)
    torch_rate = len(x) / (time.perf_counter() - started)
    x_mx, D_mx = mx.array(x), mx.array(D)
    mx.eval(*mlx_encode(x_mx[:256], D_mx, s=args.sparsity))  # warm-up
    started = time.perf_counter()
    mx.eval(*mlx_encode(x_mx, D_mx, s=args.sparsity))
    mlx_rate = len(x) / (time.perf_counter() - started)

    model, tokenizer = load(str(mlx_model_dir()))
    ids = held_out_windows(tokenizer, "python-docs", args.context, 1)[0]
    n_layers = len(model.layers)
    caches = {"KVCache": lambda: make_prompt_cache(model),
              "QuantizedKVCache 4-bit": lambda: [QuantizedKVCache(group_size=64, bits=4) for _ in range(n_layers)],
              f"CSR-{args.sparsity}": lambda: make_csr_cache(model, args.dictionary, sparsity=args.sparsity,
                                                             online_atoms=64, guard_atoms=64)}
    rows = [(name, *decode_speed(model, ids, make(), args.steps)) for name, make in caches.items()]
    base = rows[0][1]
    lines = [f"GEMM 1024³ float32 on this machine: torch {torch_gflops:.1f} GFLOP/s, MLX {mlx_gflops:.1f} GFLOP/s.", "",
             f"MP, s = {args.sparsity}, N = {len(D)}, 20 000 real keys (layer 15): torch-CPU {torch_rate:,.0f} vectors/s, "
             f"MLX-CPU {mlx_rate:,.0f} vectors/s ({mlx_rate / torch_rate:.2f}× torch).", "",
             f"Decode after a {args.context}-token prefill, {args.steps} greedy steps, batch 1, {mx.default_device()}:", "",
             "| cache | tokens/s | × KVCache | cache KiB |", "|---|---|---|---|"]
    lines += [f"| {n} | {tps:.2f} | {tps / base:.2f} | {b / 2**10:.0f} |" for n, tps, b in rows]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
