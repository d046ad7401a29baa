"""Benchmark: decode speed and memory of CSRCache vs DynamicCache (and KIVI) on the embedded SmolLM2.

For each context length: prefill the context with each cache, then decode `--steps` tokens one at a
time; reports prefill seconds, decode tokens/s, the ratio to DynamicCache measured in the same run,
the prefill's ratio too, and cache MB. Also the MP coding throughput on real KV (vectors/s). Prints a table and writes
benchmarks/results/decode_speed.{csv,md}.

    python benchmarks/decode_speed.py --dictionary runs/llama/neuraldict/version_0/dictionary.safetensors
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import DynamicCache

from csr_core.corpus import load_corpus
from csr_core.models import load_model, with_cache
from csr_core.scoring import cache_bytes
from csr_eval.kivi import KIVICache
from csr_eval.report import write_results
from csr_runtime.attention import CSR_ATTENTION
from csr_runtime.cache import CSRCache
from csr_runtime.sparse_coding import sparse_encode
from neuraldict.collect import token_windows


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dictionary", required=True)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--methods", nargs="+", default=None, help="run only these methods (names as in the table)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per round (8: one coding batch of CSR's default)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of decoding, the methods taking turns: tokens/s is each method's median, its ratio the "
                        "median of its per-round ratios to DynamicCache (robust to load that comes and goes)")
    p.add_argument("--prefill-rounds", type=int, default=1,
                   help="rounds of prefill, the methods taking turns: prefill seconds is each method's median, its "
                        "ratio the median of its per-round ratios (a prefill of 8k tokens takes ~35 s, so 1 by default)")
    p.add_argument("--sparsity", type=int, default=4, help="CSR-s (d_h = 64: 4 → 2 bits per channel)")
    p.add_argument("--output", default="benchmarks/results/decode_speed")
    return p


@torch.no_grad()
def time_prefill(lm, ids, cache) -> tuple[float, torch.Tensor]:
    """Seconds to prefill `ids` into `cache`, and the greedy next token."""
    started = time.perf_counter()
    out = lm(ids, **with_cache(lm, cache))
    return time.perf_counter() - started, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def time_decode(lm, token, cache, steps: int) -> tuple[float, torch.Tensor]:
    """Greedy decoding of `steps` tokens after `token`: tokens/s and the last token."""
    started = time.perf_counter()
    for _ in range(steps):
        token = lm(token, **with_cache(lm, cache)).logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - started), token


def _decode_path(method: str) -> None:
    """The CPU kernels (`csr_runtime.native`) for every CSR method but the one named for the torch path; the prefill's
    products on AMX (where the CPU has it) for every method but the one named for torch's products."""
    os.environ["CSR_NATIVE"] = "0" if "CSR_NATIVE=0" in method else "1"
    os.environ["CSR_AMX"] = "0" if "CSR_AMX=0" in method else "1"


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    torch.manual_seed(0)
    lm, tokenizer = load_model(args.model)
    stream = token_windows(tokenizer, load_corpus("python-docs", "test"), window=max(args.contexts), max_tokens=max(args.contexts))
    methods = {  # name → (cache factory, attention implementation)
        "DynamicCache (fp32)": (DynamicCache, "sdpa"),
        "KIVI-2": (lambda: KIVICache(lm.config.num_hidden_layers, bits=2), "sdpa"),
        f"CSR-{args.sparsity}, paper layout (int16 + fp16)": (lambda: CSRCache(
            lm, args.dictionary, sparsity=args.sparsity, index_bits=16, coef_format="fp16", sink_tokens=0,
            refine_fraction=0), "sdpa"),
        f"CSR-{args.sparsity}, packed (defaults)": (lambda: CSRCache(lm, args.dictionary, sparsity=args.sparsity), "sdpa"),
        f"CSR-{args.sparsity}, packed (defaults), torch decode path (CSR_NATIVE=0)": (
            lambda: CSRCache(lm, args.dictionary, sparsity=args.sparsity), "sdpa"),
        f"CSR-{args.sparsity}, packed, every token coded at once (coding_batch=1)": (
            lambda: CSRCache(lm, args.dictionary, sparsity=args.sparsity, coding_batch=1), "sdpa"),
        f"CSR-{args.sparsity}, packed, no refinement (refine_fraction=0)": (
            lambda: CSRCache(lm, args.dictionary, sparsity=args.sparsity, refine_fraction=0.0), "sdpa"),
        "CSR, 1-bit budget (defaults; CSR-4's bits)": (
            lambda: CSRCache(lm, args.dictionary, code_bits_per_channel=1.0), "sdpa"),
        f"CSR-{args.sparsity}, packed, attention from codes (csr_codes)": (
            lambda: CSRCache(lm, args.dictionary, sparsity=args.sparsity), CSR_ATTENTION),
        f"CSR-{args.sparsity}, csr_codes, prefill products in torch (CSR_AMX=0)": (
            lambda: CSRCache(lm, args.dictionary, sparsity=args.sparsity), CSR_ATTENTION),
    }
    if args.methods:
        methods = {name: make for name, make in methods.items() if name in args.methods or name.startswith("Dynamic")}
    rows = []
    for context in args.contexts:
        ids = stream[:, :context]
        state = {}  # method → [cache, next token, prefill s of each round, tokens/s of each round]
        for name, (make, implementation) in methods.items():
            lm.set_attn_implementation(implementation)
            _decode_path(name)
            warm = make()  # warm-up: a short prefill and two steps
            time_decode(lm, time_prefill(lm, ids[:, :64], warm)[1], warm, 2)
            state[name] = [None, None, [], []]
        for _ in range(args.prefill_rounds):  # the methods take turns; the last round's caches decode
            for name, (make, implementation) in methods.items():
                lm.set_attn_implementation(implementation)
                _decode_path(name)
                state[name][0] = None  # free the previous round's cache first
                cache = make()
                prefill_s, token = time_prefill(lm, ids, cache)
                state[name][:3] = [cache, token, state[name][2] + [prefill_s]]
        for _ in range(args.rounds):  # the methods take turns, so a slow spell of the machine hits them all
            for name, (_, implementation) in methods.items():
                lm.set_attn_implementation(implementation)
                _decode_path(name)
                tps, state[name][1] = time_decode(lm, state[name][1], state[name][0], args.steps)
                state[name][3].append(tps)
        base_name = next(iter(methods))
        base_prefill, base_tps = state[base_name][2], state[base_name][3]
        for name, (cache, _, prefill_s, tps) in state.items():
            ratios = [t / b for t, b in zip(tps, base_tps)]
            prefill_ratios = [p / b for p, b in zip(prefill_s, base_prefill)]
            rows.append({"context": context, "method": name, "prefill_s": statistics.median(prefill_s),
                         "prefill_ratio_vs_dynamic": statistics.median(prefill_ratios),
                         "prefill_ratio_per_round": " / ".join(f"{r:.2f}" for r in prefill_ratios),
                         "decode_tokens_per_s": statistics.median(tps), "decode_ratio_vs_dynamic": statistics.median(ratios),
                         "decode_ratio_per_round": " / ".join(f"{r:.2f}" for r in ratios), "cache_MB": cache_bytes(cache) / 2**20})
            print(rows[-1], flush=True)
        del state
    lm.set_attn_implementation("sdpa")
    os.environ.pop("CSR_NATIVE", None)
    os.environ.pop("CSR_AMX", None)  # the last method may have turned it off
    # MP coding throughput on real keys of layer 15 (pre-RoPE), the file's dictionary (the default: no extra atoms):
    # the prefill's path (products on AMX where the CPU has it) and torch's products, taking turns, medians of 5.
    from csr_core.dictionary_file import load_dictionary
    from csr_runtime import native
    from neuraldict.collect import capture_kv

    keys, _ = capture_kv(lm, stream[:, :1024])
    x = keys[15].reshape(-1, keys.shape[-1])
    D = torch.from_numpy(load_dictionary(args.dictionary).keys.for_layer(15))
    paths = {"AMX": "1", "torch products (CSR_AMX=0)": "0"} if native.amx_available() else {"torch products": "0"}
    seconds, codes = {name: [] for name in paths}, {}
    for _ in range(5):
        for name, flag in paths.items():
            os.environ["CSR_AMX"] = flag
            started = time.perf_counter()
            codes[name] = sparse_encode(x, D, s=args.sparsity)
            seconds[name].append(time.perf_counter() - started)
    os.environ.pop("CSR_AMX", None)
    mp_rates = {name: len(x) / statistics.median(t) for name, t in seconds.items()}
    first, *others = codes.values()
    same = [float((first[0] == c[0]).all(1).float().mean()) for c in others]
    write_report(rows, mp_rates, same, len(D), args)


