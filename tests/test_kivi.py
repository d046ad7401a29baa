import pytest
import torch
from transformers import DynamicCache

from csr_eval.kivi import KIVICache, KIVILayer, dequantize, pack, quantize, unpack
from tests.conftest import tiny_llama


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 32), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, 32 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_dequantisation_error_within_the_theoretical_bound(bits):
    x = torch.randn(200, 32) * torch.logspace(-2, 2, 200)[:, None]
    codes, scale, zero = quantize(x, bits)
    err = (dequantize(codes, scale, zero) - x).abs()
    # round-to-nearest: scale/2, plus the fp16 rounding of the zero-point and of scale·(2^b − 1)
    bound = scale.float() / 2 + zero.float().abs() * 2**-11 + scale.float() * (2**bits - 1) * 2**-11 + 1e-6
    assert (err <= bound).all()
    assert err.max() > 0.1 * (scale.float() / 2).max()  # the bound is not vacuous


def test_keys_per_channel_values_per_token_and_residual():
    layer = KIVILayer(bits=4, group_size=32, residual_length=64)
    B, H, d = 1, 2, 64
    k, v = torch.randn(B, H, 100, d), torch.randn(B, H, 100, d)
    k[..., 5] *= 100  # an outlier channel: per-channel key groups isolate it
    out_k, out_v = layer.update(k, v)
    assert torch.equal(out_k, k) and torch.equal(out_v, v)  # this call's own tokens are exact
    assert layer.n_quantized == 32 and layer.keys.shape[-2] == 68  # 100 − 64 = 36 → one group of 32 moves
    packed, scale, zero = layer.quantized["keys"]
    assert scale.shape == (B, H, 1, d, 1)  # one scale per channel per 32-token group
    assert layer.quantized["values"][1].shape == (B, H, 32, d // 32, 1)  # per token, per 32 channels
    deq = layer._dequantized("keys")
    rel = ((deq - k[..., :32, :]) ** 2).sum() / (k[..., :32, :] ** 2).sum()
    assert rel < 0.01


def test_kivi_memory_and_logits_close_to_dynamic_cache():
    lm = tiny_llama(n_layers=2, heads=4, kv_heads=2, head_dim=32)
    ids = torch.randint(0, 128, (1, 200))
    cache, reference = KIVICache(2, bits=4, residual_length=32), DynamicCache()
    with torch.no_grad():
        lm(ids[:, :150], past_key_values=cache)
        lm(ids[:, :150], past_key_values=reference)
        got, expected = lm(ids[:, 150:], past_key_values=cache).logits, lm(ids[:, 150:], past_key_values=reference).logits
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    # call 1: 150 tokens, (150 − 32) // 32 = 3 groups move (96 quantised, 54 stay);
    # call 2: 54 + 50 = 104, (104 − 32) // 32 = 2 groups move → 160 quantised, 40 in the residual
    quantized, kept = 160, 40
    codes = 2 * 32 * quantized * 4 // 8  # H · d · T codes of 4 bits
    groups = 2 * quantized  # keys: H · (T/32) · d groups; values: H · T · (d/32) groups — equal for d = 32
    per_layer_kind = codes + groups * 2 * 2  # + fp16 scale and zero-point per group
    residual = 2 * 32 * kept * 4  # fp32
    assert cache.memory_bytes() == 2 * (2 * per_layer_kind + 2 * residual)
