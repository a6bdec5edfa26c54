"""Research prototype (issue 14, lever 1): trellis-coded ("dependent") quantisation along the
rows of one column, as MPEG NNC / VVC dependent quantisation, against today's ECSQ.
Encoder side only; no format change. Run:

    python -m aligncodec.tools.experiments.trellis [--model minilm] [--states 4,8] [--lam 0.05,0.1,0.2]

Quantisers (Δ the step of the union grid):
    Q0: ŵ = 2k·Δ            Q1: ŵ = (2k − sgn k)·Δ
A shift-register state machine of 2 (4 states) or 3 (8 states) bits picks the quantiser by
its top bit; the next state shifts in (parity of k) XOR (the feedback taps). The 4-state
machine with taps {b0} is exactly VVC's table {0→(0,2), 1→(2,0), 2→(1,3), 3→(3,1)}.

Per column j (rows i = 0..out−1, state 0 at row 0) a Viterbi search minimises
    Σ_i (w_ij − ŵ_ij)² + λ · bits(k_ij | table of state_i)
with λ = c·Δ² in weight units for every column (one global step Δ for every column, as the
encoder; inside GPTQ each column's own error is what it quantises), candidates per state: the two nearest levels of its
quantiser and 0. The rate tables are the empirical −log2 frequencies of the previous pass
per *state class* (the quantiser, or each state) and per tensor: pass 0 is plain TCQ (λ = 0),
then ``iters`` passes with λ. Inside GPTQ (``gptq_dq``) each column's trellis runs where the
rounding is and its error is fed to the later columns as usual.

Rate: **real bytes**: each state class's symbols coded by the project's rANS coder
(``lossy._sym_stream``: tables, chunk tables, stream headers) + the tensor's header entry and
params (as ``encoder.code_candidate`` counts them) + 1 byte for the state-machine id. The
ECSQ arm is ``encoder.code_candidate`` itself (identity transform, Σ = I), so both arms are
counted by the same coder. Weight-domain SQNR over all lossy linear weights; bpw at 20 dB
interpolated from a step sweep, as ``rd.weight_domain_curve``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numba
import numpy as np
import torch

from aligncodec import lossy_compress as LC
from aligncodec.codec import encoder as E
from aligncodec.codec.modes import lossy

KMAX = 4096


def machine(n_states: int, taps: int) -> tuple[np.ndarray, np.ndarray]:
    """(trans[S, 2], qsel[S]) of a shift-register trellis: bits b_{m-1}..b_0; next state
    b0' = b1, ..., b_{m-1}' = parity XOR (⊕ of the bits in ``taps``); quantiser = top bit."""
    m = int(round(math.log2(n_states)))
    trans = np.zeros((n_states, 2), np.int64)
    qsel = np.zeros(n_states, np.int64)
    for s in range(n_states):
        fb = bin(s & taps).count("1") & 1
        for p in (0, 1):
            trans[s, p] = (s >> 1) | ((p ^ fb) << (m - 1))
        qsel[s] = (s >> (m - 1)) & 1
    return trans, qsel


@numba.njit(cache=True)
def _recon(q, k):  # pragma: no cover - numba
    if q == 0:
        return 2.0 * k
    if k > 0:
        return 2.0 * k - 1.0
    if k < 0:
        return 2.0 * k + 1.0
    return 0.0


@numba.njit(cache=True)
def viterbi_col(w, cid, ncls, delta, lam, bits, tmap, trans, qsel, out_k, out_s, bk, bs):  # pragma: no cover - numba
    """One column: k (int64) into out_k, the state of each row into out_s."""
    rows = w.shape[0]
    S = trans.shape[0]
    kmax = (bits.shape[1] - 1) // 2
    cost = np.full(S, np.inf)
    cost[0] = 0.0
    newc = np.empty(S)
    cand = np.empty(3, np.int64)
    for i in range(rows):
        newc[:] = np.inf
        t = w[i] / delta
        for s in range(S):
            c0 = cost[s]
            if c0 == np.inf:
                continue
            q = qsel[s]
            if q == 0:
                k0 = np.int64(np.floor(t / 2.0))
                cand[0] = k0
                cand[1] = k0 + 1
            else:
                if t >= 0:
                    k0 = np.int64(np.floor((t + 1.0) / 2.0))
                    cand[0] = k0
                    cand[1] = k0 + 1
                else:
                    k0 = -np.int64(np.floor((-t + 1.0) / 2.0))
                    cand[0] = k0
                    cand[1] = k0 - 1
            cand[2] = 0
            tb = tmap[s] * ncls + cid[i]
            for a in range(3):
                k = cand[a]
                if a == 2 and (cand[0] == 0 or cand[1] == 0):
                    continue
                if k > kmax:
                    k = kmax
                elif k < -kmax:
                    k = -kmax
                e = w[i] - _recon(q, k) * delta
                c = c0 + e * e + lam * bits[tb, k + kmax]
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
    for i in range(rows - 1, -1, -1):
        out_k[i] = bk[i, s]
        p = bs[i, s]
        out_s[i] = p  # the state in which row i was coded
        s = p


@numba.njit(parallel=True, cache=True)
def dq_independent(W, CID, ncls, delta, lam, bits, tmap, trans, qsel, K, ST):  # pragma: no cover - numba
    """Σ = I: columns are independent (no feedback); one Viterbi per column, in parallel."""
    rows, n = W.shape
    S = trans.shape[0]
    for j in numba.prange(n):
        bk = np.empty((rows, S), np.int64)
        bs = np.empty((rows, S), np.int64)
        ok = np.empty(rows, np.int64)
        os_ = np.empty(rows, np.int64)
        viterbi_col(np.ascontiguousarray(W[:, j]), np.ascontiguousarray(CID[:, j]), ncls, delta, lam, bits, tmap, trans,
                    qsel, ok, os_, bk, bs)
        for i in range(rows):
            K[i, j] = ok[i]
            ST[i, j] = os_[i]


@numba.njit(cache=True)
def gptq_dq_block(W1, CID1, ncls, U1, delta, lam, bits, tmap, trans, qsel, K1, ST1, E1):  # pragma: no cover - numba
    """GPTQ's column loop over one block with the trellis where the rounding is."""
    rows, b = W1.shape
    S = trans.shape[0]
    bk = np.empty((rows, S), np.int64)
    bs = np.empty((rows, S), np.int64)
    ok = np.empty(rows, np.int64)
    os_ = np.empty(rows, np.int64)
    col = np.empty(rows)
    cc = np.empty(rows, np.int64)
    for i in range(b):
        for r in range(rows):
            col[r] = W1[r, i]
            cc[r] = CID1[r, i]
        viterbi_col(col, cc, ncls, delta, lam, bits, tmap, trans, qsel, ok, os_, bk, bs)
        for r in range(rows):
            K1[r, i] = ok[r]
            ST1[r, i] = os_[r]
            err = (W1[r, i] - _recon(qsel[os_[r]], ok[r]) * delta) / U1[i, i]
            E1[r, i] = err
            for j in range(i + 1, b):
                W1[r, j] -= err * U1[i, j]


