"""The one Sylvester–Hadamard butterfly, for numpy arrays (the decoder, float32; the encoder,
float64) and torch tensors (the rotations of :mod:`.hadamard`). numpy only at import.

Every output element of a level is one IEEE addition a + b or subtraction a − b of two
elements of the previous level, so the result is exactly defined in any floating-point
dtype: the float32 order that spec/FORMAT.md §7.4 fixes for ``ecsq`` decoding.
"""

from __future__ import annotations

import numpy as np


def split_pow2(n: int) -> tuple[int, int]:
    """(p, m) with n = p·m, p the largest power of two dividing n and m odd."""
    p = n & -n
    return p, n // p


def butterflies(X):
    """The unnormalised Sylvester–Hadamard transform H_p along axis −2 of X (…, p, m), p a power
    of two: levels h = 1, 2, 4, … < p, each mapping the pairs (a, b) h apart to (a + b, a − b).
    Returns a new array (numpy) or tensor (torch) of X's dtype; X is not modified.

    numpy: two buffers, each level written with ``out=`` into the other one (no per-level
    allocation; the same additions, so the same bits as a stacked version)."""
    *lead, p, m = X.shape
    if not isinstance(X, np.ndarray):
        return _butterflies_torch(X)
    if p == 1:
        return X.copy()
    src = np.ascontiguousarray(X)
    a_buf = np.empty(src.shape, dtype=src.dtype)
    b_buf = np.empty(src.shape, dtype=src.dtype) if p > 2 else None
    h = 1
    dst = a_buf
    while h < p:
        Y = src.reshape(*lead, p // (2 * h), 2, h, m)
        Z = dst.reshape(*lead, p // (2 * h), 2, h, m)
        a, b = Y[..., 0, :, :], Y[..., 1, :, :]
        np.add(a, b, out=Z[..., 0, :, :])
        np.subtract(a, b, out=Z[..., 1, :, :])
        src = dst
        dst = b_buf if dst is a_buf else a_buf
        h *= 2
    return src


def _butterflies_torch(X):
    *lead, p, m = X.shape
    h = 1
    while h < p:
        Y = X.reshape(*lead, p // (2 * h), 2, h, m)
        a, b = Y[..., 0, :, :], Y[..., 1, :, :]
        X = _torch_stack((a + b, a - b), -3).reshape(*lead, p, m)
        h *= 2
    return X


def _torch_stack(parts, dim):
    import torch

    return torch.stack(parts, dim)
