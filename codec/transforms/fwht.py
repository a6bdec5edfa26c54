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
    Returns a new array (numpy) or tensor (torch) of X's dtype; X is not modified."""
    *lead, p, m = X.shape
    stack = np.stack if isinstance(X, np.ndarray) else _torch_stack
    h = 1
    while h < p:
        Y = X.reshape(*lead, p // (2 * h), 2, h, m)
        a, b = Y[..., 0, :, :], Y[..., 1, :, :]
        X = stack((a + b, a - b), -3).reshape(*lead, p, m)
        h *= 2
    return X


def _torch_stack(parts, dim):
    import torch

    return torch.stack(parts, dim)
