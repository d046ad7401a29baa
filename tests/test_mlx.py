"""The MLX runtime: kernel parity with torch, RoPE round trip, exactness, and parity with the torch runtime on SmolLM2."""

import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from csr_core.dictionary_file import DictionaryFile, KindDictionaries, ModelFingerprint, save_dictionary
from csr_runtime.sparse_coding import sparse_encode as torch_encode
from mlx_backend.cache import make_csr_cache, model_fingerprint
from mlx_backend.rope import rotate, unrotate
from mlx_backend.sparse_coding import sparse_decode, sparse_encode
from tests.test_cache import orthonormal, random_atoms


@pytest.mark.parametrize("method", ["mp", "omp"])
def test_mp_and_omp_match_the_torch_kernels(method):
    D = random_atoms(256, 32, 0)
    x = np.random.default_rng(1).standard_normal((500, 32)).astype(np.float32)
    i_mx, c_mx = sparse_encode(mx.array(x), mx.array(D), s=6, method=method)
    i_t, c_t = torch_encode(torch.from_numpy(x), torch.from_numpy(D), s=6, method=method)
    same = np.array(i_mx) == i_t.numpy()
    assert same.all(axis=1).mean() > 0.99  # identical supports, float32 near-ties aside
    rows = same.all(axis=1)
    np.testing.assert_allclose(np.array(c_mx)[rows], c_t.numpy()[rows], atol=1e-4, rtol=1e-4)
    x_hat = np.array(sparse_decode(i_mx, c_mx, mx.array(D)))
    assert ((x - x_hat) ** 2).sum() < ((x) ** 2).sum()


def test_unrotate_inverts_mlx_lm_rope():
    rope = nn.RoPE(16, traditional=False, base=100000.0)
    k = mx.random.normal((1, 2, 9, 16), key=mx.random.key(0))
    np.testing.assert_allclose(np.array(unrotate(rope(k, offset=5), rope, 5)), np.array(k), atol=1e-5)
    np.testing.assert_allclose(np.array(rotate(k, rope, 5)), np.array(rope(k, offset=5)), atol=1e-6)
    with pytest.raises(ValueError, match="supports the plain nn.RoPE"):
        rotate(k, nn.ALiBi(), 0)


def tiny_mlx_llama(n_layers=2):
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(0)
    args = ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=n_layers, intermediate_size=128,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                     vocab_size=128, rope_theta=10000.0)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def complete_dictionary(model):
    """s = d_h: every key and value chunk is coded exactly (up to fp16 coefficients)."""
    return DictionaryFile(model_fingerprint(model, "tiny"), KindDictionaries(1, 16, [0, 0], [orthonormal(16, 0)]),
                          KindDictionaries(2, 8, [0, 1], [orthonormal(8, 1), orthonormal(8, 2)]))


@pytest.mark.parametrize("sinks", [0, 2])
def test_complete_orthonormal_dictionary_reproduces_kvcache_logits(sinks):
    from mlx_lm.models.cache import make_prompt_cache

    model = tiny_mlx_llama()
    dictionary = complete_dictionary(model)
    csr = make_csr_cache(model, dictionary, online_atoms=0, guard_atoms=0, window=3, sink_tokens=sinks,
                         coef_format="fp16")  # packed indices, fp16 coefficients
    plain = make_prompt_cache(model)
    ids = mx.array(np.random.default_rng(0).integers(0, 128, (1, 20)))
    for part in (ids[:, :12], ids[:, 12:17], ids[:, 17:18], ids[:, 18:]):
        np.testing.assert_allclose(np.array(model(part, cache=csr)), np.array(model(part, cache=plain)), atol=2e-3)
    assert csr[0].n_coded == 17 - sinks and csr[0].offset == 20


def test_dictionary_for_another_model_is_rejected():
    model = tiny_mlx_llama()
    other = DictionaryFile(ModelFingerprint("x", 2, 2, 64, 10000.0), KindDictionaries(1, 2, [0, 0], [random_atoms(8, 64, 0)]),
                           KindDictionaries(2, 1, [0, 0], [random_atoms(8, 32, 0)]))
    with pytest.raises(ValueError, match="head_dim: dictionary has 64, model has 16"):
        make_csr_cache(model, other)


