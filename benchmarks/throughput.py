"""Benchmark: decode throughput at a fixed KV-memory budget — what a smaller cache buys (issue "Turn memory into speed").

For each context length and method, the batch is the largest whose cache fits the budget (default 1 GiB),
measured with the caches' own byte counts (`csr_core.scoring.cache_bytes`; CSR's shared offline
dictionaries are charged to the budget once). Each method prefills one real held-out prompt (python-docs,
test split) of the context length, the cache's rows are repeated to the batch (`batch_repeat_interleave`;
transformers' quantized cache repeats only its residual that way, so its quantized rows are dequantized,
repeated and quantized again — `repeat_quantized_rows`), then
greedy decoding runs `--steps` timed steps after one warm-up step. Reports batch, tokens/s summed over the
batch, ms per step, the ratio to `DynamicCache` in the same run, cache MB and process RSS.
`--rounds R` (R > 1): every method of a context length is prefilled first, then the methods take turns, R rounds
of `--steps` steps each, so that a machine whose speed drifts slows all of them alike; tokens/s and ms per step
are the median over rounds, the ratio is the median of the rounds' ratios, and each round's ratio is listed. (Then
every method's batch is held at once: RSS counts the caches prepared before it too.) Prints a table,
writes benchmarks/results/throughput.{csv,md} and throughput.png (tokens/s vs context length).

    python benchmarks/throughput.py --dictionary runs/llama/neuraldict/version_1/dictionary.safetensors

Rows of one batch are copies of one prompt: the work per step (attention over batch × context, decoding
every coded row) is what distinct prompts cost; only the text is shared.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from pathlib import Path

import psutil
import torch
from transformers import DynamicCache, QuantizedCache

from csr_core.corpus import load_corpus
from csr_core.models import load_model, with_cache
from csr_core.scoring import cache_bytes
from csr_eval.kivi import KIVICache
from csr_runtime.attention import CSR_ATTENTION
from csr_runtime.cache import CSRCache
from neuraldict.collect import token_windows

MiB = 2**20


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dictionary", required=True)
    p.add_argument("--budget-gib", type=float, default=1.0, help="KV-cache memory budget")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--steps", type=int, default=3, help="timed decode steps (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=1,
                   help="methods take turns in this many rounds of --steps steps (median ratio of the rounds)")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (names as in the table)")
    p.add_argument("--output", default="benchmarks/results/throughput")
    return p


def methods(lm, dictionary: str) -> dict:
    """name → (make cache, attention implementation)."""
    L = lm.config.num_hidden_layers
    out = {
        "DynamicCache (fp32)": (DynamicCache, "sdpa"),
        "KIVI-4": (lambda: KIVICache(L, bits=4), "sdpa"),
        "KIVI-2": (lambda: KIVICache(L, bits=2), "sdpa"),
        "quanto-4": (lambda: QuantizedCache(backend="quanto", config=lm.config, nbits=4), "sdpa"),
    }
    for s in (8, 4, 2):
        out[f"CSR-{s}"] = (lambda s=s: CSRCache(lm, dictionary, sparsity=s), "sdpa")
    out["CSR-4, attention from codes (csr_codes)"] = (lambda: CSRCache(lm, dictionary, sparsity=4), CSR_ATTENTION)
    return out


def repeat_quantized_rows(cache: QuantizedCache, repeats: int) -> None:
    """`batch_repeat_interleave` for transformers' QuantizedCache, whose inherited method repeats only the
    full-precision residual: its quantized states are rebuilt for the repeated rows (private attributes of
    `QuantizedLayer`, transformers 5.24–5.x; re-quantizing dequantized values is, up to rounding, the identity)."""
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        for name, axis in (("_quantized_keys", layer.axis_key), ("_quantized_values", layer.axis_value)):
            rows = layer._dequantize(getattr(layer, name)).repeat_interleave(repeats, dim=0).contiguous()
            setattr(layer, name, layer._quantize(rows, axis=axis))
        if layer.keys.numel():
            layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
            layer.values = layer.values.repeat_interleave(repeats, dim=0)


def shared_bytes(cache) -> int:
    """Bytes every row shares (CSR's offline dictionaries)."""
    return cache.memory_bytes(include_offline=True) - cache.memory_bytes() if isinstance(cache, CSRCache) else 0


@torch.no_grad()
def prepare(lm, prompt: torch.Tensor, make, *, budget: int, steps: int, max_batch: int) -> dict:
    """Prefill the prompt, repeat the cache's row to the largest batch that fits the budget after `steps` more
    tokens, one warm-up step → the method's state for `decode` ("batch" 0 and a note where one row does not fit)."""
    cache = make()
    out = lm(prompt, **with_cache(lm, cache))
    L = prompt.shape[1]
    per_row = cache_bytes(cache) * (L + steps + 1) / L  # at the end of decoding
    shared = shared_bytes(cache)
    batch = min(int((budget - shared) // per_row), max_batch)
    if batch < 1:
        return {"batch": 0, "note": f"one row needs {per_row / MiB:.0f} MB (+{shared / MiB:.0f} MB shared)"}
    if isinstance(cache, QuantizedCache):
        repeat_quantized_rows(cache, batch)
    else:
        cache.batch_repeat_interleave(batch)
    token = out.logits[:, -1:].argmax(-1).expand(batch, 1)
    token = lm(token, **with_cache(lm, cache)).logits[:, -1:].argmax(-1)  # warm-up step
    return {"batch": batch, "cache": cache, "token": token, "shared": shared, "note": "",
            "rss_MB": psutil.Process().memory_info().rss / MiB}


@torch.no_grad()
def decode(lm, state: dict, steps: int) -> float:
    """`steps` greedy steps of a prepared batch → seconds."""
    token, cache = state["token"], state["cache"]
    started = time.perf_counter()
    for _ in range(steps):
        token = lm(token, **with_cache(lm, cache)).logits[:, -1:].argmax(-1)
    state["token"] = token
    return time.perf_counter() - started


def release(state: dict, budget: int) -> None:
    """Record the cache's size and let it go; note where it ended over the budget (the batch is chosen from the
    prefilled cache's bytes per token, which misses tokens a cache holds exact until it codes or quantizes them)."""
    state["cache_MB"] = (cache_bytes(state.pop("cache")) + state["shared"]) / MiB
    if state["cache_MB"] > budget / MiB:
        state["note"] = f"ended {state['cache_MB'] - budget / MiB:.1f} MB over the budget"


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit(f"--rounds and --steps must be at least 1, got {args.rounds} and {args.steps}")
    torch.manual_seed(0)
    lm, tokenizer = load_model(args.model)
    stream = token_windows(tokenizer, load_corpus("python-docs", "test"), window=max(args.contexts),
                           max_tokens=max(args.contexts))
    table = methods(lm, args.dictionary)
    if args.methods:
        table = {name: m for name, m in table.items() if name in args.methods or name.startswith("Dynamic")}
    budget = int(args.budget_gib * 2**30)
    rows = []
    for context in args.contexts:
        states = {}
        for name, (make, implementation) in table.items():
            lm.set_attn_implementation(implementation)
            state = states[name] = prepare(lm, stream[:, :context], make, budget=budget,
                                           steps=args.steps * args.rounds, max_batch=args.max_batch)
            if args.rounds == 1 and state["batch"]:  # one round: each method decodes and lets its memory go in turn
                state["seconds"] = [decode(lm, state, args.steps)]
                release(state, budget)
        for _ in range(args.rounds if args.rounds > 1 else 0):
            for name, (_, implementation) in table.items():
                if states[name]["batch"]:
                    lm.set_attn_implementation(implementation)
                    states[name].setdefault("seconds", []).append(decode(lm, states[name], args.steps))
        for state in states.values():
            if state["batch"] and "cache" in state:
                release(state, budget)
        base = next((s for n, s in states.items() if n.startswith("Dynamic") and s["batch"]), None)  # else no ratio
        for name, state in states.items():
            r = {"context": context, "method": name, "batch": state["batch"], "note": state["note"],
                 "ratio_vs_dynamic": math.nan}
            if state["batch"]:
                rate = lambda st: [st["batch"] * args.steps / t for t in st["seconds"]]  # tokens/s each round
                ratios = [a / b for a, b in zip(rate(state), rate(base))] if base else [math.nan]
                r.update(tokens_per_s=statistics.median(rate(state)),
                         ms_per_step=1000 * statistics.median(state["seconds"]) / args.steps,
                         ratio_vs_dynamic=statistics.median(ratios), round_ratios=ratios,
                         cache_MB=state["cache_MB"], rss_MB=state["rss_MB"])
            rows.append(r)
            print({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
        states.clear()
    lm.set_attn_implementation("sdpa")
    write_report(rows, args)


def write_report(rows: list[dict], args) -> None:
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["context", "method", "batch", "tokens_per_s", "ms_per_step", "ratio_vs_dynamic", "round_ratios",
              "cache_MB", "rss_MB", "note"]
    listed = lambda ratios: " ".join(f"{x:.2f}" for x in ratios)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows([{k: listed(r[k]) if k == "round_ratios" and k in r else r.get(k, "") for k in fields}
                          for r in rows])
    rounds = args.rounds > 1
    lines = [f"Greedy decoding at a {args.budget_gib:g} GiB KV budget: the largest batch whose cache fits, "
             f"{args.steps} timed steps{f' in each of {args.rounds} rounds the methods take in turn (medians)' if rounds else ''}, "
             f"fp32, {torch.get_num_threads()} CPU threads.", "",
             f"| context | method | batch | tokens/s | ms/step | × DynamicCache |{' rounds × |' if rounds else ''} cache MB | RSS MB |",
             f"|---|---|---|---|---|---|{'---|' if rounds else ''}---|---|"]
    for r in rows:
        if not r["batch"]:
            lines.append(f"| {r['context']} | {r['method']} | 0 | – | – | – |{' – |' if rounds else ''} – | – |  ({r['note']})")
            continue
        each_round = f" {listed(r['round_ratios'])} |" if rounds else ""
        lines.append(f"| {r['context']} | {r['method']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.0f} | "
                     f"{r['ratio_vs_dynamic']:.2f} |{each_round} {r['cache_MB']:.0f} | {r['rss_MB']:.0f} |"
                     + (f"  ({r['note']})" if r["note"] else ""))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = [(r["context"], r["tokens_per_s"]) for r in rows if r["method"] == method and r["batch"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=method)
    ax.set(xlabel="context length (tokens)", ylabel="decode tokens/s (whole batch)", xscale="log",
           title=f"Throughput at a {args.budget_gib:g} GiB KV budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=90)


if __name__ == "__main__":
    main()
