"""Known-answer tests for aligncodec.codec.metrics."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aligncodec.codec import metrics as M


def _orth(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def test_kurtosis_known_distributions():
    g = torch.Generator().manual_seed(0)
    n = 1_000_000
    assert M.kurtosis(torch.randn(n, generator=g)) == pytest.approx(3.0, abs=0.05)
    assert M.kurtosis(torch.rand(n, generator=g)) == pytest.approx(1.8, abs=0.02)
    lap = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    assert M.kurtosis(lap) == pytest.approx(6.0, abs=0.3)
    # two-point ±1 distribution has kurtosis exactly 1
    assert M.kurtosis(torch.tensor([1.0, -1.0] * 50)) == pytest.approx(1.0)


def test_crest_factor():
    assert M.crest_factor(torch.tensor([1.0, -1.0] * 10)) == pytest.approx(1.0)
    x = torch.zeros(100, dtype=torch.float64)
    x[0] = 1.0
    # std = sqrt(0.01 - 1e-4) = sqrt(0.0099), max|x| = 1
    assert M.crest_factor(x) == pytest.approx(1 / math.sqrt(0.0099))


@pytest.mark.parametrize("r", [1, 3, 17, 64])
def test_effective_rank_equal_singular_values(r):
    U = _orth(96, 1)[:, :r]
    V = _orth(80, 2)[:, :r]
    W = 2.5 * U @ V.T
    assert M.effective_rank(W) == pytest.approx(r, rel=1e-6)


def test_effective_rank_tall_matrix_gram_path():
    # 20000 x 16 goes through the Gram-matrix path
    g = torch.Generator().manual_seed(3)
    A = torch.linalg.qr(torch.randn(20000, 5, generator=g, dtype=torch.float64))[0]
    W = A @ _orth(16, 4)[:5]
    assert M.effective_rank(W) == pytest.approx(5, rel=1e-5)
    s = M.singular_values(W)
    assert s.shape == (16,) and s[:5] == pytest.approx(torch.ones(5, dtype=torch.float64), abs=1e-6)


def test_effective_rank_decaying_spectrum():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    p = s / s.sum()
    assert M.effective_rank(s=s) == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_topk_energy_ratio_and_bases():
    e = torch.tensor([9.0] + [1.0] * 99)
    assert M.topk_energy_ratio(e, 0.01) == pytest.approx(9 / 108)
    assert M.topk_energy_ratio(e, 0.10) == pytest.approx((9 + 9) / 108)
    # rank-2 matrix: in the singular basis 2 of 200 coordinates carry all the energy
    W = (_orth(50, 5)[:, :2] * torch.tensor([3.0, 1.0], dtype=torch.float64)) @ _orth(200, 6)[:2]
    es = M.coordinate_energies(W, "singular")
    assert es.shape == (200,)
    assert es.sum() == pytest.approx(float((W * W).sum()))
    assert M.topk_energy_ratio(es, 0.01) == pytest.approx(1.0)
    ei = M.coordinate_energies(W, "identity")
    assert ei.sum() == pytest.approx(float((W * W).sum()))
    assert M.topk_energy_ratio(ei, 0.01) < 0.2


def test_empirical_entropy():
    assert M.empirical_entropy(torch.tensor([0.0, 1.0, 2.0, 3.0] * 25), 1.0) == pytest.approx(2.0)
    assert M.empirical_entropy(torch.zeros(10), 0.5) == 0.0
    # values within half a step of 0 all map to symbol 0
    assert M.empirical_entropy(torch.tensor([0.2, -0.3, 0.49]), 1.0) == 0.0


def test_sqnr_and_act_weighted_error():
    W = torch.ones(4, 5, dtype=torch.float64)
    W_hat = W + 0.1
    assert M.sqnr_db(W, W_hat) == pytest.approx(10 * math.log10(1 / 0.01))
    assert M.sqnr_db(W, W) == math.inf
    I = torch.eye(5, dtype=torch.float64)
    assert M.act_weighted_rel_error(W, W_hat, I) == pytest.approx(0.01)
    # a Σ that only sees input 0: only column 0 of ΔW matters
    S = torch.zeros(5, 5, dtype=torch.float64)
    S[0, 0] = 2.0
    W_hat2 = W.clone()
    W_hat2[:, 1:] += 7.0
    assert M.act_weighted_rel_error(W, W_hat2, S) == 0.0
    W_hat2[:, 0] += 0.5
    assert M.act_weighted_rel_error(W, W_hat2, S) == pytest.approx(0.25)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="zero variance"):
        M.kurtosis(torch.ones(10))
    with pytest.raises(ValueError, match="empty"):
        M.crest_factor(torch.tensor([]))
    with pytest.raises(ValueError, match="2-D"):
        M.effective_rank(torch.ones(3))
    with pytest.raises(ValueError, match="step"):
        M.empirical_entropy(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="frac"):
        M.topk_energy_ratio(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="shape"):
        M.act_weighted_rel_error(torch.ones(2, 3), torch.ones(2, 3), torch.eye(2))
    with pytest.raises(TypeError):
        M.kurtosis([1.0, 2.0])


def test_numpy_input_accepted():
    x = np.random.default_rng(0).standard_normal(1000)
    assert M.kurtosis(x) == pytest.approx(M.kurtosis(torch.from_numpy(x)))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-10, 10),
)
def test_kurtosis_crest_invariances(seed, scale, shift):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(500, generator=g, dtype=torch.float64)
    assert M.kurtosis(scale * x + shift) == pytest.approx(M.kurtosis(x), rel=1e-6)
    assert M.crest_factor(scale * x) == pytest.approx(M.crest_factor(x), rel=1e-9)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), m=st.integers(2, 30), n=st.integers(2, 30))
def test_effective_rank_rotation_invariant_and_bounded(seed, m, n):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    er = M.effective_rank(W)
    assert 1.0 - 1e-9 <= er <= min(m, n) + 1e-9
    assert M.effective_rank(W @ _orth(n, seed + 1)) == pytest.approx(er, rel=1e-8)
    # energies in any orthonormal basis sum to ||W||_F^2
    assert M.coordinate_energies(W @ _orth(n, seed + 2)).sum() == pytest.approx(float((W * W).sum()))
