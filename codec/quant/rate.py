"""The rate search shared by the lossy encoder and the entropy-coded baselines: a secant
search on x = log2(step) for the root of a target function f (f > 0: the rate is too high,
raise the step), bracketed, with bisection when a secant step leaves the bracket."""

from __future__ import annotations

from typing import Callable


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
