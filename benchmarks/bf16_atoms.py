"""Benchmark: atoms stored as bf16 values — what they save in the AMX matching pursuit and what they cost in quality.

`neuraldict` exports each atom entry as its nearest bf16 value (`csr_core.dictionary_file.bf16_atoms`), so the AMX
kernel makes exact scores with two bf16 products (x_hi·d + x_lo·d) instead of three, and the Gram matrix with one.

1. Speed (a CPU with Intel AMX): MP of one layer's values (layer 15, the validation window, coding space) with the
   file's bf16 atoms, two products against the same atoms taken as float32 ones (three products, the third adding
   zeros: the same codes, checked), at s = 1 (the products alone) and s, 1 and 2 threads, and the Gram matrix; the
   variants take turns over rounds, medians.
2. Quality (`--float32-dictionary`, a fit exported before atoms were rounded): every third layer, keys and values,
   the relative error ‖x − x̂‖² / ‖x‖² of MP at s with e3m1 coefficients over that file's atoms and over the same
   atoms rounded by `bf16_atoms` — the rounding's effect alone.

Prints tables and writes benchmarks/results/bf16_atoms.{csv,md}.

    python benchmarks/bf16_atoms.py --dictionary runs/llama/neuraldict/version_0/dictionary.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from csr_core.corpus import load_corpus
from csr_core.dictionary_file import bf16_atoms, coding_space, load_dictionary
from csr_core.models import load_model
from csr_eval.report import write_results
from csr_runtime import native
from csr_runtime.code_packing import CoefficientRounding, coefficient_scale
from csr_runtime.sparse_coding import relative_error, sparse_decode, sparse_encode
from neuraldict.collect import capture_kv, token_windows


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dictionary", required=True, help="a file with bf16 atoms (any file: its atoms are rounded here)")
    p.add_argument("--float32-dictionary", default=None, help="a file with float32 atoms, for the quality table")
    p.add_argument("--tokens", type=int, default=2048, help="one window of the validation split")
    p.add_argument("--sparsity", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--output", default="benchmarks/results/bf16_atoms")
    return p


def _coding_space_vectors(kv: dict, dictionary, kind: str, layer: int) -> torch.Tensor:
    d = dictionary.kind(kind)
    heads = kv[kind].shape[3]  # (n_layers, B, T, H, d_h): rows head-minor, as coding_space takes them
    vectors = kv[kind][layer].reshape(-1, kv[kind].shape[-1]).numpy()
    return torch.as_tensor(coding_space(vectors, heads, None if d.center is None else d.center[layer]))


def _rounding(x: torch.Tensor) -> CoefficientRounding:
    return CoefficientRounding("e3m1", coefficient_scale("e3m1", float(x.norm(dim=-1).max())))


def _mean_ms(f, repeats: int = 10) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - started) / repeats * 1e3


def speed_rows(kv: dict, dictionary, args) -> list[dict]:
    layer = 15
    x = _coding_space_vectors(kv, dictionary, "values", layer).float().contiguous()
    atoms = torch.from_numpy(bf16_atoms(dictionary.values.for_layer(layer))).float()
    two = native.amx_dictionary(atoms)
    variants = {"2 products (bf16 atoms)": two, "3 products (taken as float32)": dataclasses.replace(two, atoms_bf16=False)}
    assert two.atoms_bf16, "bf16_atoms gave atoms with lo parts"
    rounding = _rounding(x)
    codes = {name: native.mp_amx(x, amx, args.sparsity, rounding) for name, amx in variants.items()}
    (i2, c2), (i3, c3) = codes.values()
    identical = bool(torch.equal(i2, i3) and torch.equal(c2, c3))
    threads_before = torch.get_num_threads()
    times: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):  # the variants take turns, so a slow spell of the machine hits them all
        for name, amx in variants.items():
            for threads in (2, 1):
                torch.set_num_threads(threads)
                for s in (1, args.sparsity):
                    times.setdefault((name, f"MP, s = {s}", threads), []).append(
                        _mean_ms(lambda: native.mp_amx(x, amx, s, rounding)))
            torch.set_num_threads(2)
            times.setdefault((name, "Gram matrix", 2), []).append(_mean_ms(
                lambda: native._library.csr_amx_gram(native._ptr(atoms), atoms.shape[0], atoms.shape[1],
                                                     native._ptr(amx.packed), amx.atoms_bf16, native._ptr(amx.gram),
                                                     amx.gram_scale, 2)))
    torch.set_num_threads(threads_before)
    rows = []
    for (name, work, threads), ms in times.items():
        base = statistics.median(times[("3 products (taken as float32)", work, threads)])
        rows.append({"table": "speed", "variant": name, "work": work, "threads": threads, "vectors": len(x),
                     "ms": statistics.median(ms), "ratio_vs_3_products": statistics.median(ms) / base,
                     "identical_codes": identical})
        print(rows[-1], flush=True)
    return rows


def quality_rows(kv: dict, reference, layers: range, args) -> list[dict]:
    rows = []
    for layer in layers:
        for kind in ("keys", "values"):
            x = _coding_space_vectors(kv, reference, kind, layer)
            atoms = reference.kind(kind).for_layer(layer)
            errors = {}
            for name, D in (("float32", torch.from_numpy(atoms).float()), ("bf16", torch.from_numpy(bf16_atoms(atoms)))):
                idx, coef = sparse_encode(x, D, s=args.sparsity, quantize=_rounding(x))
                errors[name] = relative_error(x, sparse_decode(idx, coef, D))
            rows.append({"table": "quality", "layer": layer, "kind": kind, "vectors": len(x),
                         "rel_err_float32": errors["float32"], "rel_err_bf16": errors["bf16"]})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    lm, tokenizer = load_model(args.model)
    ids = token_windows(tokenizer, load_corpus("python-docs", "validation"), window=args.tokens,
                        max_tokens=args.tokens)[:, : args.tokens]
    kv = dict(zip(("keys", "values"), capture_kv(lm, ids)))
    rows, lines = [], []
    if native.amx_available():
        rows += speed_rows(kv, load_dictionary(args.dictionary), args)
        speed = [r for r in rows if r["table"] == "speed"]
        lines += [f"AMX matching pursuit of layer 15's values ({speed[0]['vectors']} vectors, {args.tokens} validation "
                  f"tokens), N = 2048 bf16 atoms, e3m1 coefficients; medians of {args.rounds} rounds, the variants "
                  f"taking turns. The same codes on both variants: {'yes' if speed[0]['identical_codes'] else 'NO'}.", "",
                  "| work | threads | 3 products (ms) | 2 products, bf16 atoms (ms) | ratio |", "|---|---|---|---|---|"]
        for r in speed:
            if r["variant"].startswith("2"):
                base = next(b for b in speed if b["variant"].startswith("3") and (b["work"], b["threads"]) == (r["work"], r["threads"]))
                lines.append(f"| {r['work']} | {r['threads']} | {base['ms']:.2f} | {r['ms']:.2f} | {r['ratio_vs_3_products']:.2f} |")
    else:
        lines.append("This CPU has no Intel AMX (or the kernel was not built for it): no speed table.")
    if args.float32_dictionary:
        quality = quality_rows(kv, load_dictionary(args.float32_dictionary), range(0, lm.config.num_hidden_layers, 3), args)
        rows += quality
        lines += ["", f"MP at s = {args.sparsity}, e3m1 coefficients, every third layer: relative error ‖x − x̂‖² / ‖x‖² "
                  f"over {args.float32_dictionary}'s float32 atoms and over the same atoms rounded to bf16 values.", "",
                  "| layer | kind | vectors | float32 atoms | bf16 atoms | change |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['kind']} | {r['vectors']} | {r['rel_err_float32']:.5f} | {r['rel_err_bf16']:.5f} | "
                  f"{(r['rel_err_bf16'] / r['rel_err_float32'] - 1) * 100:+.2f} % |" for r in quality]
    write_results(rows, args.output, lines)


if __name__ == "__main__":
    main()