def test_importing_mlx_backend_without_mlx_says_how_to_install():
    code = "import sys; sys.modules['mlx'] = None; sys.modules['mlx.core'] = None\nimport mlx_backend"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "pip install 'csr-neuraldict[mlx]'" in run.stderr


def test_runtime_modules_do_not_import_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import mlx_backend.cache, mlx_backend.sparse_coding, mlx_backend.rope, mlx_backend.evaluate\n"
            "print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.smollm2
def test_smollm2_parity_with_the_torch_runtime(smollm2, tmp_path):
    from mlx_lm import load

    from csr_core.models import model_fingerprint as torch_fingerprint
    from csr_core.scoring import chunked_log_probs as torch_log_probs
    from csr_runtime.cache import CSRCache
    from mlx_backend.convert import mlx_model_dir
    from mlx_backend.evaluate import chunked_log_probs as mlx_log_probs

    lm, tokenizer = smollm2
    fp = torch_fingerprint(lm, "smollm2-135m-instruct")
    dictionary = DictionaryFile(fp, KindDictionaries(1, 4, [0] * 30, [random_atoms(256, 64, 0)]),
                                KindDictionaries(2, 2, [0] * 30, [random_atoms(256, 32, 1)]))
    path = save_dictionary(tmp_path / "d.safetensors", dictionary)
    model, _ = load(str(mlx_model_dir()))
    assert model.args.rope_theta == fp.rope_theta  # the conversion spelled out rope_theta
    text = "Python's dictionaries map keys to values; lookups take constant time on average, which makes them fast."
    ids = tokenizer(text * 3, return_tensors="pt")["input_ids"][:, :80]
    options = dict(sparsity=4, online_atoms=16, guard_atoms=16, refine_fraction=0.25)
    torch_cache = CSRCache(lm, path, **options)
    mlx_cache = make_csr_cache(model, str(path), **options)
    t = torch_log_probs(lm, ids, torch_cache, prefix=48, chunk=16)
    t = t.gather(-1, ids[0, 48:, None]).squeeze(-1).numpy()
    m = mlx_log_probs(model, ids[0].tolist(), mlx_cache, prefix=48, chunk=16)
    for kind in ("keys", "values"):  # the same packed bytes (float32 near-ties aside)
        m_store, t_store = mlx_cache[0].stores[kind], torch_cache.layers[0].stores[kind]
        same = np.array(m_store.codes) == t_store.codes.numpy()
        assert same.mean() > 0.98, (kind, same.mean())
        # the same vectors refined (near-ties at the cut aside), as many in both
        m_flags = np.unpackbits(np.array(m_store.refine_mask), bitorder="little")
        t_flags = np.unpackbits(t_store.refine_mask.numpy(), bitorder="little")
        assert m_store.refine_codes.shape == tuple(t_store.refine_codes.shape) and m_flags.sum() == t_flags.sum() > 0
        assert (m_flags & t_flags).sum() / t_flags.sum() > 0.9, (kind, (m_flags & t_flags).sum(), t_flags.sum())
    np.testing.assert_allclose(m, t, atol=0.1)
    ppl_t, ppl_m = np.exp(-t.mean()), np.exp(-m.mean())
    assert abs(ppl_m / ppl_t - 1) < 0.01, (ppl_t, ppl_m)


def random_smollm2_dictionary(smollm2, tmp_path):
    """A random dictionary file that fits SmolLM2: enough for the CLIs' plumbing, not for quality."""
    from csr_core.models import model_fingerprint as torch_fingerprint

    fp = torch_fingerprint(smollm2[0], "smollm2-135m-instruct")
    return save_dictionary(tmp_path / "d.safetensors", DictionaryFile(
        fp, KindDictionaries(1, 4, [0] * 30, [random_atoms(128, 64, 0)]), KindDictionaries(2, 2, [0] * 30, [random_atoms(128, 32, 1)])))


