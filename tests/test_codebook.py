"""The codebook policy (offline + online + guard atoms within an index budget), without a model, in both runtimes."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from csr_runtime.codebook import Codebook as TorchCodebook
from mlx_backend.codebook import Codebook as MLXCodebook
from tests.test_cache import random_atoms


def vectors(n, w, seed):
    return np.random.default_rng(seed).standard_normal((n, w)).astype(np.float32)


def as_numpy(a):
    return a.float().numpy() if isinstance(a, torch.Tensor) else np.array(a.astype(mx.float32), copy=True)


@pytest.mark.parametrize("runtime", ["torch", "mlx"])
def test_online_atoms_are_the_most_recent_nonzero_vectors_then_guard_atoms_fill_the_budget(runtime):
    Codebook, array = (TorchCodebook, torch.from_numpy) if runtime == "torch" else (MLXCodebook, mx.array)
    offline = random_atoms(10, 4, 0)
    book = Codebook(array(offline), online_atoms=3, guard_atoms=2)
    assert book.capacity == 15
    book.start(batch=2)
    seen = vectors(6, 4, 1)
    seen[5] = 0  # the newest vector is zero: it cannot be an atom
    assert book.add_online(0, array(seen)) == 3
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
    row0 = as_numpy(book.row(0))
    np.testing.assert_allclose(row0[:10], offline)
    np.testing.assert_allclose(row0[10:], unit(seen[[4, 3, 2]]), atol=1e-3)  # fp16 atoms
    assert np.array_equal(as_numpy(book.row(1)), offline)  # rows are independent
    assert book.guard_room(0) == 2 and book.guard_room(1) == 2
    assert book.add_guard(0, array(vectors(5, 4, 2))) == 2  # only 2 fit the index budget
    assert book.guard_room(0) == 0 and book.add_guard(0, array(vectors(1, 4, 3))) == 0
    assert as_numpy(book.row(0)).shape == (15, 4)


@pytest.mark.parametrize("runtime", ["torch", "mlx"])
def test_selecting_rows_moves_each_rows_atoms_and_reset_forgets_them(runtime):
    Codebook, array = (TorchCodebook, torch.from_numpy) if runtime == "torch" else (MLXCodebook, mx.array)
    book = Codebook(array(random_atoms(8, 4, 0)), online_atoms=2, guard_atoms=2)
    book.start(batch=3)
    for b in range(3):
        book.add_online(b, array(vectors(b + 1, 4, b)))  # rows hold 1, 2 and 2 online atoms
    before = [as_numpy(book.row(b)) for b in range(3)]
    book.select_rows(torch.tensor([2, 0, 0]) if runtime == "torch" else [2, 0, 0])
    for b, old in enumerate([2, 0, 0]):
        np.testing.assert_array_equal(as_numpy(book.row(b)), before[old])
    assert book.n_online == [2, 1, 1] and book.guard_room(1) == 2
    book.reset()
    assert book.held_tensors() == [] and as_numpy(book.row(0)).shape == (8, 4)


def test_both_runtimes_choose_the_same_atoms():
    offline, seen, outliers = random_atoms(16, 8, 0), vectors(40, 8, 1), vectors(3, 8, 2)
    books = [TorchCodebook(torch.from_numpy(offline), 5, 2), MLXCodebook(mx.array(offline), 5, 2)]
    for book, array in zip(books, (torch.from_numpy, mx.array)):
        book.start(1)
        book.add_online(0, array(seen))
        book.add_guard(0, array(outliers))
    np.testing.assert_array_equal(as_numpy(books[0].row(0)), as_numpy(books[1].row(0)))


def test_unknown_sampling_is_rejected_in_both_runtimes():
    for Codebook, array in ((TorchCodebook, torch.from_numpy), (MLXCodebook, mx.array)):
        with pytest.raises(ValueError, match="online_sampling"):
            Codebook(array(random_atoms(4, 4, 0)), 1, 1, online_sampling="newest")
