"""Benchmark: the prefill's matching pursuit on Intel AMX against torch's products, code for code, on real KV.

For every third layer of the embedded SmolLM2, the pre-RoPE keys and the values of one validation-split window,
in the dictionary file's coding space (x − μ), coded at s atoms with e3m1 coefficients as the cache codes them:
the share of vectors whose atoms differ between the two paths (near-ties) and each path's relative error
‖x − x̂‖² / ‖x‖². Prints a table and writes benchmarks/results/amx_parity.{csv,md}.

    python benchmarks/amx_parity.py --dictionary runs/llama/neuraldict/version_0/dictionary.safetensors
"""

from __future__ import annotations

import argparse
import os

import torch

from csr_core.corpus import load_corpus
from csr_core.dictionary_file import coding_space, load_dictionary
from csr_core.models import load_model
from csr_eval.report import write_results
from csr_runtime import native
from csr_runtime.code_packing import CoefficientRounding, coefficient_scale
from csr_runtime.sparse_coding import relative_error, sparse_decode, sparse_encode
from neuraldict.collect import capture_kv, token_windows


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dictionary", required=True)
    p.add_argument("--tokens", type=int, default=2048, help="one window of the validation split")
    p.add_argument("--sparsity", type=int, default=4)
    p.add_argument("--output", default="benchmarks/results/amx_parity")
    return p


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    if not native.amx_available():
        raise SystemExit("this CPU has no Intel AMX (or the kernel was not built for it): nothing to compare")
    lm, tokenizer = load_model(args.model)
    ids = token_windows(tokenizer, load_corpus("python-docs", "validation"), window=args.tokens,
                        max_tokens=args.tokens)[:, : args.tokens]
    kv = dict(zip(("keys", "values"), capture_kv(lm, ids)))
    dictionary = load_dictionary(args.dictionary)
    rows = []
    for layer in range(0, lm.config.num_hidden_layers, 3):
        for kind in ("keys", "values"):
            d = dictionary.kind(kind)
            heads = kv[kind].shape[3]  # (n_layers, B, T, H, d_h): rows head-minor, as coding_space takes them
            vectors = kv[kind][layer].reshape(-1, kv[kind].shape[-1]).numpy()
            x = torch.as_tensor(coding_space(vectors, heads, None if d.center is None else d.center[layer]))
            D = torch.from_numpy(d.for_layer(layer)).float()
            rounding = CoefficientRounding("e3m1", coefficient_scale("e3m1", float(x.norm(dim=-1).max())))
            codes = {}
            for path, flag in (("AMX", "1"), ("torch products", "0")):
                os.environ["CSR_AMX"] = flag
                codes[path] = sparse_encode(x, D, s=args.sparsity, quantize=rounding)
            os.environ.pop("CSR_AMX", None)
            differ = (codes["AMX"][0] != codes["torch products"][0]).any(1).double().mean().item()
            rows.append({"layer": layer, "kind": kind, "vectors": len(x), "atoms_differ_pct": 100 * differ,
                         **{f"rel_err_{p.split()[0].lower()}": relative_error(x, sparse_decode(*c, D))
                            for p, c in codes.items()}})
            print(rows[-1], flush=True)
    lines = [f"MP at s = {args.sparsity}, e3m1 coefficients, {args.tokens} validation tokens of {args.model}, every third "
             "layer: vectors whose atoms differ between the AMX path and torch's products, and each path's relative "
             "error ‖x − x̂‖² / ‖x‖².", "",
             "| layer | kind | vectors | atoms differ | rel. error, AMX | rel. error, torch products |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['kind']} | {r['vectors']} | {r['atoms_differ_pct']:.3f} % | {r['rel_err_amx']:.5f} | "
              f"{r['rel_err_torch']:.5f} |" for r in rows]
    write_results(rows, args.output, lines)


if __name__ == "__main__":
    main()