@pytest.mark.smollm2
def generate_cli(path, *flags):
    run = subprocess.run([sys.executable, "-m", "mlx_backend.generate", "--csr-dictionary", str(path), "--csr-sparsity",
                          "8", *flags], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_generate_cli_runs_mlx_lms_own_loop_and_compares_with_the_plain_cache(smollm2, tmp_path):
    path = random_smollm2_dictionary(smollm2, tmp_path)
    out = generate_cli(path, "--prompt", "The capital of France is", "--max-tokens", "6", "--compare-kv-cache")
    assert out.count("tokens-per-sec") == 4  # mlx-lm's own report (prompt, generation), once per cache
    csr_kib = float(out.split("CSR cache: ")[1].split(" KiB")[0])
    plain_kib = float(out.split("KVCache cache: ")[1].split(" KiB")[0])
    assert 0 < csr_kib < plain_kib
    assert "after 6 tokens" not in out  # the cache holds the chat-templated prompt and the answer


@pytest.mark.smollm2
def test_evaluate_cli_runs_every_cache(smollm2_kmeans_dictionary):
    run = subprocess.run([sys.executable, "-m", "mlx_backend.evaluate", "--dictionary", str(smollm2_kmeans_dictionary),
                          "--context-length", "64", "--sequences", "1", "--chunk", "16", "--sparsity", "8"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert set(rows) == {"KVCache", "QuantizedKVCache 4-bit", "CSR-8"}
    assert all(1 < ppl < 1000 for ppl in rows.values())


@pytest.mark.parametrize("remove", [2, 9])  # from the window only; through the window into the codes
def test_trim_matches_kvcache(remove):
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

    model = tiny_mlx_llama()
    dictionary = complete_dictionary(model)
    csr = make_csr_cache(model, dictionary, online_atoms=0, guard_atoms=0, window=4, coef_format="fp16")
    plain = make_prompt_cache(model)
    ids = mx.array(np.random.default_rng(1).integers(0, 128, (1, 24)))
    model(ids[:, :20], cache=csr)
    model(ids[:, :20], cache=plain)
    assert can_trim_prompt_cache(csr)
    assert trim_prompt_cache(csr, remove) == trim_prompt_cache(plain, remove) == remove
    assert csr[0].offset == 20 - remove and csr[0].n_coded == min(16, 20 - remove) - 4  # 4 sink tokens stay exact
    tail = ids[:, 20 - remove : 24 - remove]
    np.testing.assert_allclose(np.array(model(tail, cache=csr)), np.array(model(tail, cache=plain)), atol=2e-3)


def test_new_tokens_wait_exact_for_a_coding_batch_as_in_the_torch_runtime():
    from mlx_lm.models.cache import make_prompt_cache

    model = tiny_mlx_llama()
    csr = make_csr_cache(model, complete_dictionary(model), coding_batch=8, sink_tokens=0, coef_format="fp16")
    plain = make_prompt_cache(model)
    ids = mx.array(np.random.default_rng(2).integers(0, 128, (1, 24)))
    model(ids[:, :12], cache=csr)
    model(ids[:, :12], cache=plain)
    assert csr[0].n_coded == 12  # a prefill of >= 8 new tokens is coded whole
    for t in range(12, 24):
        step = ids[:, t : t + 1]
        np.testing.assert_allclose(np.array(model(step, cache=csr)), np.array(model(step, cache=plain)), atol=2e-3)
        waiting = (t + 1 - 12) % 8
        assert csr[0].n_coded == t + 1 - waiting and csr[0].keys.shape[2] == waiting, t


@pytest.mark.parametrize("coef_format", ["fp16", "fp8", "int8", "e3m1"])
def test_packed_codes_are_the_same_bytes_in_both_runtimes(coef_format):
    from csr_runtime import code_packing as tp
    from mlx_backend import code_packing as mp

    layout = tp.CodeLayout(groups=3, k=3, index_bits=11, coef_format=coef_format)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 2048, (300, 3, 3))
    coef = (rng.standard_normal((300, 3, 3)) * 4).astype(np.float32)
    scale = tp.coefficient_scale(coef_format, 30.0)
    packed_t = tp.pack_codes(torch.from_numpy(idx), torch.from_numpy(coef), layout, scale=scale).numpy()
    packed_m = np.array(mp.pack_codes(mx.array(idx), mx.array(coef), layout, scale=scale))
    assert np.array_equal(packed_t, packed_m)  # one layout: bytes written by one runtime read by the other
    i_m, c_m = mp.unpack_codes(mx.array(packed_t), layout, scale=scale)
    i_t, c_t = tp.unpack_codes(torch.from_numpy(packed_m), layout, scale=scale)
    assert np.array_equal(np.array(i_m), idx) and np.array_equal(i_t.numpy(), idx)
    np.testing.assert_array_equal(np.array(c_m), c_t.numpy())
    if coef_format != "int8":
        np.testing.assert_array_equal(np.array(mp.quantize_coefficients(mx.array(coef), coef_format, scale)),
                                      tp.quantize_coefficients(torch.from_numpy(coef), coef_format, scale).numpy())


def test_whitened_complete_dictionary_reproduces_kvcache_logits():
    from mlx_lm.models.cache import make_prompt_cache

    from csr_runtime.metric import whitening

    model = tiny_mlx_llama()
    dictionary = complete_dictionary(model)
    g = torch.Generator().manual_seed(3)
    for kind in (dictionary.keys, dictionary.values):  # an arbitrary metric: A⁻¹ must undo A exactly
        M = torch.randn(2, 2, 16, 16, generator=g, dtype=torch.float64)
        A, A_inv = whitening(M @ M.transpose(-1, -2) + torch.eye(16))
        kind.metric, kind.whiten, kind.unwhiten = "attention", A.numpy(), A_inv.numpy()
    csr = make_csr_cache(model, dictionary, online_atoms=0, guard_atoms=0, coef_format="fp16")
    plain = make_prompt_cache(model)
    ids = mx.array(np.random.default_rng(0).integers(0, 128, (1, 16)))
    for part in (ids[:, :12], ids[:, 12:13], ids[:, 13:]):
        np.testing.assert_allclose(np.array(model(part, cache=csr)), np.array(model(part, cache=plain)), atol=5e-3)


def test_conversions_of_two_folders_with_the_same_name_are_kept_apart(tmp_path, monkeypatch, tiny_model_dir,
                                                                       other_tiny_model_dir):
    import json
    import shutil

    from mlx_backend.convert import mlx_model_dir

    monkeypatch.setenv("CSR_CACHE_DIR", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(tiny_model_dir, a)
    shutil.copytree(other_tiny_model_dir, b)
    converted_a, converted_b = mlx_model_dir(str(a)), mlx_model_dir(str(b))
    assert converted_a != converted_b
    layers = lambda folder: json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert (layers(converted_a), layers(converted_b)) == (3, 2)
    assert mlx_model_dir(str(a)) == converted_a  # the second call reuses the conversion
    config = json.loads((a / "config.json").read_text())
    config["rope_theta"] = 12345.0
    (a / "config.json").write_text(json.dumps(config))  # the same folder, changed: converted again
    assert json.loads((mlx_model_dir(str(a)) / "config.json").read_text())["rope_theta"] == 12345.0


@pytest.mark.smollm2
def test_generate_cli_uses_the_chat_template_and_runs_one_generation_unless_asked(smollm2, tmp_path):
    path = random_smollm2_dictionary(smollm2, tmp_path)
    out = generate_cli(path, "--prompt", "What is the capital of France?", "--max-tokens", "8")
    assert "CSR cache:" in out and "KVCache" not in out  # no second generation unless asked
    assert "What is the capital" not in out  # the chat answer, not a continuation of the raw prompt
    templated = int(out.split("after ")[1].split(" tokens")[0])
    raw = generate_cli(path, "--prompt", "What is the capital of France?", "--max-tokens", "8", "--ignore-chat-template")
    assert int(raw.split("after ")[1].split(" tokens")[0]) < templated  # mlx-lm's flag sends the text as is
    with pytest.raises(AssertionError, match="cannot be combined with the CSR cache"):
        generate_cli(path, "--kv-bits", "4")


def test_install_makes_mlx_lm_build_csr_caches():
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_backend.cache import CSRKVCache, install

    model = tiny_mlx_llama()
    install(model, complete_dictionary(model), online_atoms=0, guard_atoms=0, coef_format="fp16")
    caches = make_prompt_cache(model)
    assert len(caches) == 2 and all(isinstance(c, CSRKVCache) for c in caches)
    assert make_prompt_cache(model)[0] is not caches[0]  # a fresh cache per request

    from mlx_lm.generate import generate_step

    built = []
    make = model.make_cache
    model.make_cache = lambda: built.append(make()) or built[-1]
    tokens = [int(t) for t, _ in generate_step(mx.array([1, 5, 9, 14]), model, max_tokens=3)]
    assert len(tokens) == 3 and len(built) == 1  # mlx-lm's own loop asked the model for its (CSR) cache
    assert built[0][0].offset >= 4 + 2  # the prompt and the fed-back tokens went through the CSR cache
    with pytest.raises(ValueError, match="online_atoms must be an int >= 0"):
        install(model, complete_dictionary(model), online_atoms=-1)


def test_model_sources_local_folders_are_converted_hub_ids_pass_through(tmp_path, monkeypatch, tiny_model_dir):
    from mlx_backend.convert import mlx_source

    monkeypatch.setenv("CSR_CACHE_DIR", str(tmp_path / "cache"))
    converted = mlx_source(str(tiny_model_dir))
    assert converted.startswith(str(tmp_path / "cache")) and "tiny-llama" in converted
    assert mlx_source("mlx-community/SmolLM2-135M-Instruct") == "mlx-community/SmolLM2-135M-Instruct"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without a config.json"):
        mlx_source(str(tmp_path / "empty"))


@pytest.mark.smollm2
def test_generate_cli_samples_with_temperature_and_seed(smollm2, tmp_path):
    path = random_smollm2_dictionary(smollm2, tmp_path)
    text = lambda seed: generate_cli(path, "--prompt", "Tell me a story.", "--max-tokens", "12", "--temp", "2.0",
                                     "--seed", str(seed)).split("==========")[1]
    assert text(1) != text(2)  # sampled through mlx-lm's sampler, not greedy: the seed matters


def test_prompt_cache_round_trip_continues_exactly(tmp_path):
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.models.cache import save_prompt_cache as mlx_lm_save

    from mlx_backend.prompt_cache import load_prompt_cache, save_prompt_cache

    model = tiny_mlx_llama()
    fp = model_fingerprint(model, "tiny")
    d = DictionaryFile(fp, KindDictionaries(1, 3, [0, 0], [random_atoms(48, 16, 0)]),
                       KindDictionaries(2, 2, [0, 1], [random_atoms(48, 8, 1), random_atoms(48, 8, 2)]))
    cache = make_csr_cache(model, d, online_atoms=8, guard_atoms=4, guard_threshold=0.2, window=3)
    ids = mx.array(np.random.default_rng(5).integers(0, 128, (1, 26)))
    model(ids[:, :20], cache=cache)
    assert cache[0].n_coded == 20 - 4 - 3 and sum(layer.stats["guard_atoms"] for layer in cache) > 0  # lossy, with atoms
    path = tmp_path / "prompt.safetensors"
    save_prompt_cache(path, cache, {"prompt": "twenty tokens"})
    loaded, metadata = load_prompt_cache(path, model, d, return_metadata=True)
    assert metadata == {"prompt": "twenty tokens"} and loaded[1].stats == cache[1].stats
    for t in range(20, 26):  # both continue identically: codes, atoms, scales, window and sinks came back
        step = ids[:, t : t + 1]
        np.testing.assert_array_equal(np.array(model(step, cache=loaded)), np.array(model(step, cache=cache)))
    assert loaded[0].nbytes == cache[0].nbytes
    # what is not a CSR prompt cache says what to use instead
    plain = make_prompt_cache(model)
    model(ids[:, :4], cache=plain)
    mlx_lm_save(str(tmp_path / "plain.safetensors"), plain)
    with pytest.raises(ValueError, match="not a CSR prompt cache.*mlx_lm.models.cache.load_prompt_cache"):
        load_prompt_cache(tmp_path / "plain.safetensors", model, d)
    with pytest.raises(ValueError, match="save other caches with mlx_lm.models.cache.save_prompt_cache"):
        save_prompt_cache(tmp_path / "x.safetensors", plain)


class _Tokens:
    """What `batch_generate` needs of a tokenizer when the prompts are token ids."""

    eos_token_ids = [127]

    def decode(self, ids):
        return " ".join(map(str, ids))


def _lossy_dictionary(model):
    """A random (lossy) dictionary: every row's codes, online and guard atoms matter for its tokens."""
    return DictionaryFile(model_fingerprint(model, "tiny"), KindDictionaries(1, 3, [0, 0], [random_atoms(32, 16, 0)]),
                          KindDictionaries(1, 3, [0, 0], [random_atoms(32, 16, 1)]))


def test_batch_generate_with_csr_caches_matches_each_sequence_alone():
    """mlx-lm's own batched loop (right-padded prompts, left-padded decoding, rows leaving as they finish)
    with CSR caches gives every sequence the tokens it gets alone — and its cache holds the same codes."""
    from mlx_lm.generate import batch_generate, generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_backend.batch_rows import BatchCSRKVCache
    from mlx_backend.cache import install

    model = tiny_mlx_llama()
    install(model, _lossy_dictionary(model), online_atoms=4, guard_atoms=4, sink_tokens=1, window=2)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 127, n).tolist() for n in (5, 13, 9)]
    max_tokens = [6, 4, 8]  # rows leave the batch at different steps (filter)
    batch = batch_generate(model, _Tokens(), prompts, max_tokens=max_tokens, return_token_ids=True,
                           return_prompt_caches=True, return_logprobs=True)
    for prompt, n, got, logprobs, cache in zip(prompts, max_tokens, batch.token_ids, batch.logprobs, batch.caches):
        alone = make_prompt_cache(model)
        steps = list(generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=alone))
        assert got == [int(t) for t, _ in steps]
        np.testing.assert_allclose(logprobs, [float(lp[int(t)]) for t, lp in steps], atol=1e-4)
        assert cache[1].n_coded > 0 and cache[1].stats["vectors_coded"] > 0  # the batch coded this row's tokens
    merged = BatchCSRKVCache.merge([make_prompt_cache(model)[0] for _ in range(2)])
    assert len(merged.rows) == 2 and merged.empty()
    with pytest.raises(ValueError, match="right-padded prompts"):
        merged.prepare(left_padding=[1, 0])


