"""codec/quant/rate.py: the secant search shared by the lossy encoder and the baselines."""

import math

import pytest

from aligncodec.codec.quant.rate import secant_search


def test_linear_target_found_in_two_evaluations():
    calls = []

    def f(x):  # rate falls by 1.3 per doubling of the step; target at x = 2
        calls.append(x)
        return 1.3 * (2.0 - x)

    x, fx, ok = secant_search(f, 0.0, f(0.0), tol=1e-9, max_iter=10, first_step=1.0, max_jump=4.0)
    assert ok and x == pytest.approx(2.0) and abs(fx) <= 1e-9
    assert len(calls) == 3  # f(x0) by the caller, the first step, one secant step


def test_already_within_tolerance_evaluates_nothing():
    x, fx, ok = secant_search(lambda x: pytest.fail("evaluated"), 1.5, 1e-4, tol=1e-3, max_iter=5, first_step=1.0, max_jump=4.0)
    assert (x, fx, ok) == (1.5, 1e-4, True)


def test_first_step_and_jump_limit():
    seen = []

    def f(x):
        seen.append(x)
        return 10.0  # never bracketed: every step is limited to max_jump

    x, fx, ok = secant_search(f, 0.0, 10.0, tol=0.1, max_iter=3, first_step=0.25, max_jump=3.0, flat_step=0.5)
    assert not ok and fx == 10.0
    assert seen[0] == 2.5  # x0 + first_step · f0
    assert seen[1] == 3.0  # flat f: flat_step
    assert seen[2] == 3.5


def test_bracket_bisects_and_returns_the_best_when_not_converged():
    def f(x):  # a step function: no x meets the tolerance; the search keeps inside the bracket
        return 1.0 if x < 0.3 else -1.0

    x, fx, ok = secant_search(f, 0.0, 1.0, tol=0.01, max_iter=8, first_step=1.0, max_jump=4.0)
    assert not ok and abs(fx) == 1.0 and 0.0 <= x <= 1.0
    assert math.isfinite(x)