def gptq_dq(C: np.ndarray, CID: np.ndarray, ncls: int, U: np.ndarray, perm: np.ndarray, delta, lam, bits, tmap, trans, qsel,
            block=128):
    """GPTQ (act order, lazy batches, as ``gptq.gptq_ecsq``) with the trellis per column."""
    W = np.ascontiguousarray(C[:, perm]).astype(np.float64)
    CIDp = np.ascontiguousarray(CID[:, perm])
    rows, n = W.shape
    K = np.empty((rows, n), np.int64)
    ST = np.empty((rows, n), np.int64)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = np.ascontiguousarray(W[:, i1:i2])
        E1 = np.empty_like(W1)
        K1 = np.empty(W1.shape, np.int64)
        S1 = np.empty(W1.shape, np.int64)
        gptq_dq_block(W1, np.ascontiguousarray(CIDp[:, i1:i2]), ncls, np.ascontiguousarray(U[i1:i2, i1:i2]), delta, lam, bits, tmap, trans, qsel, K1, S1, E1)
        K[:, i1:i2], ST[:, i1:i2] = K1, S1
        if i2 < n:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    inv = np.argsort(perm)
    return K[:, inv], ST[:, inv]


def recon(K, ST, qsel, delta):
    q = qsel[ST]
    r = np.where(q == 0, 2.0 * K, 2.0 * K - np.sign(K))
    return (r * delta).astype(np.float32)


