"""Benchmark: held-out error of NeuralDict vs its k-means initialisation, on real SmolLM2 KV.

For each layer, kind and sparsity s: a k-means dictionary (N atoms) from the calibration KV, then
NeuralDict trained from it at that s; both are scored by MP on held-out vectors (validation-split
documents). Also reports NeuralDict's training throughput. Prints a table and writes
benchmarks/results/neuraldict_vs_kmeans.{csv,md}.

    python benchmarks/neuraldict_vs_kmeans.py            # defaults: layers 5 15 25, s = 2 4 8, N = 1024
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from csr_runtime.sparse_coding import relative_error, sparse_decode, sparse_encode, split_chunks
from neuraldict.collect import collect_kv
from neuraldict.kmeans import kmeans_dictionary
from neuraldict.training import train_dictionary


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--corpus", default="python-docs")
    p.add_argument("--train-tokens", type=int, default=16384)
    p.add_argument("--val-tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, nargs="+", default=[5, 15, 25])
    p.add_argument("--sparsities", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--n-atoms", type=int, default=1024)
    p.add_argument("--s-n-keys", type=int, default=1)
    p.add_argument("--s-n-values", type=int, default=1, help="1 compares with the issue's k-means reference numbers")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--output", default="benchmarks/results/neuraldict_vs_kmeans")
    return p


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    torch.manual_seed(0)
    train = collect_kv(model=args.model, corpus=args.corpus, split="train", max_tokens=args.train_tokens)
    held_out = collect_kv(model=args.model, corpus=args.corpus, split="validation", max_tokens=args.val_tokens)
    rows = []
    jobs = [(layer, kind, s) for layer in args.layers for kind in ("keys", "values") for s in args.sparsities]
    bar = tqdm(jobs, desc="NeuralDict vs k-means", dynamic_ncols=True)
    inits = {}
    for layer, kind, s in bar:
        s_n = args.s_n_keys if kind == "keys" else args.s_n_values
        chunks = lambda v: split_chunks(torch.from_numpy(v.astype(np.float32)), s_n).flatten(0, 1)
        x_train, x_test = chunks(train.vectors(layer, kind)), chunks(held_out.vectors(layer, kind))
        if (layer, kind) not in inits:
            inits[(layer, kind)] = kmeans_dictionary(x_train, args.n_atoms)
        init = inits[(layer, kind)]
        started = time.perf_counter()
        trained = train_dictionary(x_train, init, s=s, steps=args.steps, batch_size=args.batch_size,
                                   learning_rate=args.learning_rate)
        seconds = time.perf_counter() - started
        score = lambda D: relative_error(x_test, sparse_decode(*sparse_encode(x_test, D, s=s), D))
        train_score = lambda D: relative_error(x_train[:8192], sparse_decode(*sparse_encode(x_train[:8192], D, s=s), D))
        row = {"layer": layer, "kind": kind, "s_n": s_n, "s": s, "N": args.n_atoms,
               "kmeans_held_out": score(init), "neuraldict_held_out": score(trained),
               "kmeans_train": train_score(init), "neuraldict_train": train_score(trained),
               "train_vectors_per_s": args.steps * args.batch_size / seconds}
        row["ratio_held_out"] = row["neuraldict_held_out"] / row["kmeans_held_out"]
        rows.append(row)
        bar.set_postfix(ratio=f"{row['ratio_held_out']:.3f}")
    write_report(rows, Path(args.output), args)


def write_report(rows: list[dict], output: Path, args) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    head = ["layer", "kind", "s_n", "s", "k-means held-out", "NeuralDict held-out", "ratio",
            "k-means train", "NeuralDict train", "train vectors/s"]
    lines = [f"Relative error ‖x − x̂‖²/‖x‖² (MP), N = {args.n_atoms}, {args.steps} steps × {args.batch_size}, "
             f"lr {args.learning_rate}; calibration {args.train_tokens} tokens, held-out {args.val_tokens} tokens "
             f"(validation documents).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['kind']} | {r['s_n']} | {r['s']} | {r['kmeans_held_out']:.4f} | "
                     f"{r['neuraldict_held_out']:.4f} | {r['ratio_held_out']:.3f} | {r['kmeans_train']:.4f} | "
                     f"{r['neuraldict_train']:.4f} | {r['train_vectors_per_s']:.0f} |")
    table = "\n".join(lines)
    output.with_suffix(".md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