def write_report(rows, mp_rates: dict, same: list, n_atoms: int, args) -> None:
    lines = [f"Greedy decoding after a prefill of the context, batch 1, fp32, {torch.get_num_threads()} CPU threads: "
             f"{args.rounds} rounds of {args.steps} tokens, the methods taking turns; decode tokens/s is the median "
             f"round, its ratio the median of the per-round ratios to DynamicCache (each round's ratio listed). "
             f"Prefill: {args.prefill_rounds} round(s), the methods taking turns, seconds the median, the ratio the "
             f"median of the per-round ratios. Cache MB after the last round.", "",
             "| context | method | prefill s | prefill × DynamicCache | per round | decode tokens/s | decode × DynamicCache | per round | cache MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['method']} | {r['prefill_s']:.2f} | {r['prefill_ratio_vs_dynamic']:.2f} | "
                     f"{r['prefill_ratio_per_round']} | "
                     f"{r['decode_tokens_per_s']:.2f} | {r['decode_ratio_vs_dynamic']:.2f} | {r['decode_ratio_per_round']} | "
                     f"{r['cache_MB']:.2f} |")
    rates = ", ".join(f"{name} {rate:,.0f} vectors/s" for name, rate in mp_rates.items())
    lines += ["", f"MP coding throughput (s = {args.sparsity}, N = {n_atoms}, d = 64, real layer-15 keys, medians of 5): "
                  f"{rates}"]
    if same:
        base = list(mp_rates.values())
        lines[-1] += (f"; AMX / torch: {base[0] / base[1]:.2f}×, the same atoms for {100 * same[0]:.2f} % of the "
                      f"vectors (the rest: near-ties)")
    write_results(rows, args.output, lines)


if __name__ == "__main__":
    main()