def tables(K, cls, n_cls, kmax=KMAX):
    """−log2 p per class (add-½ smoothing over each class's seen range, 24 bits outside it)."""
    bits = np.full((n_cls, 2 * kmax + 1), 24.0)
    for c in range(n_cls):
        v = K[cls == c]
        if v.size == 0:
            continue
        lo, hi = int(v.min()), int(v.max())
        cnt = np.bincount(v - lo, minlength=hi - lo + 1).astype(np.float64) + 0.5
        bits[c, lo + kmax: hi + kmax + 1] = -np.log2(cnt / cnt.sum())
    return bits


def real_bytes(name: str, parts: list[np.ndarray], extra_params: int = 1, side: int = 0) -> int:
    streams = [lossy._sym_stream(p, None)[1] for p in parts if p.size]
    if side:
        streams.append(lossy.RawStream(b"\0" * side))
    return lossy.entry_bytes(name, 2, lossy.PARAMS_SIZE + extra_params, lossy.streams_bytes(streams))


def entropy_bytes(parts) -> float:
    tot = 0.0
    for p in parts:
        if p.size:
            cnt = np.bincount(p - p.min()).astype(np.float64)
            nz = cnt[cnt > 0]
            tot += float(-(nz * np.log2(nz / p.size)).sum()) / 8 + 1.2 * len(cnt) + 56
    return tot


def class_ids(K, option):
    """(CID[rows, n], k, side bytes) for a class option (k, axis) of the encoder (lossy.make_classes)."""
    k, axis = option
    k = min(k, K.shape[axis])
    if k <= 1:
        return np.zeros(K.shape, np.int64), 1, 0
    ids = lossy.make_classes(K, k, axis).astype(np.int64)
    CID = np.broadcast_to(ids[:, None] if axis == 0 else ids[None, :], K.shape)
    return np.ascontiguousarray(CID), k, 4 * k + (K.shape[axis] + 1) // 2


def code_trellis(job, delta, c, n_states, taps, table_mode, iters=2, U=None, perm=None, class_options=None):
    """(K, ST, W_hat, bytes) of one tensor. ``table_mode``: 'quantiser' (2 tables), 'state' (S),
    each times the rows/columns classes of the option chosen (by entropy) on the λ = 0 pass."""
    trans, qsel = machine(n_states, taps)
    tmap = {"quantiser": qsel.copy(), "state": np.arange(n_states), "one": np.zeros(n_states, np.int64)}[table_mode]
    n_t = int(tmap.max()) + 1
    W = job.W.numpy().astype(np.float64)
    rows, n = W.shape
    lam0 = c * delta * delta
    opts = class_options or ((1, 0),)

    def run(CID, ncls, lam, bits):
        if U is None:
            K = np.empty((rows, n), np.int64)
            ST = np.empty((rows, n), np.int64)
            dq_independent(np.ascontiguousarray(W), CID, ncls, delta, lam, bits, tmap, trans, qsel, K, ST)
            return K, ST
        return gptq_dq(W, CID, ncls, U, perm, delta, lam, bits, tmap, trans, qsel)

    CID, ncls, side = class_ids(np.zeros((rows, n), np.int64), (1, 0))
    K, ST = run(CID, 1, 0.0, np.zeros((n_t, 2 * KMAX + 1)))
    best = None
    for o in opts:
        cid, k, sd = class_ids(K, o)
        lab = tmap[ST] * k + cid
        est = entropy_bytes([K[lab == t] for t in range(n_t * k)]) + sd
        if best is None or est < best[0]:
            best = (est, cid, k, sd)
    _, CID, ncls, side = best
    for _ in range(iters):
        bits = tables(K, tmap[ST] * ncls + CID, n_t * ncls)
        K, ST = run(CID, ncls, lam0, bits)
    lab = tmap[ST] * ncls + CID
    nbytes = real_bytes(job.name, [K[lab == t] for t in range(n_t * ncls)], side=side)
    return K, ST, recon(K, ST, qsel, delta), nbytes


