"""How much each layer's coding error moves the model's output: the weights of the bit allocation.

The error curves say how much squared error a layer's keys (values) keep after k atoms; they do not say
what that error costs. Measured on SmolLM2, the output KL per unit of squared error differs between
layers by 25× for keys and by 500× for values (the first layers' values are small and matter a lot, the
last layers' are large and matter little), so an allocation on raw error spends its atoms where the
error is large rather than where it hurts.

For every layer λ and kind, one forward pass over held-out text replaces only that layer's keys (before
RoPE) or values with their k-atom code over the layer's offline dictionary (in the dictionary's space:
A (x − μ), decoded back) and measures

    σ_λ,kind = KL(p_exact ‖ p_coded) / e_λ,kind,

with e the mean squared error of those codes in the units of `error_curve`. For small errors KL is
quadratic in the error and the layers' contributions add up, so σ · (e(k) − e(k + 1)) is the KL one more
atom saves: what `csr_core.allocation.greedy_allocation` maximises per bit.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from csr_core.dictionary_file import KINDS, DictionaryFile, coding_space
from csr_core.models import pre_rope_key_modules
from csr_runtime.sparse_coding import sparse_encode, split_chunks


def code_and_decode(x: torch.Tensor, dictionary: DictionaryFile, kind: str, layer: int, sparsity: int):
    """(…, H · d_h) vectors of one layer → (their k-atom reconstruction, squared error per head vector in the
    dictionary's space), coded as the runtimes code them (centered, whitened, MP over the offline atoms)."""
    d, H, dh = dictionary.kind(kind), dictionary.model.n_kv_heads, dictionary.model.head_dim
    center = None if d.center is None else d.center[layer]
    z = torch.from_numpy(coding_space(x.detach().reshape(-1, dh).float().numpy(), H, center,
                                      None if d.whiten is None else d.whiten[layer]))
    chunks = split_chunks(z, d.s_n).flatten(0, 1)
    atoms = torch.from_numpy(d.for_layer(layer))
    idx, coef = sparse_encode(chunks, atoms, s=sparsity)
    z_hat = (coef[..., None] * atoms[idx]).sum(1).view(z.shape)
    error = float((z - z_hat).square().sum(-1).mean())
    x_hat = z_hat.view(-1, H, dh)
    if d.unwhiten is not None:
        x_hat = torch.einsum("hij,nhj->nhi", torch.from_numpy(d.unwhiten[layer]), x_hat)
    if center is not None:
        x_hat = x_hat + torch.from_numpy(center)
    return x_hat.reshape(x.shape).to(x.dtype), error


def mean_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """KL(p ‖ q) per position, averaged; inputs are log-probabilities (…, vocab)."""
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


@torch.no_grad()
def layer_sensitivity(lm: torch.nn.Module, input_ids: torch.Tensor, dictionary: DictionaryFile, *,
                      sparsity: int = 2) -> dict[str, np.ndarray]:
    """{kind: (n_layers,) σ = output KL per unit of squared coding error} on `input_ids` (B, T).

    One forward pass per layer and kind (2 · n_layers + 1 in all)."""
    if sparsity < 1:
        raise ValueError(f"sparsity must be at least 1 atom, got {sparsity}")
    modules = pre_rope_key_modules(lm)
    if len(modules) != dictionary.model.n_layers:
        raise ValueError(f"the model has {len(modules)} layers, the dictionary {dictionary.model.n_layers}")
    reference = torch.log_softmax(lm(input_ids).logits.float(), -1)
    out = {}
    for position, kind in enumerate(KINDS):
        sens = np.zeros(dictionary.model.n_layers)
        for layer in tqdm(range(dictionary.model.n_layers), desc=f"Sensitivity ({kind})", dynamic_ncols=True):
            errors = []

            def replace(module, inputs, output, layer=layer, kind=kind):
                x_hat, error = code_and_decode(output, dictionary, kind, layer, sparsity)
                errors.append(error)
                return x_hat

            handle = modules[layer][position].register_forward_hook(replace)
            try:
                coded = torch.log_softmax(lm(input_ids).logits.float(), -1)
            finally:
                handle.remove()
            kl = max(mean_kl(reference, coded), 0.0)
            sens[layer] = kl / max(errors[0], 1e-12)
        out[kind] = sens
    return out


def measure_sensitivity(dictionary: DictionaryFile, *, model: str, corpus: str, tokens: int = 1024, window: int = 512,
                        sparsity: int = 2, device: str = "cpu") -> dict[str, np.ndarray]:
    """`layer_sensitivity` on `tokens` of the corpus's validation split (windows of `window` tokens)."""
    from csr_core.corpus import load_corpus
    from csr_core.models import load_model, model_fingerprint
    from neuraldict.collect import token_windows

    lm, tokenizer = load_model(model, device=device)
    dictionary.check_model(model_fingerprint(lm, model))
    windows = token_windows(tokenizer, load_corpus(corpus, "validation"), window=min(window, tokens), max_tokens=tokens,
                            source=f"corpus {corpus!r} (validation)")
    return layer_sensitivity(lm, windows.to(device), dictionary, sparsity=sparsity)
