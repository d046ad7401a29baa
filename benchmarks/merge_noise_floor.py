"""Benchmark: is the layer-merging divergence measuring layers or sampling noise?

The paper compares layers by the JSD of 200 × 200 histograms of their 2-D PCA projections. With the
vectors a calibration run has, most of the 40 000 cells are nearly empty, so two halves of the *same*
layer already look different. This script reports, for several bin counts, the JSD between two
disjoint halves of one layer (the noise floor) next to the JSD between adjacent and distant layers.

    python benchmarks/merge_noise_floor.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from neuraldict.collect import collect_kv
from neuraldict.merge import pair_divergence


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--sample", type=int, default=8192, help="vectors per side")
    p.add_argument("--bins", type=int, nargs="+", default=[200, 100, 50, 20])
    p.add_argument("--output", default="benchmarks/results/merge_noise_floor.md")
    args = p.parse_args(argv)
    collection = collect_kv(split="train", max_tokens=args.tokens)
    g = torch.Generator().manual_seed(0)
    lines = [f"JSD (base 2) of 2-D PCA histograms, {args.sample} vectors per side, SmolLM2 calibration KV:", "",
             "| kind | bins | same layer (15 vs 15) | adjacent (15 vs 16) | adjacent (14 vs 15) | distant (4 vs 28) |",
             "|---|---|---|---|---|---|"]
    for kind in ("keys", "values"):
        layer = {l: torch.from_numpy(collection.vectors(l, kind).astype(np.float32)) for l in (4, 14, 15, 16, 28)}
        perm = torch.randperm(len(layer[15]), generator=g)
        half_a, half_b = perm[: args.sample], perm[args.sample : 2 * args.sample]
        pick = lambda l: layer[l][perm[: args.sample]]
        for bins in args.bins:
            same = pair_divergence(layer[15][half_a], layer[15][half_b], bins=bins)
            cells = [pair_divergence(pick(a), pick(b), bins=bins) for a, b in ((15, 16), (14, 15), (4, 28))]
            lines.append(f"| {kind} | {bins} | {same:.3f} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