def sqnr(sig, noise):
    return 10 * math.log10(sig / noise)


def sweep_ecsq(jobs, steps):
    pts = []
    for st in steps:
        nb = noise = 0.0
        for j in jobs:
            tc = E.code_candidate(j, j.cands[0], st)
            nb += tc.bytes_all_in
            noise += tc.noise
        pts.append((st, 8 * nb / sum(j.numel for j in jobs), noise))
    return pts


def sweep_trellis(jobs, deltas, c, n_states, taps, table_mode, iters, class_options=None):
    pts = []
    for d in deltas:
        nb = noise = 0.0
        for j in jobs:
            _, _, Wh, b = code_trellis(j, d, c, n_states, taps, table_mode, iters, class_options=class_options)
            nb += b
            noise += float(((torch.from_numpy(Wh) - j.W).double() ** 2).sum())
        pts.append((d, 8 * nb / sum(j.numel for j in jobs), noise))
    return pts


def at_20db(pts, sig):
    s = [sqnr(sig, p[2]) for p in pts]
    b = [p[1] for p in pts]
    o = np.argsort(s)
    s, b = np.asarray(s)[o], np.asarray(b)[o]
    return float(np.interp(20.0, s, b)) if s[0] <= 20 <= s[-1] else None, list(zip(b.tolist(), s.tolist()))


