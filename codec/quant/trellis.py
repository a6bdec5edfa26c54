"""Trellis-coded ("dependent") quantisation for lossy mode 4 ``tcq`` (spec/FORMAT.md §7.6):
the encoder's search. The state machine is :func:`aligncodec.codec.modes.lossy.trellis_machine`
(one definition); the decoder side is ``lossy.trellis_levels``.

Two interleaved quantisers on the union grid of step Δ (``params.step``):

    Q0: level L = 2k            Q1: level L = 2k − sgn k           reconstruction C = f32(L)·d_j

Each column walks its rows from state 0; the state picks the quantiser, and the parity of the
symbol k moves the state. Per column a Viterbi search over the rows minimises

    Σ_i (c_i − L_i·Δ)² + λ · bits(k_i),      λ = LAMBDA_C · Δ²   (weight units, every column)

with, per state, the candidates: the two nearest levels of its quantiser and 0. Inside GPTQ
(:func:`gptq_tcq`: act order, lazy batches, as ``gptq.gptq_ecsq``) the search runs where the
rounding is, and the column's error is fed to the later columns as usual.

Rate term ``bits``: one table per tensor (the format codes each class's symbols with one rANS
table for both quantisers), −log2 of the frequencies of round(c/2Δ) over the tensor's values
before quantisation (:func:`prior_bits`, no extra pass; add-½ smoothed, a linear tail outside
the seen range), or the tables a caller passes as ``rate`` (:func:`class_rate`): the encoder's
extra passes (``codec/encoder.py`` ``code_candidate``) re-run the search with the class tables of
the previous pass, measured in docs/results/2026-11-30-tcq.md.

A tensor taller than the encoder's row chunk is searched one chunk at a time: each column
enters a chunk in the state its walk reached at the end of the chunk above (``state`` of
:func:`gptq_tcq`; the other start states cost +inf) and leaves in the chosen path's best end
state. That is the decoder's walk exactly, with memory bounded by the chunk; only the choice
at each boundary is local (the all-rows search could pick another end state there). The rate
table of a chunk without ``rate`` is the prior of that chunk's values.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from aligncodec.codec.entropy.rans import histogram, launch, serial_twin
from aligncodec.codec.modes.lossy import MAX_ABS_TCQ_SYMBOL, trellis_machine

__all__ = ["LAMBDA_C", "prior_bits", "symbol_bits", "class_rate", "tcq_levels", "gptq_tcq", "gptq_tcq_steps", "tcq_independent"]

LAMBDA_C = 0.25  # λ = c·Δ²: with the prior table (no extra pass) c = 0.25 beat 0.4 and 0.6 inside GPTQ (docs/results/2026-11-30-tcq.md)
_TAIL_BITS = 2.0  # bits per unit of |k| beyond the table's seen range


def symbol_bits(K: np.ndarray, kmax: int | None = None) -> np.ndarray:
    """bits[k + kmax] = −log2 p(k) of the symbols K (add-½ smoothing over the seen range, then a
    linear tail of ``_TAIL_BITS`` per unit outside it), float64 of length 2·kmax + 1."""
    K = np.asarray(K).reshape(-1)
    lo, hi = (int(K.min()), int(K.max())) if K.size else (0, 0)
    lo, hi = min(lo, 0), max(hi, 0)
    if kmax is None:
        kmax = min(MAX_ABS_TCQ_SYMBOL, max(-lo, hi) + 8)
    lo, hi = max(lo, -kmax), min(hi, kmax)
    cnt = histogram(K, lo, hi).astype(np.float64) + 0.5
    tab = -np.log2(cnt / cnt.sum())
    bits = np.empty(2 * kmax + 1)
    bits[lo + kmax: hi + kmax + 1] = tab
    ks = np.arange(-kmax, kmax + 1)
    below, above = ks < lo, ks > hi
    bits[below] = tab[0] + _TAIL_BITS * (lo - ks[below])
    bits[above] = tab[-1] + _TAIL_BITS * (ks[above] - hi)
    return bits


def prior_bits(C: torch.Tensor | np.ndarray, step: float) -> np.ndarray:
    """The rate table before any search: symbol_bits of round(c / 2Δ) over the tensor's values
    (each quantiser's step is 2Δ; a k of the trellis sits near c/2Δ in either quantiser)."""
    c = C.numpy() if isinstance(C, torch.Tensor) else np.asarray(C)
    k = np.rint(np.clip(c.astype(np.float64) / (2.0 * step), -MAX_ABS_TCQ_SYMBOL, MAX_ABS_TCQ_SYMBOL)).astype(np.int64)
    return symbol_bits(k)


@numba.njit(cache=True)
def _level(q, k):  # pragma: no cover - numba
    if q == 0:
        return 2 * k
    if k > 0:
        return 2 * k - 1
    if k < 0:
        return 2 * k + 1
    return 0


@numba.njit(cache=True)
def _viterbi(w, step, lam, rlam, bits, tab, trans, qsel, s0, out_k, out_l, bk, bs, cost, newc):  # pragma: no cover - numba
    """One column w (rows) whose walk enters row 0 in state ``s0`` (the decoder's state after
    the column's earlier rows; 0 at the top): symbols into out_k, levels into out_l; returns
    the state after the last row of the chosen path (its best end state). bk/bs (rows × S):
    scratch. ``bits`` (tables × (2·kmax + 1)): rate tables; row i's symbol is priced by table
    ``tab[i]``, with the rate weight lam·rlam[i] (rlam: per-row multipliers of λ)."""
    rows = w.shape[0]
    S = trans.shape[0]
    kmax = (bits.shape[1] - 1) // 2
    kcap = min(kmax, MAX_ABS_TCQ_SYMBOL)
    inv = 1.0 / step
    for s in range(S):
        cost[s] = np.inf
    cost[s0] = 0.0
    for i in range(rows):
        for s in range(S):
            newc[s] = np.inf
        wi = np.float64(w[i])
        t = wi * inv
        ti = tab[i]
        li = lam * rlam[i]
        for s in range(S):
            c0 = cost[s]
            if c0 == np.inf:
                continue
            q = qsel[s]
            if q == 0:
                k0 = np.int64(np.floor(t / 2.0))
                k1 = k0 + 1
            elif t >= 0:
                k0 = np.int64(np.floor((t + 1.0) / 2.0))
                k1 = k0 + 1
            else:
                k0 = -np.int64(np.floor((-t + 1.0) / 2.0))
                k1 = k0 - 1
            for a in range(3):
                if a == 0:
                    k = k0
                elif a == 1:
                    k = k1
                else:
                    if k0 == 0 or k1 == 0:
                        break
                    k = 0
                if k > kcap:
                    k = kcap
                elif k < -kcap:
                    k = -kcap
                e = wi - _level(q, k) * step
                c = c0 + e * e + li * bits[ti, k + kmax]
                ns = trans[s, k & 1]
                if c < newc[ns]:
                    newc[ns] = c
                    bk[i, ns] = k
                    bs[i, ns] = s
        for s in range(S):
            cost[s] = newc[s]
    s = 0
    for j in range(1, S):
        if cost[j] < cost[s]:
            s = j
    end = s
    for i in range(rows - 1, -1, -1):
        k = bk[i, s]
        p = bs[i, s]
        out_k[i] = k
        out_l[i] = _level(qsel[p], k)
        s = p
    return end


@numba.njit(cache=True)
def _scratch(rows, S):  # pragma: no cover - numba
    """The search's work arrays: back-pointers (symbol, previous state: int8, S ≤ 128), outputs, column, costs."""
    return (np.empty((rows, S), np.int32), np.empty((rows, S), np.int8), np.empty(rows, np.int32),
            np.empty(rows, np.int32), np.empty(rows, np.float64), np.empty(S), np.empty(S))


@numba.njit(parallel=True, cache=True)
def _tcq_block(W1, U1, step, lam, rlam, bits, rtab, ctab, trans, qsel, S1, K1, Q1, E1):  # pragma: no cover - numba
    """GPTQ's column loop over one block with the trellis where the rounding is: the column's
    search (sequential over rows, entering in state S1[i]; S1[i] becomes its final state), then
    its error fed forward in the block (parallel over rows). Symbol (r, i) is priced by rate
    table ``rtab[r] + ctab[i]``; symbols into K1, reconstructed values (level·Δ) into Q1."""
    rows, b = W1.shape
    bk, bs, ok, ol, col, cost, newc = _scratch(rows, trans.shape[0])
    tab = np.empty(rows, np.int64)
    for i in range(b):
        for r in range(rows):
            col[r] = W1[r, i]
            tab[r] = rtab[r] + ctab[i]
        S1[i] = _viterbi(col, step, lam, rlam, bits, tab, trans, qsel, S1[i], ok, ol, bk, bs, cost, newc)
        d = U1[i, i]
        for r in numba.prange(rows):
            K1[r, i] = ok[r]
            v = ol[r] * step
            Q1[r, i] = v
            err = (W1[r, i] - v) / d
            E1[r, i] = err
            for j in range(i + 1, b):
                W1[r, j] -= err * U1[i, j]


_tcq_block_serial = serial_twin(_tcq_block)


@numba.njit(parallel=True, cache=True)
def _tcq_columns(W, step, lam, rlam, bits, rtab, ctab, trans, qsel, St, K):  # pragma: no cover - numba
    """No feedback (Σ = I after the transform): one independent search per column, in parallel,
    column j entering in state St[j] (overwritten by its final state). Symbol (r, j) is priced
    by rate table ``rtab[r] + ctab[j]``."""
    rows, n = W.shape
    for j in numba.prange(n):
        bk, bs, ok, ol, col, cost, newc = _scratch(rows, trans.shape[0])
        tab = np.empty(rows, np.int64)
        for r in range(rows):
            col[r] = W[r, j]
            tab[r] = rtab[r] + ctab[j]
        St[j] = _viterbi(col, step, lam, rlam, bits, tab, trans, qsel, St[j], ok, ol, bk, bs, cost, newc)
        for r in range(rows):
            K[r, j] = ok[r]


_tcq_columns_serial = serial_twin(_tcq_columns)


def _machine(mid: int):
    trans, qsel = trellis_machine(mid)
    if trans.shape[0] > 128:  # the back-pointers to the previous state (_scratch's bs) are int8
        raise ValueError(f"the trellis search handles at most 128 states, machine {mid} has {trans.shape[0]}")
    return np.ascontiguousarray(trans.astype(np.int64)), np.ascontiguousarray(qsel.astype(np.int64))


def class_rate(K: np.ndarray, ids: np.ndarray | None = None, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rate model of symbols K as the format codes them: one table per symbol class
    (``ids`` along ``axis``, as ``lossy.make_classes``; None: one class). Returns (bits
    (classes × (2·kmax + 1)), rtab (rows,), ctab (n,)): symbol (r, j) is priced by table
    rtab[r] + ctab[j]."""
    K = np.asarray(K)
    rows, n = K.shape
    kmax = min(MAX_ABS_TCQ_SYMBOL, (max(int(K.max()), -int(K.min())) if K.size else 0) + 8)  # no |K| copy
    rtab = np.zeros(rows, np.int64)
    ctab = np.zeros(n, np.int64)
    if ids is None:
        return symbol_bits(K, kmax)[None, :], rtab, ctab
    ids = np.asarray(ids, dtype=np.int64)
    k = int(ids.max()) + 1
    bits = np.empty((k, 2 * kmax + 1))
    for c in range(k):
        part = K[ids == c] if axis == 0 else K[:, ids == c]
        bits[c] = symbol_bits(part, kmax)
    (rtab if axis == 0 else ctab)[:] = ids
    return bits, rtab, ctab


def _rate_arrays(rate, rows: int, n: int):
    bits, rtab, ctab = rate
    bits = np.ascontiguousarray(np.atleast_2d(bits), dtype=np.float64)
    rtab = np.zeros(rows, np.int64) if rtab is None else np.ascontiguousarray(rtab, dtype=np.int64)
    ctab = np.zeros(n, np.int64) if ctab is None else np.ascontiguousarray(ctab, dtype=np.int64)
    if rtab.shape != (rows,) or ctab.shape != (n,) or min(rtab.min(initial=0), ctab.min(initial=0)) < 0 \
            or int(rtab.max(initial=0)) + int(ctab.max(initial=0)) >= len(bits):
        raise ValueError("rate tables do not match the tensor")
    return bits, rtab, ctab


def _row_lambda(row_lambda, rows: int) -> np.ndarray:
    """Per-row λ multipliers as the kernels' float64 array (None: all 1, the plain search)."""
    if row_lambda is None:
        return np.ones(rows, np.float64)
    rl = np.ascontiguousarray(row_lambda, dtype=np.float64)
    if rl.shape != (rows,) or not bool(np.all(np.isfinite(rl))) or (rows and float(rl.min()) < 0):
        raise ValueError(f"row_lambda must be {rows} finite non-negative values")
    return rl


def _states(state: np.ndarray | None, n: int, n_states: int) -> np.ndarray:
    """The per-column entry states as the kernels' int64 array (None: state 0, the top of a column)."""
    if state is None:
        return np.zeros(n, np.int64)
    st = np.asarray(state)
    if st.shape != (n,) or not np.issubdtype(st.dtype, np.integer) or (n and (int(st.min()) < 0 or int(st.max()) >= n_states)):
        raise ValueError(f"trellis states must be {n} integers in [0, {n_states})")
    return np.ascontiguousarray(st, dtype=np.int64)


def tcq_independent(C: np.ndarray, step: float, mid: int, bits: np.ndarray, lam_c: float = LAMBDA_C,
                    rtab: np.ndarray | None = None, ctab: np.ndarray | None = None,
                    state: np.ndarray | None = None, row_lambda: np.ndarray | None = None) -> np.ndarray:
    """Symbols (int32) of a trellis search per column without error feedback. ``bits``: one rate
    table, or several with ``rtab``/``ctab`` (see :func:`class_rate`). ``state``: as
    :func:`gptq_tcq` (the columns' entry states, overwritten with their final states)."""
    trans, qsel = _machine(mid)
    C = np.ascontiguousarray(C)
    bits, rtab, ctab = _rate_arrays((bits, rtab, ctab), *C.shape)
    st = _states(state, C.shape[1], len(trans))
    K = np.empty(C.shape, np.int32)
    launch(_tcq_columns, _tcq_columns_serial, C, float(step), lam_c * step * step, _row_lambda(row_lambda, C.shape[0]),
           bits, rtab, ctab, trans, qsel, st, K)
    if state is not None:
        state[...] = st
    return K


def gptq_tcq(C: torch.Tensor, R: torch.Tensor, perm: torch.Tensor, step: float, mid: int, *,
             lam_c: float = LAMBDA_C, block: int = 128, rate=None,
             state: np.ndarray | None = None, row_lambda: np.ndarray | None = None) -> torch.Tensor:
    """GPTQ (act order, lazy batches: ``gptq.lazy_batches``, R the reverse Cholesky factor of H,
    as :func:`aligncodec.codec.quant.gptq.gptq_ecsq`) with the trellis search of state machine
    ``mid`` per column: tcq symbols k (int32, |k| ≤ MAX_ABS_TCQ_SYMBOL) in the original column
    order. ``rate``: the rate model (bits, rtab, ctab) of :func:`class_rate` (None: the prior
    table of :func:`prior_bits`).

    ``state`` (integer array, one per column, original order; None: all 0): the state each
    column's walk is in when it reaches C's first row, i.e. C is a row chunk of a taller tensor
    and ``state`` the final states of the chunk above it (spec §7.6: the decoder walks each
    column from state 0 at row 0 down to the last row). Each column's search starts there (the
    other start states cost +inf) and ends in its best end state, which is written back into
    ``state``: row chunks coded in order with one such array are the decoder's walk exactly.
    GPTQ's rows are independent given H, so only the trellis state crosses a chunk boundary.

    ``row_lambda`` (float, one per row; None: all 1): row i's rate weight is λ·row_lambda[i] —
    a row whose error matters less (a rare token's embedding row) trades more error for rate.
    The decoder is unchanged (the step is one per tensor)."""
    steps = gptq_tcq_steps(C, R, perm, step, mid, lam_c=lam_c, block=block, rate=rate, state=state, row_lambda=row_lambda)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def gptq_tcq_steps(C: torch.Tensor, R: torch.Tensor, perm: torch.Tensor, step: float, mid: int, *,
                   lam_c: float = LAMBDA_C, block: int = 128, rate=None, state: np.ndarray | None = None,
                   row_lambda: np.ndarray | None = None):
    """:func:`gptq_tcq` as a generator that yields after each lazy batch and returns the symbols.
    A ``state`` that is a C-contiguous int64 array is read and written batch by batch, in place
    (a batch reads and writes its own columns' states only): row chunks of one tensor sharing
    that array may then run batch k of chunk c + 1 as soon as batch k of chunk c is done
    (``parallel.pipeline``), with the symbols of running the chunks one after another.
    Any other ``state`` is copied at the start and written back at the end."""
    from aligncodec.codec.quant.gptq import lazy_batch_steps

    trans, qsel = _machine(mid)
    lam = lam_c * step * step
    rows, n = C.shape
    bits, rtab, ctab = _rate_arrays(rate if rate is not None else (prior_bits(C, step), None, None), rows, n)
    pn = perm.numpy()
    st = _states(state, n, len(trans))
    in_place = state is not None and st is state
    final = st if in_place else st.copy()  # the entry states, overwritten with the end states
    out = np.empty((rows, n), dtype=np.int32)
    cperm = np.ascontiguousarray(ctab[pn])
    rlam = _row_lambda(row_lambda, rows)

    def run_block(W1, U1, i1, i2):
        E1 = np.empty_like(W1)
        Q1 = np.empty_like(W1)
        K1 = np.empty(W1.shape, dtype=np.int32)
        S1 = np.ascontiguousarray(final[pn[i1:i2]])
        launch(_tcq_block, _tcq_block_serial, W1, U1, float(step), lam, rlam, bits, rtab,
               np.ascontiguousarray(cperm[i1:i2]), trans, qsel, S1, K1, Q1, E1)
        out[:, pn[i1:i2]] = K1
        final[pn[i1:i2]] = S1
        return Q1

    yield from lazy_batch_steps(C, R, perm, block, run_block)
    if state is not None and not in_place:
        state[...] = final
    return torch.from_numpy(out)


@numba.njit(cache=True, nogil=True)
def _levels_cols(q, L, trans, qsel, j0, j1):  # pragma: no cover - numba
    """lossy.trellis_levels on columns j0..j1 (each walks its rows from state 0); L may be q."""
    rows = q.shape[0]
    st = np.zeros(j1 - j0, np.int64)
    for i in range(rows):
        for j in range(j0, j1):
            k = np.int64(q[i, j])
            s = st[j - j0]
            lv = 2 * k
            if qsel[s] == 1:
                if k > 0:
                    lv -= 1
                elif k < 0:
                    lv += 1
            L[i, j] = lv
            st[j - j0] = trans[s, k & 1]


def levels(K: np.ndarray, mid: int, out: np.ndarray | None = None, threads: int = 1, init=None) -> np.ndarray:
    """The integer levels of tcq symbols K: the walk of ``lossy.trellis_levels`` (the spec's
    reference form, one numpy step per row) as a GIL-free numba kernel, its columns split over
    ``threads`` (``parallel.run_tasks``; each column's walk is its own): the same integers.
    ``out`` as there (K itself is fine)."""
    from aligncodec.codec import parallel

    trans, qsel = _machine(mid)
    K = np.asarray(K)
    L = np.empty(K.shape, np.int32) if out is None else out
    n = K.shape[1]
    parts = parallel.split_ranges(n, max(1, threads), minimum=64)
    parallel.run_tasks([lambda a=a, b=b: _levels_cols(K, L, trans, qsel, a, b) for a, b in parts], threads, init)
    return L


def tcq_levels(K: np.ndarray, mid: int) -> np.ndarray:
    """Integer levels of symbols K: the decoder's own walk (``lossy.trellis_levels``)."""
    from aligncodec.codec.modes.lossy import trellis_levels

    return trellis_levels(K, mid)
