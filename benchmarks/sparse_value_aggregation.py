"""Benchmark: does aggregating values in the sparse domain pay? (issue "csr_runtime", item 6)

One decode step of one layer's attention output over CSR-coded values, two ways, on the same codes:

- dense (what `CSRCache` does): rebuild the values V = Σ c·D[i] (an `embedding_bag`), then weights @ V;
- sparse: scatter the attention weights times the coefficients onto the atoms, A[n] = Σ_t a_t Σ_k c_tk·[i_tk = n],
  then one product A @ D with the dictionary (N × w) — the values are never rebuilt.

Shapes are SmolLM2's (3 KV heads, 3 query heads each, d_h = 64) with CSR-4's values as the default
dictionary codes them (s_n = 1, 4 atoms; `--s-n 2 --atoms 2` for the paper's chunking) and N = 1152
atoms (1024 offline + online/guard). The two
outputs are checked equal before timing. Prints a table and writes benchmarks/results/sparse_value_aggregation.md.

    python benchmarks/sparse_value_aggregation.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dictionary-atoms", type=int, default=1152)
    p.add_argument("--s-n", type=int, default=1, help="chunks per value vector")
    p.add_argument("--atoms", type=int, default=4, help="atoms per chunk")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--output", default="benchmarks/results/sparse_value_aggregation.md")
    return p


def dense_output(weights, idx, coef, dictionary):
    """weights: (H, G, T), idx/coef: (H, T, s_n, s), dictionary: (N, w) → (H, G, s_n·w)."""
    H, T, s_n, s = idx.shape
    values = torch.nn.functional.embedding_bag(idx.long().view(-1, s), dictionary, per_sample_weights=coef.float().view(-1, s),
                                               mode="sum").view(H, T, s_n * dictionary.shape[1])
    return weights @ values


def sparse_output(weights, idx, coef, dictionary):
    """The same output without rebuilding the values: attention weights scattered onto the atoms."""
    H, T, s_n, s = idx.shape
    G = weights.shape[1]
    src = (weights[:, :, :, None, None] * coef.float()[:, None]).permute(0, 1, 3, 2, 4).reshape(H, G, s_n, T * s)
    index = idx.long().permute(0, 2, 1, 3).reshape(H, 1, s_n, T * s).expand(H, G, s_n, T * s)
    atom_weights = torch.zeros(H, G, s_n, dictionary.shape[0]).scatter_add_(-1, index, src)
    return (atom_weights @ dictionary).reshape(H, G, -1)


def time_ms(fn, *args, repeats: int) -> float:
    for _ in range(3):
        fn(*args)
    started = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - started) / repeats * 1e3


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    g = torch.Generator().manual_seed(0)
    H, G, s_n, s = 3, 3, args.s_n, args.atoms
    w, n_atoms = 64 // s_n, args.dictionary_atoms
    dictionary = torch.nn.functional.normalize(torch.randn(n_atoms, w, generator=g), dim=-1)
    lines = [f"One decode step, one layer: attention output over CSR-coded values (H = {H} KV heads × {G} query heads, "
             f"s_n = {s_n}, {s} atoms per chunk, N = {n_atoms}, fp32, {torch.get_num_threads()} threads).", "",
             "| context | dense: rebuild V, then a·V (ms) | sparse: scatter a·c onto atoms, then ·D (ms) | speed-up | "
             "saved per step, 30 layers (ms) |", "|---|---|---|---|---|"]
    for T in args.contexts:
        idx = torch.randint(0, n_atoms, (H, T, s_n, s), generator=g).to(torch.int16)
        coef = torch.randn(H, T, s_n, s, generator=g).half()
        weights = torch.softmax(torch.randn(H, G, T, generator=g), dim=-1)
        torch.testing.assert_close(sparse_output(weights, idx, coef, dictionary), dense_output(weights, idx, coef, dictionary),
                                   atol=1e-4, rtol=1e-4)
        dense = time_ms(dense_output, weights, idx, coef, dictionary, repeats=args.repeats)
        sparse = time_ms(sparse_output, weights, idx, coef, dictionary, repeats=args.repeats)
        lines.append(f"| {T} | {dense:.3f} | {sparse:.3f} | {dense / sparse:.2f}× | {30 * (dense - sparse):.1f} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
