import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp

from csr_core.dictionary_file import bf16_atoms
from csr_runtime.sparse_coding import relative_error, residual_energy, sparse_decode, sparse_encode, split_chunks


def unit_dictionary(n_atoms, d, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_atoms, d, generator=g, dtype=dtype)
    return D / D.norm(dim=1, keepdim=True)


def reference_mp(x, D, s):
    """Plain per-vector loop, straight from the paper's description."""
    idx, coef = np.zeros((len(x), s), dtype=np.int64), np.zeros((len(x), s))
    for n, v in enumerate(x):
        r = v.copy()
        for g in range(s):
            scores = D @ r
            i = int(np.argmax(np.abs(scores)))
            idx[n, g], coef[n, g] = i, scores[i]
            r = r - scores[i] * D[i]
    return idx, coef


@pytest.mark.parametrize("s", [1, 3, 8])
def test_mp_matches_reference_loop(s):
    D = unit_dictionary(64, 16)
    x = torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    idx, coef = sparse_encode(x, D, s=s, method="mp", chunk_size=7)  # several chunks
    ref_idx, ref_coef = reference_mp(x.numpy(), D.numpy(), s)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(coef.numpy(), ref_coef, atol=1e-12)


@pytest.mark.parametrize("s", [1, 4, 8])
def test_omp_matches_scikit_learn(s):
    D = unit_dictionary(128, 24, seed=2)
    x = torch.randn(60, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    idx, coef = sparse_encode(x, D, s=s, method="omp")
    ref = orthogonal_mp(D.T.numpy(), x.T.numpy(), n_nonzero_coefs=s).T  # (n, N)
    for n in range(len(x)):
        assert set(idx[n].tolist()) == set(np.flatnonzero(ref[n]).tolist())
    np.testing.assert_allclose(sparse_decode(idx, coef, D).numpy(), ref @ D.numpy(), atol=1e-10)


def test_mp_and_omp_agree_at_s1():
    D = unit_dictionary(50, 10, seed=4)
    x = torch.randn(30, 10, dtype=torch.float64)
    a, b = sparse_encode(x, D, s=1, method="mp"), sparse_encode(x, D, s=1, method="omp")
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_omp_with_full_orthonormal_basis_is_exact():
    Q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    x = torch.randn(20, 12, dtype=torch.float64)
    idx, coef = sparse_encode(x, Q.T.contiguous(), s=12, method="omp")
    torch.testing.assert_close(sparse_decode(idx, coef, Q.T), x)


def test_float32_and_float64_agree():
    D = unit_dictionary(64, 16, seed=5)
    x = torch.randn(100, 16, dtype=torch.float64)
    e64 = relative_error(x, sparse_decode(*sparse_encode(x, D, s=4), D))
    e32 = relative_error(x, sparse_decode(*sparse_encode(x.float(), D.float(), s=4), D.float()))
    assert abs(e64 - e32) < 1e-4


def test_mp_error_decreases_with_sparsity():
    D = unit_dictionary(256, 16, seed=6)
    x = torch.randn(200, 16, dtype=torch.float64)
    errors = [relative_error(x, sparse_decode(*sparse_encode(x, D, s=s), D)) for s in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_bad_arguments():
    D = unit_dictionary(8, 4)
    with pytest.raises(ValueError, match="width 5 but the dictionary's atoms have width 4"):
        sparse_encode(torch.randn(3, 5, dtype=torch.float64), D, s=2)
    with pytest.raises(ValueError, match="positive integer"):
        sparse_encode(torch.randn(3, 4, dtype=torch.float64), D, s=0)
    with pytest.raises(ValueError, match="method must be one of"):
        sparse_encode(torch.randn(3, 4, dtype=torch.float64), D, s=1, method="lasso")
    with pytest.raises(ValueError, match="OMP needs s <= min"):
        sparse_encode(torch.randn(3, 4, dtype=torch.float64), D, s=5, method="omp")
    with pytest.raises(ValueError, match="not divisible by s_n = 3"):
        split_chunks(torch.randn(2, 64), 3)


def test_rotate_into_equals_rotate():
    from csr_runtime.rope import rotate, rotate_into

    g = torch.Generator().manual_seed(0)
    k, cos, sin = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    out = torch.empty(2, 3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(rotate_into(out, k, cos, sin), rotate(k, cos, sin).double(), rtol=1e-6, atol=1e-6)


def test_omp_keeps_supports_distinct_when_the_vector_is_already_exact():
    D = torch.eye(6, dtype=torch.float64)
    x = torch.stack([D[0] * 2.0, D[4] - D[0]])  # exact after 1 and 2 atoms; s = 4 asks for more
    idx, coef = sparse_encode(x, D, s=4, method="omp")
    assert all(len(set(row.tolist())) == 4 for row in idx)
    torch.testing.assert_close(sparse_decode(idx, coef, D), x)
    assert coef.abs().max() <= 2.0 + 1e-12  # no cancelling pair of huge coefficients


@pytest.mark.parametrize("rounded", [False, True])
def test_large_mp_calls_through_the_gram_matrix_choose_the_reference_atoms(rounded, monkeypatch):
    """A call with many vectors updates the scores through D Dᵀ in the CPU kernel (`_mp_gram_batch`): the same atoms
    and coefficients as the paper's loop (in float64), error feedback of rounded coefficients included. Without a C
    compiler (CI has one) the same call takes the product path and gives the same codes."""
    import csr_runtime.sparse_coding as sc
    from csr_runtime import native
    from csr_runtime.code_packing import CoefficientRounding

    monkeypatch.setenv("CSR_AMX", "0")  # the product in torch (the AMX kernel: the next test)
    D = unit_dictionary(256, 16, seed=4)
    x = torch.randn(700, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    quantize = CoefficientRounding("e3m1", 0.25) if rounded else None
    taken = []
    gram_batch = sc._mp_gram_batch
    monkeypatch.setattr(sc, "_mp_gram_batch", lambda *a: taken.append(len(a[0])) or gram_batch(*a))
    idx, coef = sparse_encode(x.float(), D.float(), s=5, quantize=quantize, chunk_size=300)
    # one Gram matrix, every chunk through the kernel (the product path where no compiler builds it)
    assert taken == ([300, 300, 100] if native.find_compiler() is not None else [])
    ref_idx, ref_coef = sc._mp_batch(x, D, 5, quantize)  # the product path in float64
    np.testing.assert_array_equal(idx.numpy(), ref_idx.numpy())
    np.testing.assert_allclose(coef.numpy(), ref_coef.numpy(), atol=1e-5)
    # small calls, autograd, OMP and roundings other than e3m1 keep the product path
    assert sc._gram_pays(x.float(), D.float(), 5, "mp", quantize) == native.available()
    assert not sc._gram_pays(x[:10].float(), D.float(), 5, "mp", quantize)
    assert not sc._gram_pays(x.float(), D.float().requires_grad_(), 5, "mp", quantize)
    assert not sc._gram_pays(x.float(), D.float(), 5, "omp", quantize)
    assert not sc._gram_pays(x.float(), D.float(), 5, "mp", CoefficientRounding("fp8", 0.25))


@pytest.mark.parametrize("bf16", [False, True], ids=["float32-atoms", "bf16-atoms"])
@pytest.mark.parametrize("N, d", [(260, 20), (512, 64), (288, 128)])  # padded to tiles or not; d > 64: chunk by chunk
def test_large_mp_calls_on_amx_choose_the_reference_atoms(N, d, bf16, monkeypatch):
    """On a CPU with Intel AMX the Gram path's product X Dᵀ is made in the kernel from bf16 parts (`_mp_amx_batch`):
    its scores within 2⁻¹⁵ |x| of the float64 ones (s = 1: the coefficient is the top score), its int16 Gram matrix
    within 2⁻¹⁵, and the same atoms and coefficients as the paper's loop in float64 but at near-ties (of 700 × 4 choices, at most 3 rows differ, each
    where its two atoms' float64 scores are within 10⁻⁴ |x|). Atoms that are bf16 values (as neuraldict exports
    them) take two bf16 products instead of three, to the same precision."""
    import csr_runtime.sparse_coding as sc
    from csr_runtime import native
    from csr_runtime.code_packing import CoefficientRounding

    if not native.amx_available():
        pytest.skip("this CPU has no Intel AMX (or the kernel was not built for it): the Gram path's product is torch's")
    D = unit_dictionary(N, d, seed=11)
    if bf16:
        D = torch.from_numpy(bf16_atoms(D.float().numpy())).double()
    x = torch.randn(700, d, dtype=torch.float64, generator=torch.Generator().manual_seed(12)) * 3
    taken = []
    amx_batch = sc._mp_amx_batch
    monkeypatch.setattr(sc, "_mp_amx_batch", lambda *a: taken.append(len(a[0])) or amx_batch(*a))
    memo = {}
    idx, top = sparse_encode(x.float(), D.float(), s=1, gram_memo=memo)  # s = 1 is too few for the Gram path:
    assert taken == []  # the direct kernel
    idx, coef = sparse_encode(x.float(), D.float(), s=4, gram_memo=memo, quantize=CoefficientRounding("e3m1", 0.25))
    amx = memo["amx"][1]
    assert taken == [700] and amx.packed.numel() == 2 * (-(-N // 32) * 32) * (-(-d // 32) * 32)
    assert amx.atoms_bf16 == bf16
    # its Gram matrix, made on the tiles as int16: within 2⁻¹⁶ of the largest entry (plus bf16x3's error)
    np.testing.assert_allclose(amx.gram.double().numpy() * amx.gram_scale, (D @ D.T).numpy(), atol=2**-15, rtol=0)
    ref_idx, ref_coef = sc._mp_batch(x, D, 4, CoefficientRounding("e3m1", 0.25))
    differ = (idx != ref_idx).any(1)
    assert int(differ.sum()) <= 3
    np.testing.assert_allclose(coef[~differ].numpy(), ref_coef[~differ].numpy(), atol=1e-5)
    for row in differ.nonzero().flatten().tolist():  # a near-tie: the first atom that differs scored as the other
        a = int((idx[row] != ref_idx[row]).nonzero()[0])
        residual = x[row] - (ref_coef[row, :a, None] * D[ref_idx[row, :a]]).sum(0)
        scores = D @ residual
        assert abs(scores[idx[row, a]].abs() - scores[ref_idx[row, a]].abs()) < 1e-4 * x[row].norm()
    # the scores themselves: s = 1 without rounding, through the AMX kernel directly
    amx_idx, amx_top = native.mp_amx(x.float(), amx, 1)
    best = (x @ D.T).gather(1, amx_idx)
    np.testing.assert_allclose(amx_top.numpy(), best.numpy(), atol=2**-15 * float(x.norm(dim=1).max()), rtol=0)
    assert (amx_idx == (x @ D.T).abs().argmax(1, keepdim=True)).float().mean() > 0.99


@pytest.mark.parametrize("rounded", [False, True])
@pytest.mark.parametrize("n, N, d", [(7, 250, 20), (24, 512, 64)])
def test_small_mp_calls_in_one_kernel_call_choose_the_reference_atoms(rounded, n, N, d, monkeypatch):
    """A call too small for the Gram matrix (a decode step's vectors) runs in one call of the CPU kernel
    (`_mp_direct_batch`), which computes every score itself: the same atoms and coefficients as the paper's loop in
    float64, error feedback included — for row counts that leave a partial sweep of rows and atom counts that
    leave atoms past the last full register. Without a C compiler (CI has one) the product path gives the same."""
    import csr_runtime.sparse_coding as sc
    from csr_runtime import native
    from csr_runtime.code_packing import CoefficientRounding

    D = unit_dictionary(N, d, seed=7)
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    quantize = CoefficientRounding("e3m1", 0.25) if rounded else None
    taken = []
    direct_batch = sc._mp_direct_batch
    monkeypatch.setattr(sc, "_mp_direct_batch", lambda *a: taken.append(len(a[0])) or direct_batch(*a))
    memo = {}
    idx, coef = sparse_encode(x.float(), D.float(), s=4, quantize=quantize, gram_memo=memo)
    assert taken == ([n] if native.find_compiler() is not None else [])
    ref_idx, ref_coef = sc._mp_batch(x, D, 4, quantize)
    np.testing.assert_array_equal(idx.numpy(), ref_idx.numpy())
    np.testing.assert_allclose(coef.numpy(), ref_coef.numpy(), atol=1e-5)
    if taken:  # the transposed atoms are kept for the next call with this dictionary
        torch.testing.assert_close(memo["atoms_t"][1], D.float().T)
    # autograd, OMP, float64 and roundings other than e3m1 keep the product path
    assert not sc._kernel_applies(x.float(), D.float().requires_grad_(), 4, "mp", quantize)
    assert not sc._kernel_applies(x.float(), D.float(), 4, "omp", quantize)
    assert not sc._kernel_applies(x, D, 4, "mp", quantize)
    assert not sc._kernel_applies(x.float(), D.float(), 4, "mp", CoefficientRounding("fp8", 0.25))


@pytest.mark.parametrize("amx", ["0", "1"])
def test_a_gram_memo_keeps_the_last_dictionarys_gram_matrix_until_it_changes(amx, monkeypatch):
    from csr_runtime import native

    monkeypatch.setenv("CSR_AMX", amx)
    name = "amx" if native.amx_available() else "gram"  # the AMX path keeps the packed atoms and an int16 Gram
    as_float = lambda kept: kept.gram.double() * kept.gram_scale if name == "amx" else kept.double()
    D = unit_dictionary(256, 16, seed=4, dtype=torch.float32)
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(6))
    memo = {}
    first = sparse_encode(x, D, s=4, gram_memo=memo)
    if native.find_compiler() is None:  # no kernel, no Gram matrix: nothing is kept (CI has a compiler)
        assert memo == {}
        return
    gram = memo[name][1]
    torch.testing.assert_close(as_float(gram), (D @ D.T).double(), atol=2**-14, rtol=0)
    again = sparse_encode(x, D, s=4, gram_memo=memo)
    assert memo[name][1] is gram and all(torch.equal(a, b) for a, b in zip(first, again))
    D[0] = -D[0]  # edited in place: the memo must not serve the old matrix
    sparse_encode(x, D, s=4, gram_memo=memo)
    assert memo[name][1] is not gram
    torch.testing.assert_close(as_float(memo[name][1]), (D @ D.T).double(), atol=2**-14, rtol=0)


@pytest.mark.parametrize("native_path", ["1", "0"])
@pytest.mark.parametrize("d", [20, 64, 300])  # 300: more channels than the kernel's span of 256
def test_residual_energy_is_the_squared_error_of_the_decoded_codes(d, native_path, monkeypatch):
    """The refinement ranks vectors by ‖x − Σ coef · D[idx]‖²: in one kernel pass on the CPU, as the decode otherwise."""
    monkeypatch.setenv("CSR_NATIVE", native_path)
    g = torch.Generator().manual_seed(5)
    D, x = unit_dictionary(50, d, seed=6).float(), torch.randn(300, d, generator=g)
    idx, coef = torch.randint(0, 50, (300, 3), generator=g), torch.randn(300, 3, generator=g)
    expected = (x.double() - sparse_decode(idx, coef.double(), D.double())).square().sum(-1)
    np.testing.assert_allclose(residual_energy(x, idx, coef, D).double().numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_native_residual_energy_refuses_indices_outside_the_dictionary():
    from csr_runtime import native

    if not native.available():
        pytest.skip("no C compiler here: the torch path serves residual_energy")
    with pytest.raises(ValueError, match="indices must lie in"):
        native.residual_energy(torch.zeros(2, 4), torch.tensor([[0], [4]]), torch.ones(2, 1), torch.eye(4))
