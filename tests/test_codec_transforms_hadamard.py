"""Known-answer tests for the randomized Hadamard rotation and weight folding."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aligncodec.codec.transforms import hadamard as Hd
from aligncodec.codec import metrics as M


@pytest.mark.parametrize("n", [1, 2, 3, 9, 12, 64, 100, 576, 640, 1536])
def test_orthogonal(n):
    rh = Hd.RandomizedHadamard(n, seed=7)
    H = rh.matrix()
    I = torch.eye(n, dtype=torch.float64)
    assert (H.T @ H - I).abs().max() < 1e-6


def test_power_of_two_part_is_a_hadamard():
    rh = Hd.RandomizedHadamard(64, seed=3)
    assert (rh.p, rh.m) == (64, 1)
    H = rh.matrix()
    # every entry of a (normalised) Hadamard matrix has magnitude 1/sqrt(n)
    assert torch.allclose(H.abs(), torch.full_like(H, 1 / 8))


@pytest.mark.parametrize("n", [576, 640, 1536])
def test_apply_matches_dense_matrix_and_inverse(n):
    rh = Hd.RandomizedHadamard(n, seed=11)
    H = rh.matrix()
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(rh.apply(x), x @ H, atol=1e-12)
    assert torch.allclose(rh.apply_t(x), x @ H.T, atol=1e-12)
    assert torch.allclose(rh.apply_t(rh.apply(x)), x, atol=1e-12)
    # float32 input stays float32
    assert rh.apply(x.float()).dtype == torch.float32


def test_seed_determinism():
    a = Hd.RandomizedHadamard(576, seed=5).matrix()
    b = Hd.RandomizedHadamard(576, seed=5).matrix()
    c = Hd.RandomizedHadamard(576, seed=6).matrix()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.01
    assert Hd.tensor_seed(1, "x") == Hd.tensor_seed(1, "x") != Hd.tensor_seed(1, "y")


@pytest.mark.parametrize("shape", [(192, 576), (576, 1536), (64, 640)])
def test_folded_layer_same_outputs(shape):
    out_f, in_f = shape
    g = torch.Generator().manual_seed(0)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    x = torch.randn(in_f, 8, generator=g, dtype=torch.float64)
    rh = Hd.RandomizedHadamard(in_f, seed=1)
    Wr = Hd.fold_weight(W, rh)
    x_rot = rh.apply(x.T).T  # Hᵀ x = (xᵀ H)ᵀ
    assert torch.allclose(Wr @ x_rot, W @ x, atol=1e-9)
    assert torch.allclose(Hd.unfold_weight(Wr, rh), W, atol=1e-12)
    # rotated second moment: E[(Hᵀx)(Hᵀx)ᵀ] = Hᵀ Σ H
    S = x @ x.T / 8
    assert torch.allclose(Hd.rotate_sigma(S, rh), x_rot @ x_rot.T / 8, atol=1e-10)


def test_rotation_flattens_outliers():
    # one row with a few huge outlier coordinates: the rotation spreads their
    # energy over all coordinates, so the row looks Gaussian (kurtosis ~ 3)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 4608, generator=g, dtype=torch.float64)
    w[0, [5, 700, 3000]] = torch.tensor([60.0, -45.0, 50.0], dtype=torch.float64)
    wr = Hd.fold_weight(w, Hd.RandomizedHadamard(4608, seed=2))
    assert M.kurtosis(w) > 100
    assert M.kurtosis(wr) == pytest.approx(3.0, abs=0.3)
    assert M.crest_factor(wr) < M.crest_factor(w) / 5


def test_bad_input():
    with pytest.raises(ValueError, match="positive integer"):
        Hd.RandomizedHadamard(0, 1)
    rh = Hd.RandomizedHadamard(12, 1)
    with pytest.raises(ValueError, match="last dimension"):
        rh.apply(torch.zeros(3, 13))
    with pytest.raises(TypeError):
        rh.apply(torch.zeros(3, 12, dtype=torch.int64))


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 200), seed=st.integers(0, 2**32 - 1))
def test_orthogonal_property(n, seed):
    rh = Hd.RandomizedHadamard(n, seed)
    x = torch.randn(3, n, dtype=torch.float64)
    y = rh.apply(x)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-10)
    assert torch.allclose(rh.apply_t(y), x, atol=1e-10)
