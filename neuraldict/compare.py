"""`neuraldict compare`: learned NeuralDict vs K-SVD, scikit-learn dictionary learning, k-means and random atoms.

Every method gets the same training vectors and the same N, and every dictionary is scored on the
same held-out vectors (validation-split documents), for keys and values, per layer, at each sparsity
s, with both MP and OMP. Reported: relative error ‖x − x̂‖²/‖x‖², SNR in dB, bits per channel
(32·s·s_n/d_h), training wall time and encode throughput. Writes compare.md, compare.csv and PNG plots.

    neuraldict compare --config configs/compare.yaml
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from csr_runtime.sparse_coding import relative_error, sparse_decode, sparse_encode, split_chunks
from neuraldict.collect import collect_kv
from neuraldict.kmeans import kmeans_dictionary
from neuraldict.ksvd import ksvd_dictionary
from neuraldict.training import train_dictionary

METHODS = ("random", "kmeans", "ksvd", "sklearn", "neuraldict")


def learn(method: str, x: torch.Tensor, *, n_atoms: int, train_sparsity: int, ksvd_iterations: int,
          neuraldict_steps: int, sklearn_epochs: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """One dictionary (n_atoms, d) with unit rows from training vectors x (n, d); returns (atoms, warnings)."""
    notes: list[str] = []
    g = torch.Generator().manual_seed(seed)
    if method == "random":
        return torch.nn.functional.normalize(torch.randn(n_atoms, x.shape[1], generator=g), dim=-1), notes
    if method == "kmeans":
        return kmeans_dictionary(x, n_atoms, seed=seed), notes
    if method == "ksvd":
        init = torch.nn.functional.normalize(x[torch.randperm(len(x), generator=g)[:n_atoms]], dim=-1)
        return ksvd_dictionary(x, init, s=train_sparsity, iterations=ksvd_iterations), notes
    if method == "neuraldict":
        return train_dictionary(x, kmeans_dictionary(x, n_atoms, seed=seed), s=train_sparsity, steps=neuraldict_steps), notes
    if method == "sklearn":
        from sklearn.decomposition import MiniBatchDictionaryLearning
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = MiniBatchDictionaryLearning(n_components=n_atoms, batch_size=256, max_iter=sklearn_epochs,
                                                transform_algorithm="omp", random_state=seed)
            model.fit(x.numpy())
        notes += [f"sklearn: {w.message}" for w in caught if issubclass(w.category, ConvergenceWarning)]
        atoms = torch.from_numpy(model.components_).float()
        return torch.nn.functional.normalize(atoms, dim=-1), notes
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def compare(
    model: str = "smollm2-135m-instruct",
    corpus: str = "python-docs",
    train_tokens: int = 16384,
    val_tokens: int = 2048,
    window: int = 512,
    layers: list[int] = (5, 15, 25),
    methods: list[str] = METHODS,
    n_atoms: int = 512,
    sparsities: list[int] = (1, 2, 4, 8, 16),
    s_n_keys: int = 1,
    s_n_values: int = 2,
    train_sparsity: int = 4,
    max_train_vectors: int = 16384,
    max_test_vectors: int = 4096,
    ksvd_iterations: int = 10,
    neuraldict_steps: int = 300,
    sklearn_epochs: int = 1,
    downstream_sparsity: int = 4,
    downstream_context: int = 1024,
    downstream_sequences: int = 2,
    output: str = "benchmarks/results/compare",
    device: str = "cpu",
    dtype: str = "float32",
) -> list[dict]:
    """Train every method on the same vectors, score all on the same held-out vectors.

    Args:
        model: Hugging Face id, local folder, or the embedded SmolLM2.
        corpus: calibration / held-out text (train and validation document splits).
        train_tokens: calibration tokens collected.
        val_tokens: held-out tokens collected.
        window: tokens per forward pass of the collection.
        layers: layers compared (each layer's own vectors).
        methods: any of random, kmeans, ksvd, sklearn, neuraldict.
        n_atoms: N, the same for every method.
        sparsities: s at which every dictionary is scored, with MP and with OMP.
        s_n_keys: chunks per key vector.
        s_n_values: chunks per value vector.
        train_sparsity: s used inside K-SVD's and NeuralDict's training.
        max_train_vectors: training chunks per layer and kind (the same sample for every method).
        max_test_vectors: held-out chunks per layer and kind.
        ksvd_iterations: K-SVD iterations.
        neuraldict_steps: NeuralDict steps (batch 1024).
        sklearn_epochs: passes of scikit-learn's MiniBatchDictionaryLearning over the data.
        downstream_sparsity: CSR-s of the downstream perplexity: each method's dictionaries code the
            compared layers' KV cache (MP, offline atoms only; the other layers stay exact) while the
            model reads held-out (test-split) text. 0 skips it.
        downstream_context: tokens per downstream sequence (the first half prefilled, the rest scored).
        downstream_sequences: downstream sequences.
        output: report folder.
        device: where the model runs during collection and the downstream perplexity ("cpu", "cuda").
        dtype: the model's dtype there ("float32", "bfloat16", "float16").
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got {unknown}")
    if n_atoms < max(sparsities):
        raise ValueError(f"n_atoms = {n_atoms} must be at least the largest sparsity {max(sparsities)}")
    if downstream_sparsity and s_n_keys != 1:
        raise ValueError(f"the downstream perplexity runs CSRCache, which codes keys with s_n = 1, not s_n_keys = "
                         f"{s_n_keys}: set s_n_keys: 1 or downstream_sparsity: 0")
    on = dict(device=device, dtype=dtype)
    train = collect_kv(model=model, corpus=corpus, split="train", max_tokens=train_tokens, window=window, **on)
    held_out = collect_kv(model=model, corpus=corpus, split="validation", max_tokens=val_tokens, window=window, **on)
    d_h = train.model.head_dim
    rows, notes, learned = [], [], {}
    g = torch.Generator().manual_seed(0)
    jobs = [(layer, kind, method) for layer in layers for kind in ("keys", "values") for method in methods]
    bar = tqdm(jobs, desc="compare", dynamic_ncols=True)
    for layer, kind, method in bar:
        bar.set_postfix(layer=layer, kind=kind, method=method)
        s_n = s_n_keys if kind == "keys" else s_n_values
        chunks = lambda v: split_chunks(torch.from_numpy(v.astype(np.float32)), s_n).flatten(0, 1)
        x_train, x_test = chunks(train.vectors(layer, kind)), chunks(held_out.vectors(layer, kind))
        x_train = x_train[torch.randperm(len(x_train), generator=g)[:max_train_vectors]]
        x_test = x_test[:max_test_vectors]
        if len(x_train) < n_atoms or len(x_test) == 0:
            raise ValueError(f"layer {layer} {kind}: {len(x_train)} training / {len(x_test)} held-out vectors; "
                             f"need at least n_atoms = {n_atoms} and one held-out vector: collect more tokens")
        started = time.perf_counter()
        D, method_notes = learn(method, x_train, n_atoms=n_atoms, train_sparsity=train_sparsity,
                                ksvd_iterations=ksvd_iterations, neuraldict_steps=neuraldict_steps,
                                sklearn_epochs=sklearn_epochs)
        train_seconds = time.perf_counter() - started
        learned[layer, kind, method] = D
        notes += [f"layer {layer} {kind}: {n}" for n in method_notes]
        for coder in ("mp", "omp"):
            for s in sparsities:
                started = time.perf_counter()
                idx, coef = sparse_encode(x_test, D, s=s, method=coder)
                seconds = time.perf_counter() - started
                err = relative_error(x_test, sparse_decode(idx, coef, D))
                rows.append({"layer": layer, "kind": kind, "method": method, "coder": coder, "s": s, "s_n": s_n,
                             "bits_per_channel": 32 * s * s_n / d_h, "rel_err": err,
                             "snr_db": -10 * math.log10(max(err, 1e-30)), "train_s": train_seconds,
                             "encode_vectors_per_s": len(x_test) / seconds})
    downstream = {}
    if downstream_sparsity:
        downstream = downstream_perplexity(model, corpus, learned, train.model, layers=layers, methods=methods,
                                           s_n_values=s_n_values, sparsity=downstream_sparsity,
                                           context=downstream_context, sequences=downstream_sequences, **on)
    write_report(rows, notes, Path(output), n_atoms=n_atoms, downstream=downstream,
                 downstream_setting=f"CSR-{downstream_sparsity} on layers {list(layers)} (the other layers exact), MP, "
                                    f"offline atoms only; L = {downstream_context}, P = L/2, c = 32, "
                                    f"{downstream_sequences} test-split sequences")
    return rows


@torch.no_grad()
def downstream_perplexity(model: str, corpus: str, learned: dict, fingerprint, *, layers, methods, s_n_values: int,
                          sparsity: int, context: int, sequences: int, device: str = "cpu",
                          dtype: str = "float32") -> dict[str, float]:
    """Held-out perplexity with a CSR cache whose compared layers are coded by each method's dictionaries.

    Returns {"full precision": ppl, method: ppl, ...}; scored as `csr-eval` scores (prefill half, decode
    the rest in chunks of 32), so only tokens predicted from the compressed cache count.
    """
    from transformers import DynamicCache

    from csr_core.corpus import load_corpus
    from csr_core.dictionary_file import DictionaryFile, KindDictionaries
    from csr_core.models import load_model
    from csr_core.scoring import chunked_log_probs
    from csr_runtime.cache import CSRCache
    from neuraldict.collect import token_windows

    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    ids = token_windows(tokenizer, load_corpus(corpus, "test"), window=context, max_tokens=context * sequences,
                        source=f"test split of {corpus!r}").to(lm.device)
    # Layers that are not compared are never coded; they point at the nearest compared layer's group.
    nearest = [min(range(len(layers)), key=lambda i: abs(layers[i] - l)) for l in range(fingerprint.n_layers)]

    def perplexity(make_cache) -> float:
        nll, n = 0.0, 0
        for row in ids:
            logp = chunked_log_probs(lm, row[None], make_cache(), prefix=context // 2, chunk=32)
            targets = row[context // 2 :]
            nll -= logp.gather(1, targets[:, None]).sum().item()
            n += len(targets)
        return math.exp(nll / n)

    out = {"full precision": perplexity(DynamicCache)}
    for method in tqdm(methods, desc="downstream perplexity", dynamic_ncols=True):
        atoms = {kind: [learned[l, kind, method].numpy() for l in layers] for kind in ("keys", "values")}
        dictionary = DictionaryFile(fingerprint, KindDictionaries(1, sparsity, nearest, atoms["keys"]),
                                    KindDictionaries(s_n_values, max(1, sparsity // s_n_values), nearest, atoms["values"]),
                                    provenance={"method": method, "source": "neuraldict compare"})
        out[method] = perplexity(lambda: CSRCache(lm, dictionary, sparsity=sparsity, online_atoms=0, guard_atoms=0,
                                                  coded_layers=list(layers), model_id=fingerprint.model_id))
    return out


def write_report(rows: list[dict], notes: list[str], folder: Path, *, n_atoms: int, downstream: dict | None = None,
                 downstream_setting: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sparsities = sorted({r["s"] for r in rows})
    mean = lambda sel, key: float(np.mean([r[key] for r in sel])) if sel else float("nan")
    lines = [f"Held-out relative error (mean over layers), N = {n_atoms}; SNR = −10·log10(error).", ""]
    for kind in ("keys", "values"):
        for coder in ("mp", "omp"):
            lines += [f"**{kind}, {coder.upper()}**", "",
                      "| method | " + " | ".join(f"s={s}" for s in sparsities) + " | train s | encode vec/s (s=8) |",
                      "|---|" + "---|" * (len(sparsities) + 2)]
            for m in methods:
                sel = [r for r in rows if r["kind"] == kind and r["coder"] == coder and r["method"] == m]
                errs = [mean([r for r in sel if r["s"] == s], "rel_err") for s in sparsities]
                enc = mean([r for r in sel if r["s"] == 8], "encode_vectors_per_s")
                lines.append(f"| {m} | " + " | ".join(f"{e:.4f}" for e in errs)
                             + f" | {mean(sel, 'train_s'):.1f} | {enc:,.0f} |")
            lines.append("")
    if downstream:
        reference = downstream["full precision"]
        lines += [f"**Downstream perplexity**: {downstream_setting}", "", "| method | perplexity | × full precision |",
                  "|---|---|---|"]
        lines += [f"| {m} | {ppl:.3f} | {ppl / reference:.3f} |" for m, ppl in downstream.items()]
        lines.append("")
        with open(folder / "downstream.csv", "w", newline="") as f:
            f.write("method,perplexity,ratio_vs_full_precision\n")
            f.writelines(f"{m},{ppl},{ppl / reference}\n" for m, ppl in downstream.items())
    if notes:
        lines += ["Warnings recorded:", ""] + [f"- {n}" for n in notes]
    (folder / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, methods, folder)


def _plot(rows, methods, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x_key, name in (("s", "error_vs_s.png"), ("bits_per_channel", "error_vs_bits.png")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, kind in zip(axes, ("keys", "values")):
            for m in methods:
                for coder, style in (("mp", "-"), ("omp", "--")):
                    sel = [r for r in rows if r["kind"] == kind and r["method"] == m and r["coder"] == coder]
                    xs = sorted({r[x_key] for r in sel})
                    ys = [np.mean([r["rel_err"] for r in sel if r[x_key] == x]) for x in xs]
                    ax.plot(xs, ys, style, marker="o", ms=3, label=f"{m} ({coder})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sparsity s" if x_key == "s" else "bits per channel")
            ax.set_ylabel("held-out relative error")
            ax.set_title(kind)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
