"""The Sylvester–Hadamard butterflies of :func:`.fwht.butterflies` as a numba kernel, in place,
for the encoder's float64 rotations (``lossy.HadamardData.apply64``: C = W·T and Tᵀ·Σ·T of a wide
input). The same additions in the same level order, so the same bits as the numpy version; it
avoids numpy's per-level strided passes, slow for the short runs of the first levels."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _butterflies_inplace(X):  # pragma: no cover - numba
    k, p, m = X.shape
    for r in range(k):
        h = 1
        while h < p:
            for i in range(0, p, 2 * h):
                for j in range(i, i + h):
                    for c in range(m):
                        a = X[r, j, c]
                        b = X[r, j + h, c]
                        X[r, j, c] = a + b
                        X[r, j + h, c] = a - b
            h *= 2


def butterflies_inplace(X: np.ndarray) -> np.ndarray:
    """H_p along axis 1 of a C-contiguous (k, p, m) array, p a power of two, in place. Returns X."""
    if X.ndim != 3 or not X.flags.c_contiguous:
        raise ValueError("butterflies_inplace: a C-contiguous (k, p, m) array")
    _butterflies_inplace(X)  # not a parallel kernel: no lock needed; nogil: encoder threads run it side by side
    return X


@numba.njit(cache=True, nogil=True)
def _signed_butterflies(X, signs, out):  # pragma: no cover - numba
    k, p, m = out.shape
    for r in range(k):
        for i in range(p):
            for c in range(m):
                out[r, i, c] = np.float64(X[r, i * m + c]) * signs[i * m + c]
    _butterflies_inplace(out)


def signed_butterflies(X: np.ndarray, signs: np.ndarray, p: int, m: int) -> np.ndarray:
    """(X · diag(signs)) as float64 (k, p, m), then H_p along axis 1: one pass over X, no
    intermediate copies (HadamardData.apply64). ``X`` (k × p·m, float32 or float64) is not modified."""
    X = np.ascontiguousarray(X)
    out = np.empty((X.shape[0], p, m), dtype=np.float64)
    _signed_butterflies(X, np.ascontiguousarray(signs, dtype=np.float64), out)
    return out