def test_refined_vectors_decode_as_their_longer_mp_codes_and_survive_trim_and_save(tmp_path):
    from mlx_backend.prompt_cache import load_prompt_cache, save_prompt_cache

    model = tiny_mlx_llama()
    d = _lossy_dictionary(model)
    options = dict(sparsity=2, sink_tokens=0, coding_batch=1)
    refined = make_csr_cache(model, d, refine_fraction=0.3, refine_atoms=2, **options)
    plain = make_csr_cache(model, d, refine_fraction=0, **options)
    longer = make_csr_cache(model, d, sparsity=4, sink_tokens=0, coding_batch=1, refine_fraction=0)
    ids = mx.array(np.random.default_rng(7).integers(0, 128, (1, 20)))
    for cache in (refined, plain, longer):
        model(ids[:, :16], cache=cache)
        for t in range(16, 20):  # decode steps: each codes its own vector batch
            model(ids[:, t : t + 1], cache=cache)
    # layer 0: its inputs (embeddings) are the same in the three caches also after the decode steps
    keys, plain_keys, longer_keys = (np.array(c[0]._decoded_keys()) for c in (refined, plain, longer))
    is_refined = np.abs(keys - plain_keys).max(-1) > 0
    np.testing.assert_allclose(keys[is_refined], longer_keys[is_refined], atol=1e-5)
    np.testing.assert_array_equal(keys[~is_refined], plain_keys[~is_refined])
    assert is_refined.sum() == round(0.3 * 2 * 16) + 4 * round(0.3 * 2)  # 10 of the prefill's 32, 1 of 2 per step
    assert refined[0].nbytes == sum(a.nbytes for a in refined[0]._held_arrays()) > plain[0].nbytes
    save_prompt_cache(tmp_path / "p.safetensors", refined)
    loaded = load_prompt_cache(tmp_path / "p.safetensors", model, d)
    np.testing.assert_array_equal(np.array(loaded[0]._decoded_keys()), keys)
    refined[0].trim(6)
    np.testing.assert_array_equal(np.array(refined[0]._decoded_keys()), keys[:, :, :14])