def gptq_compare(model: str, names_re: str, c: float, n_states: int, taps: int, iters: int, class_options=None) -> dict:
    """Inside GPTQ (calibration Σ, identity candidate): activation-weighted D against real bytes
    per tensor, ECSQ (``encoder.code_candidate``) vs the trellis in the same column loop; the
    bytes the trellis needs at ECSQ's distortion (log-linear interpolation over a step sweep)."""
    import re

    src = LC.resolve_input(model)
    from aligncodec.archive import find_inputs, iter_checkpoint

    names = [n for _f, n, dt, sh, _r in iter_checkpoint(find_inputs(src)) if LC.is_lossy_candidate(n, dt, sh) and re.search(names_re, n)]
    jobs = LC.build_jobs(src, names=names)
    sig, _ = LC.get_sigma(model, "auto")
    LC.attach_sigma(jobs, sig)
    out = {}
    for j in jobs:
        E.build_candidates(j, ("identity",))
        cand = j.cands[0]
        S32 = j.sigma.to(torch.float32)
        rms = float(j.W.double().pow(2).mean().sqrt())
        st3 = rms * math.sqrt(2 * math.pi * math.e) * 2.0 ** -3.0  # ~3 bpw for a Gaussian
        e = [(8 * tc.bytes_all_in / j.numel, tc.dist) for tc in (E.code_candidate(j, cand, st3 * f) for f in (0.8, 1.0, 1.25))]
        t = []
        for f in (0.5, 0.6, 0.72, 0.86):
            _, _, Wh, b = code_trellis(j, st3 * f, c, n_states, taps, "quantiser", iters, U=cand.U.numpy().astype(np.float64),
                                       perm=cand.perm.numpy(), class_options=class_options)
            D = torch.from_numpy(Wh) - j.W
            t.append((8 * b / j.numel, float(((D @ S32) * D).double().sum())))
        e_mid = e[1]
        tb = sorted(t, key=lambda p: p[1])
        bpw_t = float(np.interp(math.log(e_mid[1]), [math.log(p[1]) for p in tb], [p[0] for p in tb]))
        out[j.name] = {"ecsq": e, "trellis": t, "ecsq_bpw": e_mid[0], "trellis_bpw_at_equal_D": bpw_t,
                       "saving_bpw": e_mid[0] - bpw_t}
        print(f"{j.name}: ECSQ {e_mid[0]:.4f} bpw, trellis {bpw_t:.4f} at the same activation-weighted D "
              f"(saves {e_mid[0] - bpw_t:+.4f})", file=sys.stderr)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--states", default="4")
    ap.add_argument("--taps", default="1", help="feedback taps per machine (bit mask), comma list aligned with --states")
    ap.add_argument("--lam", default="0.1", help="λ = c·Δ²: values of c")
    ap.add_argument("--tables", default="quantiser,state")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--classes", default="1", help="'1': state tables only; 'encoder': times the encoder's row/column class options")
    ap.add_argument("--names", default=None, help="regex: only these tensors (quick checks)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--gptq", action="store_true", help="inside GPTQ with the calibration Σ (tensors --names of --model), "
                    "first --states/--taps/--lam only")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    import re

    if a.gptq:
        co = E.CLASS_OPTIONS if a.classes == "encoder" else None
        res = gptq_compare(a.model, a.names or ".", float(a.lam.split(",")[0]), int(a.states.split(",")[0]),
                           int(a.taps.split(",")[0]), a.iters, co)
        print(json.dumps(res, indent=1))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return

    jobs = LC.build_jobs(LC.resolve_input(a.model))
    if a.names:
        jobs = [j for j in jobs if re.search(a.names, j.name)]
    for j in jobs:
        E.build_candidates(j, ("identity",))
    sig = sum(float((j.W.double() ** 2).sum()) for j in jobs)
    N = sum(j.numel for j in jobs)
    rms = math.sqrt(sig / N)
    print(f"{a.model}: {len(jobs)} tensors, {N:,} weights, rms {rms:.4g}", file=sys.stderr)
    out = {"model": a.model, "n_weights": N, "runs": {}}
    # ECSQ: steps around 20 dB (uniform step Δ_e: SQNR ≈ 10 log10(12 rms²/Δ²))
    st20 = rms * math.sqrt(12) * 10 ** (-20 / 20)
    e_pts = sweep_ecsq(jobs, [st20 * f for f in (0.85, 1.0, 1.15)])
    e20, e_curve = at_20db(e_pts, sig)
    out["runs"]["ecsq"] = {"bpw_at_20db": e20, "curve": e_curve}
    print(f"ecsq: {e20:.4f} bpw at 20 dB  {e_curve}  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    taps = [int(x) for x in a.taps.split(",")]
    for si, S in enumerate(int(x) for x in a.states.split(",")):
        tp = taps[min(si, len(taps) - 1)]
        for tm in a.tables.split(","):
            for c in (float(x) for x in a.lam.split(",")):
                # the union-grid step Δ sits near 0.6 × the ECSQ step at equal SQNR
                co = E.CLASS_OPTIONS if a.classes == "encoder" else None
                pts = sweep_trellis(jobs, [st20 * f for f in (0.5, 0.6, 0.72)], c, S, tp, tm, a.iters, co)
                r20, curve = at_20db(pts, sig)
                key = f"dq{S}-taps{tp}-{tm}-c{c:g}-classes{a.classes}"
                out["runs"][key] = {"bpw_at_20db": r20, "curve": curve}
                print(f"{key}: {r20} bpw at 20 dB  {curve}  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
