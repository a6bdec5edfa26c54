"""The trellis-quantisation prototype (tools/experiments/trellis.py): the state machine is VVC's,
the Viterbi search is exact (brute force on short columns), and a decoder walking the state
machine over the symbols alone reconstructs what the encoder measured."""

import itertools

import numpy as np
import pytest

from aligncodec.tools.experiments import trellis as T


def test_four_state_machine_is_vvc():
    trans, qsel = T.machine(4, 1)
    assert trans.tolist() == [[0, 2], [2, 0], [1, 3], [3, 1]]
    assert qsel.tolist() == [0, 0, 1, 1]


def _walk(K, trans, qsel, delta):
    """The decoder: state 0 at row 0, next state from the parity of each symbol."""
    s, out, states = 0, [], []
    for k in K:
        states.append(s)
        out.append(float(T.recon(np.array([k]), np.array([s]), qsel, delta)[0]))
        s = trans[s, k & 1]
    return np.array(out), np.array(states)


@pytest.mark.parametrize("n_states,taps", [(4, 1), (8, 3)])
def test_viterbi_is_exact_and_decodable(n_states, taps):
    trans, qsel = T.machine(n_states, taps)
    rng = np.random.default_rng(n_states)
    delta, n = 0.5, 5
    bits = np.zeros((2, 2 * T.KMAX + 1))
    tmap = qsel.copy()
    for _ in range(4):
        w = np.clip(rng.normal(0, 0.8, n), -2.2, 2.2)  # every nearest level has |k| <= 3
        ok, os_ = np.empty(n, np.int64), np.empty(n, np.int64)
        bk, bs = np.empty((n, n_states), np.int64), np.empty((n, n_states), np.int64)
        T.viterbi_col(w, np.zeros(n, np.int64), 1, delta, 0.0, bits, tmap, trans, qsel, ok, os_, bk, bs)
        rec, states = _walk(ok, trans, qsel, delta)
        assert np.array_equal(states, os_)
        got = float(((w - rec) ** 2).sum())
        best = min(float(((w - _walk(np.array(K), trans, qsel, delta)[0]) ** 2).sum())
                   for K in itertools.product(range(-3, 4), repeat=n))
        assert got == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_rate_term_moves_symbols_towards_cheap_ones():
    trans, qsel = T.machine(4, 1)
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1.0, 2000)
    tmap = qsel.copy()
    K0, S0 = np.empty(2000, np.int64), np.empty(2000, np.int64)
    bk, bs = np.empty((2000, 4), np.int64), np.empty((2000, 4), np.int64)
    flat = np.zeros((2, 2 * T.KMAX + 1))
    T.viterbi_col(w, np.zeros(2000, np.int64), 1, 0.2, 0.0, flat, tmap, trans, qsel, K0, S0, bk, bs)
    bits = T.tables(K0, qsel[S0], 2)
    K1, S1 = np.empty(2000, np.int64), np.empty(2000, np.int64)
    T.viterbi_col(w, np.zeros(2000, np.int64), 1, 0.2, 0.4 * 0.2**2, bits, tmap, trans, qsel, K1, S1, bk, bs)
    r0 = float(bits[qsel[S0], K0 + T.KMAX].sum())
    r1 = float(bits[qsel[S1], K1 + T.KMAX].sum())
    d0 = float(((w - T.recon(K0, S0, qsel, 0.2)) ** 2).sum())
    d1 = float(((w - T.recon(K1, S1, qsel, 0.2)) ** 2).sum())
    assert r1 < r0 and d1 > d0  # a rate–distortion trade, not a free lunch or a no-op
