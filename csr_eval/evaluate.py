"""`csr-eval`: quality, memory and speed of KV caches on held-out text, every method in one run.

Perplexity is measured so that it counts only tokens predicted **from the compressed cache**: a
prefix of P tokens is prefilled into the cache, then the following tokens are scored by decoding them
in chunks of c tokens; each chunk's queries attend to the compressed past plus the chunk's own exact
K/V, then the chunk is appended to the cache. The same P, c and windows apply to every method. KL
divergence and top-1 agreement compare each method's next-token distributions with the full-precision
cache on the same tokens.

    csr-eval --config configs/eval.yaml
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from csr_core.corpus import load_corpus
from csr_core.dictionary_file import load_dictionary
from csr_core.models import load_model, model_fingerprint, with_cache
from csr_core.prompts import encode_prompt
from csr_core.scoring import cache_bytes, chunked_log_probs
from csr_eval.kivi import KIVICache
from csr_runtime.cache import CSRCache
from neuraldict.collect import token_windows

_PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def make_cache(method: dict, lm, dictionary):
    """A fresh cache for one method spec: {"name", "type": fp | kivi | quanto | csr, ...options}.

    "quanto" is transformers' own `QuantizedCache` with the optimum-quanto backend (options: nbits 2|4,
    q_group_size, residual_length, axis_key, axis_value), the library baseline next to our KIVI."""
    options = {k: v for k, v in method.items() if k not in ("name", "type", "dictionary")}
    kind = method["type"]
    if kind == "fp":
        return DynamicCache()
    if kind == "kivi":
        return KIVICache(lm.config.num_hidden_layers, **options)
    if kind == "quanto":
        from transformers import QuantizedCache

        return QuantizedCache(backend="quanto", config=lm.config, **options)
    if kind == "csr":  # a method may name its own dictionary file (ablations of dictionaries in one run)
        return CSRCache(lm, method.get("dictionary") or dictionary, **options)
    raise ValueError(f"method type must be one of ['fp', 'kivi', 'quanto', 'csr'], got {kind!r} in {method}")


@torch.no_grad()
def passkey(lm, tokenizer, method: dict, dictionary, *, length: int, depth: float, key: int) -> bool:
    """Hide "The pass key is {key}" at `depth` of ~`length` tokens of filler; greedy answer must contain it."""
    n_filler = max(1, length // len(tokenizer(_PASSKEY_FILLER)["input_ids"]))
    before = int(n_filler * depth)
    text = ("There is important information hidden in a lot of irrelevant text. Find it and memorize it. "
            + _PASSKEY_FILLER * before + f"The pass key is {key}. Remember it. {key} is the pass key. "
            + _PASSKEY_FILLER * (n_filler - before) + "What is the pass key? The pass key is")
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(lm.device)
    out = lm.generate(ids, max_new_tokens=8, do_sample=False, **with_cache(lm, make_cache(method, lm, dictionary)),
                      pad_token_id=tokenizer.eos_token_id)
    return str(key) in tokenizer.decode(out[0, ids.shape[1]:])


def evaluate(
    model: str = "smollm2-135m-instruct",
    dictionary: str | None = None,
    corpus: str = "python-docs",
    split: str = "test",
    methods: list[dict] | None = None,
    context_lengths: list[int] = (512, 1024, 2048),
    sequences_per_length: int = 2,
    prefix_fraction: float = 0.5,
    chunk: int = 32,
    passkey_lengths: list[int] = (768, 1536),
    passkey_depths: list[float] = (0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.85, 0.95),
    generation_prompt: str = "The three most important ideas of the Python language are",
    generation_tokens: int = 40,
    chat_template: bool = True,
    output: str = "benchmarks/results/eval",
    device: str = "cpu",
    dtype: str = "float32",
) -> list[dict]:
    """Evaluate KV cache methods on the held-out (test) split; writes a table, CSV and plots.

    Args:
        model: Hugging Face id, local folder, or the embedded SmolLM2.
        dictionary: the dictionary file for CSR methods (from `lightning fit`); required if any method is CSR.
        corpus: text source.
        split: "test" for reported numbers; "validation" to choose settings (never tune on the test split).
        methods: list of {name, type: fp|kivi|quanto|csr, ...cache options}; the first fp method is the reference.
            A csr method may name its own `dictionary` file.
        context_lengths: sequence lengths L scored.
        sequences_per_length: held-out sequences per length.
        prefix_fraction: P = prefix_fraction · L tokens are prefilled, the rest scored.
        chunk: c, tokens decoded per step while scoring (1 = exact decoding).
        passkey_lengths: approximate tokens of the passkey-retrieval prompts (each length × each depth).
        passkey_depths: relative positions of the passkey (empty: no passkey test).
        generation_prompt: prompt of the greedy generation sample.
        generation_tokens: tokens generated for the sample.
        chat_template: wrap the sample's prompt in the tokenizer's chat template (Instruct models); false: raw text.
        output: report folder (markdown, CSV, PNG).
        device: where the model runs: "cpu", "cuda" or "cuda:N".
        dtype: the model's dtype: "float32", "bfloat16" or "float16" (the caches code in float32 inside).
    """

    methods = list(methods or DEFAULT_METHODS)
    if not methods or methods[0]["type"] != "fp":
        raise ValueError("the first method must be the full-precision reference, e.g. {name: fp32, type: fp}")
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    dict_file = None
    if any(m["type"] == "csr" and not m.get("dictionary") for m in methods):
        if dictionary is None:
            raise ValueError("CSR methods need a dictionary file: pass --dictionary runs/llama/.../dictionary.safetensors")
        dict_file = load_dictionary(dictionary, model=model_fingerprint(lm, model))
    fp = model_fingerprint(lm, model)
    for m in methods:  # every method's options are checked before any work, not after an hour of it
        try:
            make_cache(m, lm, dict_file)
        except TypeError as e:
            raise ValueError(f"method {m.get('name', m)!r}: {e}") from None
    if split not in ("validation", "test"):
        raise ValueError(f"split has to be 'validation' (choosing settings) or 'test' (reporting), got {split!r}")
    docs = load_corpus(corpus, split)
    results = {m["name"]: {"nll": {}, "kl": 0.0, "top1": 0.0, "n": 0, "trace": [], "seconds": 0.0} for m in methods}
    jobs = [(L, s, m) for L in context_lengths for s in range(sequences_per_length) for m in methods]
    bar = tqdm(jobs, desc="Evaluating caches", dynamic_ncols=True)
    windows = {L: token_windows(tokenizer, docs, window=L, max_tokens=L * sequences_per_length, source=f"{split} split of {corpus!r}")
               for L in context_lengths}
    reference = None
    for L, seq, method in bar:
        bar.set_postfix(L=L, method=method["name"])
        ids = windows[L][seq : seq + 1].to(lm.device)
        cache = make_cache(method, lm, dict_file)
        trace = results[method["name"]]["trace"] if L == max(context_lengths) and seq == 0 else None
        started = time.perf_counter()
        logp = chunked_log_probs(lm, ids, cache, prefix=int(L * prefix_fraction), chunk=chunk, memory_trace=trace)
        r = results[method["name"]]
        r["seconds"] += time.perf_counter() - started
        targets = ids[0, int(L * prefix_fraction):]
        nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
        r["nll"].setdefault(L, []).append(nll)
        if method is methods[0]:
            reference = logp
        kl = (reference.exp() * (reference - logp)).sum(-1)
        r["kl"] += float(kl.sum())
        r["top1"] += float((reference.argmax(-1) == logp.argmax(-1)).sum())
        r["n"] += len(targets)
        if L == max(context_lengths) and seq == 0:
            r["bytes"] = cache_bytes(cache)
            r["bits"] = r["bytes"] * 8 / (cache.get_seq_length() * fp.n_layers * 2 * fp.n_kv_heads * fp.head_dim)
            if isinstance(cache, CSRCache):
                r["stats"] = cache.stats()
    rows = []
    for m in tqdm(methods, desc="Passkey and generation", dynamic_ncols=True):
        r = results[m["name"]]
        hits = [passkey(lm, tokenizer, m, dict_file, length=n, depth=d, key=10007 + 7919 * i + 131 * j)
                for j, n in enumerate(passkey_lengths) for i, d in enumerate(passkey_depths)]
        r["passkey_misses"] = [f"{n}@{d:g}" for (n, d), hit in zip(((n, d) for n in passkey_lengths for d in passkey_depths), hits)
                               if not hit]
        prompt = encode_prompt(tokenizer, generation_prompt, chat=chat_template).to(lm.device)
        with torch.no_grad():
            text = tokenizer.decode(lm.generate(prompt, max_new_tokens=generation_tokens, do_sample=False,
                                                **with_cache(lm, make_cache(m, lm, dict_file)),
                                                pad_token_id=tokenizer.eos_token_id)[0, prompt.shape[1]:])
        row = {"method": m["name"], "bits_per_channel": r["bits"]}
        for L in context_lengths:
            row[f"ppl@{L}"] = math.exp(float(torch.cat(r["nll"][L]).mean()))
        row.update({"kl": r["kl"] / r["n"], "top1": r["top1"] / r["n"], "passkey": sum(hits) / len(hits) if hits else float("nan"),
                    "cache_MB": r["bytes"] / 2**20, "seconds": r["seconds"], "sample": text.replace("\n", " ")})
        rows.append(row)
    write_report(rows, results, Path(output), split=split, context_lengths=context_lengths, prefix_fraction=prefix_fraction,
                 chunk=chunk, methods=methods)
    return rows


DEFAULT_METHODS = [
    {"name": "fp32", "type": "fp"},
    {"name": "KIVI-4", "type": "kivi", "bits": 4},
    {"name": "KIVI-2", "type": "kivi", "bits": 2},
    {"name": "quanto-4", "type": "quanto", "nbits": 4},
]


def write_report(rows, results, folder: Path, *, split="test", context_lengths, prefix_fraction, chunk, methods) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = rows[0]
    with open(folder / "eval.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ppl_cols = [f"ppl@{L}" for L in context_lengths]
    head = ["method", "bits/channel", *ppl_cols, f"Δppl@{context_lengths[-1]}", "KL", "top-1", "passkey", "cache MB", "s"]
    lines = [f"Held-out perplexity ({split} split): prefix P = {prefix_fraction:g}·L prefilled, the rest decoded in chunks of c = {chunk} "
             f"tokens from the cache; bits/channel and cache MB measured at L = {context_lengths[-1]} (every held tensor).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last = ppl_cols[-1]
    for r in rows:
        delta = 100 * (r[last] / base[last] - 1)
        lines.append("| " + " | ".join([r["method"], f"{r['bits_per_channel']:.2f}", *[f"{r[c]:.3f}" for c in ppl_cols],
                                        f"{delta:+.1f} %", f"{r['kl']:.4f}", f"{r['top1']:.3f}", f"{r['passkey']:.2f}",
                                        f"{r['cache_MB']:.2f}", f"{r['seconds']:.0f}"]) + " |")
    lines += ["", "Method settings:", ""] + [f"- {m['name']}: {m}" for m in methods]
    lines += ["", "Passkeys missed (length@depth):", ""] + [
        f"- {name}: {', '.join(r['passkey_misses']) or 'none'}" for name, r in results.items() if "passkey_misses" in r]
    lines += ["", "Greedy samples:", ""] + [f"- **{r['method']}**: {r['sample']}" for r in rows]
    (folder / "eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plots(rows, results, folder, last)


def _plots(rows, results, folder: Path, ppl_col: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(folder / "memory_trace.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "tokens", "bytes"])
        w.writerows([name, t, b] for name, r in results.items() for t, b in r["trace"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        if r["trace"]:
            t, b = zip(*r["trace"])
            ax.plot(t, [x / 2**20 for x in b], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("cache memory (MB, log scale)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "memory_vs_length.png", dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["bits_per_channel"], r[ppl_col])
        ax.annotate(r["method"], (r["bits_per_channel"], r[ppl_col]), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("measured bits per channel")
    ax.set_ylabel(ppl_col.replace("ppl@", "perplexity, L = "))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "ppl_vs_bits.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    CLI(evaluate, args=argv, as_positional=False)


if __name__ == "__main__":
    main()
