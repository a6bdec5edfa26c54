"""The rate search shared by the lossy encoder and the entropy-coded baselines: a secant
search on x = log2(step) for the root of a target function f (f > 0: the rate is too high,
raise the step), bracketed, with bisection when a secant step leaves the bracket; and the
symbol histogram the rate estimates count with."""

from __future__ import annotations

from typing import Callable

import numpy as np

HISTOGRAM_CHUNK = 1 << 22  # symbols per bincount call


def histogram(v: np.ndarray, lo: int, hi: int, chunk: int = HISTOGRAM_CHUNK) -> np.ndarray:
    """Counts (int64, length hi − lo + 1) of the integer symbols ``v`` clipped to [lo, hi], a
    chunk at a time: bincount widens its input to int64, and the clip and the shift are copies
    too, so one call on a large tensor's int32 symbols (an embedding: 28 M) would hold three
    temporaries of up to twice its size."""
    v = np.asarray(v).reshape(-1)
    m = hi - lo + 1
    cnt = np.zeros(m, dtype=np.int64)
    for a in range(0, v.size, chunk):
        c = v[a:a + chunk]
        if int(c.min()) < lo or int(c.max()) > hi:
            c = np.clip(c, lo, hi)
        cnt += np.bincount(c - lo, minlength=m)
    return cnt


def secant_search(f: Callable[[float], float], x0: float, f0: float, *, tol: float, max_iter: int,
                  first_step: float, max_jump: float, flat_step: float | None = None) -> tuple[float, float, bool]:
    """Search x with |f(x)| ≤ ``tol``, from x0 where f(x0) = f0 is known.

    The first step is x0 + ``first_step``·f0 (a slope of −1/first_step); then secant steps,
    bisection of the bracket [lo, hi] (f(lo) > 0 > f(hi)) when a step leaves it, and jumps of
    at most ``max_jump`` while no bracket exists. Where two values of f are equal the step is
    ``flat_step`` (None: the last f). At most ``max_iter`` evaluations of f.

    Returns ``(x, f(x), converged)``: the first x within tolerance, else the evaluated x with
    the least |f|."""
    if abs(f0) <= tol:
        return x0, f0, True
    lo = hi = None
    best = (abs(f0), x0, f0)
    x1 = x0 + first_step * f0
    for _ in range(max_iter):
        f1 = f(x1)
        best = min(best, (abs(f1), x1, f1))
        for x, fx in ((x0, f0), (x1, f1)):
            if fx > 0 and (lo is None or x > lo):
                lo = x
            if fx < 0 and (hi is None or x < hi):
                hi = x
        if abs(f1) <= tol:
            return x1, f1, True
        xn = x1 - f1 * (x1 - x0) / (f1 - f0) if f1 != f0 else x1 + (f1 if flat_step is None else flat_step)
        if lo is not None and hi is not None and not (lo < xn < hi):
            xn = 0.5 * (lo + hi)
        elif lo is None or hi is None:
            xn = x1 + max(-max_jump, min(max_jump, xn - x1))
        x0, f0, x1 = x1, f1, xn
    return best[1], best[2], False
