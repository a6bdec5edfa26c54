"""codec/transforms/fwht.py: the one butterfly, the same bits for numpy and torch, the dense H_p."""

import numpy as np
import pytest
import torch

from aligncodec.codec.transforms.fwht import butterflies, split_pow2


@pytest.mark.parametrize("n", [1, 3, 8, 24, 576, 640])
def test_split_pow2(n):
    p, m = split_pow2(n)
    assert p * m == n and p & (p - 1) == 0 and m % 2 == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p,m", [(1, 3), (2, 1), (4, 5), (8, 3), (64, 9), (512, 3)])
def test_numpy_and_torch_agree_bit_for_bit_and_match_the_dense_matrix(dtype, p, m):
    rng = np.random.default_rng(p * 31 + m)
    X = rng.standard_normal((5, p, m)).astype(dtype)
    before = X.copy()
    Y = butterflies(X)
    assert np.array_equal(X, before)  # input untouched
    T = butterflies(torch.from_numpy(X.copy())).numpy()
    assert Y.dtype == dtype and np.array_equal(Y.view(np.uint8), T.view(np.uint8))
    Hp = np.ones((1, 1))
    while Hp.shape[0] < p:
        Hp = np.block([[Hp, Hp], [Hp, -Hp]])
    want = np.einsum("ij,kjm->kim", Hp, X.astype(np.float64))
    np.testing.assert_allclose(Y, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_float32_butterfly_is_one_rounding_per_level():
    # the decoder's order (spec §7.4): each level is a float32 a + b / a − b of the previous level
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 16, 1)).astype(np.float32)
    ref = X.copy()
    h = 1
    while h < 16:
        Z = ref.reshape(3, 16 // (2 * h), 2, h, 1).copy()
        a, b = Z[:, :, 0].copy(), Z[:, :, 1].copy()
        Z[:, :, 0], Z[:, :, 1] = a + b, a - b
        ref = Z.reshape(3, 16, 1)
        h *= 2
    assert np.array_equal(butterflies(X), ref)


@pytest.mark.parametrize("shape", [(3, 64, 1), (5, 16, 3), (2, 1, 7), (4, 8192, 1)])
def test_jit_butterflies_are_the_numpy_butterflies_bit_for_bit(shape):
    """The encoder's numba butterflies (in place, float64) do the same additions in the same
    order as fwht.butterflies."""
    from aligncodec.codec.transforms.fwht import butterflies
    from aligncodec.codec.transforms.fwht_jit import butterflies_inplace

    X = np.random.default_rng(sum(shape)).standard_normal(shape)
    ref = butterflies(X)
    got = butterflies_inplace(X.copy())
    assert got.dtype == np.float64 and np.array_equal(got.view(np.uint64), ref.view(np.uint64))


@pytest.mark.parametrize("shape", [(3, 64, 1), (5, 16, 3), (2, 1, 7), (4, 1024, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_signed_butterflies_are_the_numpy_expression(shape, dtype):
    """apply64's fused pass: float64(X)·signs, then the butterflies, bit for bit the numpy
    expression; X is not modified."""
    from aligncodec.codec.transforms.fwht import butterflies
    from aligncodec.codec.transforms.fwht_jit import signed_butterflies

    k, p, m = shape
    rng = np.random.default_rng(p + m)
    X = rng.standard_normal((k, p * m)).astype(dtype)
    signs = rng.choice([-1.0, 1.0], p * m).astype(np.float32)
    X0 = X.copy()
    ref = butterflies((X.astype(np.float64) * signs.astype(np.float64)[None, :]).reshape(k, p, m))
    got = signed_butterflies(X, signs, p, m)
    assert np.array_equal(X, X0)
    assert got.dtype == np.float64 and np.array_equal(got.view(np.uint64), ref.view(np.uint64))
