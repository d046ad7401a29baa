import math

import pytest
import torch

from csr_runtime.code_packing import (
    COEF_FORMATS,
    CodeLayout,
    coefficient_scale,
    e3m1_codes,
    e3m1_values,
    fp8_scale,
    index_bits_for,
    pack_codes,
    pack_fields,
    quantize_coefficients,
    unpack_codes,
    unpack_fields,
)
from csr_runtime.sparse_coding import relative_error, sparse_decode, sparse_encode


@pytest.mark.parametrize("index_bits", [1, 5, 11, 13, 16])
def test_fields_round_trip_exactly(index_bits):
    layout = CodeLayout(groups=3, k=3, index_bits=index_bits, coef_format="fp8")
    g = torch.Generator().manual_seed(index_bits)
    widths = torch.tensor(layout.widths)
    values = (torch.rand(500, len(layout.widths), generator=g) * (2.0**widths)).long()  # every value a field can hold
    packed = pack_fields(values, layout)
    assert packed.dtype == torch.uint8 and packed.shape == (500, math.ceil(9 * index_bits / 8)) == (500, layout.index_bytes)
    assert torch.equal(unpack_fields(packed, layout).long(), values)


def test_bit_stream_is_little_endian_and_dense():
    layout = CodeLayout(groups=1, k=2, index_bits=11, coef_format="fp8")  # two 11-bit index fields
    packed = pack_fields(torch.tensor([[0x5A3, 0x0C7]]), layout)
    assert packed.tolist() == [[0xA3, 0x3D, 0x06]]  # 0x5A3 | 0xC7 << 11 = 0x63DA3, little-endian, 22 bits → 3 bytes
    idx, coef = torch.tensor([[[0x5A3, 0x0C7]]]), torch.tensor([[[1.5, -3.0]]])
    assert pack_codes(idx, coef, layout).tolist() == [[0xA3, 0x3D, 0x06, 0x3C, 0xC4]]  # + E4M3 bytes of 1.5, -3


@pytest.mark.parametrize("coef_format", COEF_FORMATS)
def test_codes_round_trip(coef_format):
    layout = CodeLayout(groups=6, k=3, index_bits=11, coef_format=coef_format)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 2048, (200, 6, 3), generator=g)
    coef = torch.randn(200, 6, 3, generator=g) * 5
    scale = coefficient_scale(coef_format, 40.0)
    got_idx, got_coef = unpack_codes(pack_codes(idx, coef, layout, scale=scale), layout, scale=scale)
    assert torch.equal(got_idx, idx)  # indices exact
    if coef_format == "int8":  # per head chunk: max |c| / 127 in fp16, round to nearest
        step = coef.abs().amax(-1, keepdim=True) / 127
        assert ((got_coef - coef).abs() <= 0.5 * step * 1.01 + 1e-3).all()
    else:  # exactly what MP's quantiser said the stored value would be
        assert torch.equal(got_coef, quantize_coefficients(coef, coef_format, scale))


def test_e3m1_codes_known_answer_and_error_bound():
    # sign in bit 4, magnitude index into 0, 1.5·2⁻⁷, 2⁻⁶, …, 1, 1.5 (E3M1_MAGNITUDES)
    coef = torch.tensor([1.5, -1.0, 0.75, 0.0, -1.5 * 2**-7, 9.0, 0.001])
    assert e3m1_codes(coef, 1.0).tolist() == [15, 16 | 14, 13, 0, 16 | 1, 15, 0]
    assert e3m1_codes(coef * 8, 8.0).tolist() == e3m1_codes(coef, 1.0).tolist()  # power-of-two scales are exact
    x = torch.linspace(2**-6, 1.5, 10001)
    assert ((e3m1_values(e3m1_codes(x, 1.0), 1.0) - x).abs() / x).max() <= 0.2 + 1e-6  # nearest of steps ≤ 1.5×
    layout = CodeLayout(groups=3, k=3, index_bits=11, coef_format="e3m1")
    assert layout.nbytes == (3 * 3 * (11 + 5) + 7) // 8 and layout.coef_bytes == 0  # one bit stream, no byte section
    assert coefficient_scale("e3m1", 6.0) == 4.0 and coefficient_scale("int8", 6.0) == 1.0


def test_fp8_scale_keeps_the_largest_norm_in_range():
    for norm in (0.01, 3.0, 448.0, 5000.0):
        s = fp8_scale(norm)
        assert norm / s <= 448 and norm / s > 224 and math.log2(s).is_integer()


def test_layout_sizes_and_errors():
    assert index_bits_for(1024 + 64 + 64) == 11 and index_bits_for(1024) == 10 and index_bits_for(1) == 1
    # d_h = 64 at one bit per channel: three 19-bit atoms a head vector, 3 KV heads a token → 171 bits, 22 bytes
    assert CodeLayout(groups=3, k=3, index_bits=11, coef_format="fp8").nbytes == 22
    assert CodeLayout(groups=3, k=2, index_bits=16, coef_format="fp16").nbytes == 3 * 2 * 4  # the paper's layout
    with pytest.raises(ValueError, match="coef_format has to be one of"):
        CodeLayout(groups=1, k=1, index_bits=8, coef_format="bf16")
    with pytest.raises(ValueError, match="index_bits has to be in 1..16"):
        CodeLayout(groups=1, k=1, index_bits=17, coef_format="fp8")
    with pytest.raises(ValueError, match="does not fit in index_bits = 4"):
        pack_codes(torch.tensor([[[16]]]), torch.ones(1, 1, 1), CodeLayout(groups=1, k=1, index_bits=4, coef_format="fp8"))


def test_mp_with_error_feedback_beats_rounding_afterwards():
    # Rounding each coefficient inside MP lets the later atoms correct it; rounding afterwards cannot.
    g = torch.Generator().manual_seed(0)
    D = torch.nn.functional.normalize(torch.randn(256, 32, generator=g), dim=-1)
    x = torch.randn(4000, 32, generator=g)
    q = lambda c: quantize_coefficients(c, "fp8", fp8_scale(float(x.norm(dim=-1).max())))
    idx, coef = sparse_encode(x, D, s=6)
    after = relative_error(x, sparse_decode(idx, q(coef), D))
    idx_f, coef_f = sparse_encode(x, D, s=6, quantize=q)
    feedback = relative_error(x, sparse_decode(idx_f, coef_f, D))
    assert torch.equal(coef_f, q(coef_f))  # the codes are already on the fp8 grid
    assert feedback < after


def test_appending_bits_equals_packing_the_concatenation():
    from csr_runtime.code_packing import append_bits, count_bits, pack_bits

    g = torch.Generator().manual_seed(0)
    for n, m in [(0, 5), (8, 3), (13, 20), (21, 8)]:
        old, new = torch.rand(3, n, generator=g) < 0.4, torch.rand(3, m, generator=g) < 0.4
        packed = pack_bits(old)
        assert torch.equal(append_bits(packed, n, new), pack_bits(torch.cat([old, new], dim=1)))
        assert torch.equal(count_bits(packed), old.sum(1))
