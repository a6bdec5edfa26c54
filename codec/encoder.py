"""The per-tensor lossy coder: transform choice, GPTQ error feedback with the run's quantiser
(entropy-coded uniform scalar quantisation, ECSQ, or the trellis, codec/quant/registry.py),
exact all-in rate. Pure functions on arrays; the encoder (aligncodec/encode/) decides the step.

Per lossy tensor W (out × in) with input second moment Σ (calibration; identity if
unknown) the encoder tries each *candidate* (a transform T of the input space and
optional per-input-coordinate step scales s_j):

    C  = W T diag(s)⁻¹         quantised by GPTQ with H = 2 diag(s) Tᵀ Σ T diag(s)
    q  = integers, |q| ≤ 32767  (act-order, no groups: nothing else to send)
    Ŵ  = lossy.reconstruct_from(q)   — the decoder's own float32 algorithm

With ``TensorJob.trellis`` ≠ 0 the rounding inside GPTQ is the trellis search of mode 4
``tcq`` (codec/quant/trellis.py, spec §7.6): symbols |k| ≤ 16383 whose levels a state machine
walked down each column gives; params, streams, classes, the mode decision and the step search
are ecsq's, and Ŵ is again lossy.reconstruct_from's (the decoder's level walk included).

and keeps the candidate with the least Lagrangian cost J = D + λ R, with D the
activation-weighted error tr(ΔW Σ ΔWᵀ) and R the exact bits the tensor adds to
the archive (symbols, frequency table, chunk table, stream headers, params,
header entry and alignment). λ = 2 ln 2 · D/N per bit, the local slope of the
tensor's D(R) ∝ 2^(−2R) at the measured distortion (see ``choose``).

Candidates (``CANDIDATES``):

* ``identity``     T = I, s = 1;
* ``hadamard``     T = randomized Hadamard (seeded, sent explicitly), s = 1;
* ``colscale``     T = I, s_j ∝ Σ_jj^(−α) (reverse water-filling on the diagonal
                   of Σ), normalised so that the expected output noise at a
                   given Δ equals that of a uniform step; s sent as float16;
* ``hadamard-colscale`` the same scales on the diagonal of Tᵀ Σ T.

The step Δ is one absolute weight-domain step for every tensor (measured to beat equal-SQNR
allocation: docs/results/2026-11-28-rd.md), chosen by the encoder's rate control
(aligncodec/encode/rate.py).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from aligncodec.codec.modes import lossy
from aligncodec.codec.quant.gptq import gptq_ecsq, hessian_factor
from aligncodec.codec.quant.trellis import LAMBDA_C, class_rate, gptq_tcq_steps
from aligncodec.codec.quant.trellis import levels as trellis_levels
from aligncodec.codec import parallel
from aligncodec.codec.entropy.rans import histogram

CANDIDATES = ("identity", "hadamard", "colscale", "hadamard-colscale")

# --------------------------------------------------------------------------- what lossy coding can do

LOSSY_MAX_BPW = 16.0  # symbols are at most ±MAX_ABS_SYMBOL: ~16 bits is the most they can carry
LOSSY_MAX_ABS = 2.0**64  # larger weights go lossless (float32 GPTQ arithmetic would overflow)


class EncodeError(ValueError):
    """The lossy encoder cannot do what was asked (a named error; see the subclasses)."""


class TargetError(EncodeError):
    """The rate or distortion target is not a finite number in its range."""

    exit_code = 2  # the CLI's exit code (README): a bad command line


class NonFiniteError(EncodeError):
    """A tensor chosen for lossy coding holds NaN or Inf values."""

    exit_code = 3  # the input cannot be used as asked


class EncodeVerifyError(EncodeError):
    """The archive just written does not decode to what the encoder measured."""

    exit_code = 8  # the encoder's own check of its output failed (a bug; the output was not kept)


def check_target(bpw: float | None = None, distortion: float | None = None) -> None:
    """Raise TargetError unless exactly one of ``bpw`` (finite, > 0) or ``distortion``
    (finite, in (0, 1)) is given."""
    if (bpw is None) == (distortion is None):
        raise TargetError("give exactly one of bpw or distortion")
    if bpw is not None and not (isinstance(bpw, (int, float)) and math.isfinite(bpw) and bpw > 0):
        raise TargetError(f"bpw must be a positive finite number, got {bpw}")
    if distortion is not None and not (isinstance(distortion, (int, float)) and 0 < distortion < 1):
        raise TargetError(f"distortion must be in (0, 1), got {distortion}")


def count_nonfinite(W) -> int:
    """Number of NaN/Inf entries of a tensor or array."""
    t = W if isinstance(W, torch.Tensor) else torch.from_numpy(np.asarray(W))
    if not t.is_floating_point():
        return 0
    return int(t.numel() - int(torch.isfinite(t).sum()))


def check_finite(tensors, *, limit: int = 5) -> None:
    """``tensors``: (name, tensor) pairs (or a {name: count of non-finite values} dict).
    Raise NonFiniteError naming every tensor with NaN/Inf and how many (the first ``limit``)."""
    counts = tensors if isinstance(tensors, dict) else {n: count_nonfinite(W) for n, W in tensors}
    bad = [(n, c) for n, c in counts.items() if c]
    if bad:
        shown = ", ".join(f"{n!r} ({c} NaN/Inf)" for n, c in bad[:limit]) + (f" and {len(bad) - limit} more" if len(bad) > limit else "")
        raise NonFiniteError(f"{len(bad)} tensor(s) hold NaN or Inf values: {shown}; "
                             "lossy coding needs finite weights (--nonfinite lossless codes such tensors losslessly)")


def lossless_reason(W) -> str | None:
    """Why a finite tensor cannot be coded lossy (it then goes to the lossless mode), or None:
    all zero (nothing to quantise: no step exists) or weights beyond ±LOSSY_MAX_ABS."""
    t = W if isinstance(W, torch.Tensor) else torch.from_numpy(np.asarray(W))
    if t.numel() == 0:
        return "empty"
    amax = float(t.abs().max())
    if not math.isfinite(amax):
        return "holds NaN or Inf"
    if amax == 0:
        return "all zero"
    if amax > LOSSY_MAX_ABS:
        return f"weights up to {amax:.3g}, beyond the lossy range ±{LOSSY_MAX_ABS:.3g}"
    return None


def unfit_reason(code: "TensorCode", job: "TensorJob") -> str | None:
    """Why a coded tensor must not be written lossy (the rate asked is beyond what lossy coding
    can deliver for it), or None: symbols clamped at ±MAX_ABS_SYMBOL (weights would be cut),
    a step that is not a normal float32 (underflow), or a non-finite error."""
    cand = next((c for c in job.cands if c.kind == code.kind), None)
    with np.errstate(all="ignore"):
        steps = np.atleast_1d(lossy.column_steps(code.params, cand.scales if cand is not None else None))
    if code.saturated:
        qmax = lossy.MAX_ABS_TCQ_SYMBOL if code.params.trellis else lossy.MAX_ABS_SYMBOL
        return f"the step {code.params.step:.3g} needs symbols beyond ±{qmax}"
    if not (np.all(np.isfinite(steps)) and float(np.min(steps)) >= float(np.finfo(np.float32).tiny)):
        return f"the step {code.params.step:.3g} underflows float32"
    if not (math.isfinite(code.dist) and math.isfinite(code.noise)):
        return "the coding error is not finite"
    return None
DEFAULT_CANDIDATES = ("hadamard", "colscale")
# (tcq λ factor, tcq rate passes, class-map refinement) by domain. Calibrated (GPTQ): as measured
# for SmolLM2 (docs/results/2026-11-30-tcq.md). Weight domain (Σ = I, no GPTQ feedback, the search
# is cheap): measured on MiniLM fp32 (docs/results/2026-11-30-tcq.md, "Weight-domain tuning").
CALIBRATED_SETTINGS = (LAMBDA_C, 0, False)
WEIGHT_DOMAIN_SETTINGS = (0.35, 1, True)
SCALE_MIN, SCALE_MAX = 2.0**-14, 2.0**15


@dataclass
class Candidate:
    """A prepared (transform, scales) choice for one tensor; the Cholesky factor is shared
    by tensors that read the same input."""

    kind: str
    transform: int
    hd: lossy.HadamardData | None
    scales: np.ndarray | None  # float32 values exactly representable in float16
    C: torch.Tensor  # W T diag(s)^-1, float32
    R: torch.Tensor  # reverse Cholesky factor of the damped H (H = R Rᵀ, R upper), in act order, float32
    perm: torch.Tensor  # act order


@dataclass
class TensorCode:
    """The chosen coding of one tensor at one step."""

    name: str
    kind: str
    params: lossy.EcsqParams
    streams: list
    W_hat: np.ndarray  # float32, what the decoder reconstructs (after the dtype cast)
    bytes_all_in: int
    dist: float  # tr(ΔW Σ ΔWᵀ)
    rel_err: float  # dist / tr(W Σ Wᵀ)
    sqnr_db: float  # weight-domain SQNR
    noise: float = math.nan  # ‖W − Ŵ‖², weight domain (what verify_lossy checks the archive against)
    saturated: bool = False  # some symbol was clamped at ±MAX_ABS_SYMBOL


@dataclass
class TensorJob:
    name: str
    W: torch.Tensor  # float32 (out × in)
    dtype: str
    sigma: torch.Tensor | None  # (in × in), float64 (or float32), None → identity
    cands: list[Candidate] = field(default_factory=list)
    energy: float | None = None  # tr(W Σ Wᵀ); None: build_candidates computes it
    sig_mean: float = 1.0  # mean diag Σ
    trellis: int = 0  # 0: mode 2 ecsq; else mode 4 tcq with this state machine (lossy.TRELLIS_MACHINES)
    # encoder settings; None: the default of the job's domain (``settings``)
    tcq_lambda: float | None = None  # tcq: λ = c·Δ² of the trellis search
    tcq_passes: int | None = None  # tcq: searches again with the previous pass's class tables
    refine_classes: bool | None = None  # class maps refined by lossy.refine_classes
    # tcq: per-row multipliers of the trellis search's λ (None: all 1). A row whose error matters
    # less (a rare token's row of an embedding / output head) trades more error for rate; the
    # step, and so the format, is unchanged
    row_lambda: np.ndarray | None = None

    def settings(self) -> tuple[float, int, bool]:
        """(tcq λ factor, tcq rate passes, class refinement): the fields, or where None the
        defaults of the job's domain: calibrated (Σ given, GPTQ feedback) or the weight domain
        (Σ = I, no calibration; WEIGHT_DOMAIN_SETTINGS)."""
        d = WEIGHT_DOMAIN_SETTINGS if self.sigma is None else CALIBRATED_SETTINGS
        return (d[0] if self.tcq_lambda is None else self.tcq_lambda, d[1] if self.tcq_passes is None else self.tcq_passes,
                d[2] if self.refine_classes is None else self.refine_classes)

    @property
    def numel(self) -> int:
        return self.W.numel()


# --------------------------------------------------------------------------- candidates

CHUNK_ROWS = 8192  # float64 temporaries and error sums of larger tensors are worked one row chunk at a time


TRANSFORM_ROWS = 1024  # rows of Σ transformed at a time when building Tᵀ Σ T


def row_chunks(rows: int, chunk: int | None = None) -> list[slice]:
    """Row slices of at most ``chunk`` (default CHUNK_ROWS) rows (one slice for a tensor that
    small: its sums are then the plain whole-tensor expressions, bit for bit)."""
    chunk = chunk or CHUNK_ROWS
    return [slice(a, min(a + chunk, rows)) for a in range(0, max(rows, 1), chunk)]



def col_scales(diag: torch.Tensor, alpha: float) -> np.ndarray:
    """s_j ∝ diag_j^(−α), normalised so that Σ_j s_j² diag_j = Σ_j diag_j (same expected output
    noise as a uniform step), clamped and rounded to float16."""
    d = diag.to(torch.float64).clamp_min(1e-12 * float(diag.max().clamp_min(1e-30)))
    s = d.pow(-alpha)
    s = s * torch.sqrt(d.sum() / (s * s * d).sum())
    s = s.clamp(SCALE_MIN, SCALE_MAX)
    return s.numpy().astype(np.float16).astype(np.float32)


def symmetrize_(M: torch.Tensor, tile: int = 1024) -> torch.Tensor:
    """M ← (M + Mᵀ)/2 in place, one pair of tiles at a time (the same bits as the expression,
    without its two n × n temporaries). Returns M."""
    n = M.shape[0]
    for a in range(0, n, tile):
        for b in range(a, n, tile):
            X = M[a:a + tile, b:b + tile]
            avg = (X + M[b:b + tile, a:a + tile].T) / 2
            X.copy_(avg)
            M[b:b + tile, a:a + tile].copy_(avg.T)
    return M


SIGMA_BLOCK = 1024  # rows of a float64 Σ converted to float32 at a time by sigma_quad


def sigma_quad(D: torch.Tensor, S: torch.Tensor, block: int = SIGMA_BLOCK) -> float:
    """Σ_ij (D Σ Dᵀ)_ii = sum((D @ Σ) * D), float32 products summed in float64, for float32 rows
    D. A float64 Σ is converted to float32 ``block`` rows at a time (no float32 copy of a wide Σ
    beside it: 0.27 GB at n = 8,192); at n ≤ ``block`` it is the plain expression."""
    n = S.shape[0]
    if S.dtype == torch.float32 or n <= block:
        return float(((D @ S.to(torch.float32)) * D).double().sum())
    P = torch.zeros(D.shape, dtype=torch.float32)
    for a in range(0, n, block):
        P.addmm_(D[:, a:a + block], S[a:a + block].to(torch.float32))
    return float((P * D).double().sum())


def rotate_sigma(S: np.ndarray, hd: "lossy.HadamardData") -> np.ndarray:
    """Tᵀ Σ T (float64, symmetric) of Σ (float32 or float64) by two passes of fast transforms, one
    row chunk of TRANSFORM_ROWS at a time (rows transform independently: the same bits in any
    chunking), so that a wide input holds Σ, Σ T and the result, not the transforms' temporaries.
    Float64 throughout: the rotation spreads a massive-activation channel's energy over every
    entry, and float32 storage of the result then buries the other channels' structure in its
    rounding (Gemma-3-270M at 3.0 bpw: KLD 0.2766 → 0.2927 with Σ T and Tᵀ Σ T stored in float32)."""
    n = S.shape[0]
    A = np.empty((n, n), np.float64)
    for r in row_chunks(n, TRANSFORM_ROWS):
        A[r] = hd.apply64(S[r])  # Σ T
    St = np.empty((n, n), np.float64)
    for r in row_chunks(n, TRANSFORM_ROWS):
        St[r] = hd.apply64(np.ascontiguousarray(A[:, r].T))  # rows of (Σ T)ᵀ T = Tᵀ Σ T (Σ symmetric)
    del A
    return symmetrize_(torch.from_numpy(St)).numpy()


def candidate_rows(W: torch.Tensor, hd: "lossy.HadamardData | None", sc: np.ndarray | None) -> torch.Tensor:
    """C = W T diag(s)⁻¹ for some rows of W (float64 work, float32 result; row by row the same
    bits whatever rows are passed together)."""
    W64 = W.to(torch.float64)
    Cm = torch.from_numpy(hd.apply64(W64.numpy())) if hd is not None else W64
    if sc is not None:
        Cm = Cm / torch.from_numpy(sc.astype(np.float64))[None, :]
    return Cm.to(torch.float32)


class RowView:
    """Rows of a large (out × in) float32 matrix produced on demand by ``fetch(slice)`` (a slice
    of the underlying rows, contiguous or strided), for a tensor too large to hold in float32
    several times over. Indexing follows what the encoder does with its matrices: ``v[::k]``
    (no start, no stop) is another view; ``v[a:b]`` returns those rows as a tensor;
    ``v.rows(slice)`` fetches underlying rows directly."""

    def __init__(self, fetch: Callable[[slice], torch.Tensor], shape: tuple[int, int], index: range | None = None):
        self.fetch = fetch
        self.index = range(shape[0]) if index is None else index
        self.shape = (len(self.index), shape[1])

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def rows(self, s: slice) -> torch.Tensor:
        sub = self.index[s]
        return self.fetch(slice(sub.start, sub.stop, sub.step)) if len(sub) else torch.empty((0, self.shape[1]))

    def __getitem__(self, s):
        if not isinstance(s, slice):
            raise TypeError("RowView: row slices only")
        if s.start is None and s.stop is None:
            return self if s.step in (None, 1) else RowView(self.fetch, self.shape, self.index[s])
        return self.rows(s)


def _factor_lock(cache: dict, key) -> threading.Lock:
    """The lock under which ``cache[key]`` is computed (stored in the cache itself: the stream
    encoder codes the tensors of one input site in parallel threads, which then wait for the
    first one's factor instead of computing it again)."""
    return cache.setdefault(("lock", key), threading.Lock())


def build_candidates(job: TensorJob, kinds=DEFAULT_CANDIDATES, *, alpha: float = 0.5, seed: int = 0, damp: float = 0.01,
            cache: dict | None = None, lazy: bool = False) -> None:
    """Build the job's candidates (transform, scales, factor). ``cache`` shares the Cholesky
    factors between tensors with the same Σ object (q, k, v; gate, up). ``lazy`` (``job.W`` a
    :class:`RowView`): each candidate's C is a RowView too, its rows computed when coded."""
    from aligncodec.codec.transforms.hadamard import tensor_seed

    n = job.W.shape[1]
    # Σ (read-only: shared by the tensors of one input site) as given (the stream encoder's is
    # float64); each candidate's rotated Σ, H and Cholesky factor are float64 (see rotate_sigma)
    S = job.sigma
    job.sig_mean = float(torch.diag(S).to(torch.float64).mean()) if S is not None else 1.0
    if job.energy is None:  # tr(W Σ Wᵀ), unless the caller measured it (stream encoder: from the forward pass)
        job.energy = 0.0
        for r in row_chunks(job.W.shape[0]):  # one chunk (the plain expression) unless the tensor is large
            W32 = job.W[r].to(torch.float32)
            if S is not None:
                job.energy += sigma_quad(W32, S)
            else:
                W64 = W32.to(torch.float64)
                job.energy += float((W64 * W64).sum())
        del W32
    cache = {} if cache is None else cache
    job.cands = []
    for kind in kinds:
        if kind not in CANDIDATES:
            raise ValueError(f"unknown candidate {kind!r}; choose from {', '.join(CANDIDATES)}")
        had = kind.startswith("hadamard")
        key_s = id(job.sigma) if job.sigma is not None else ("I", n)
        if had:
            # one rotation per input site (the Σ shared by q, k, v) keeps the factor shareable
            hseed = tensor_seed(seed, f"site:{key_s if job.sigma is None else n}")
            key = (key_s, kind, hseed, alpha)
            hd = lossy.HadamardData.from_seed(n, hseed)
        else:
            key = (key_s, kind, alpha)
            hd = None
        with _factor_lock(cache, key):  # tensors coded in parallel threads: one factorisation per key
            if key not in cache:
                if S is None:  # Tᵀ I T = I, taken as exact
                    St = torch.eye(n, dtype=torch.float64)
                elif had:  # Tᵀ Σ T by two fast transforms
                    St = torch.from_numpy(rotate_sigma(S.numpy(), hd))
                else:  # Σ itself: one float64 copy (H is built in place in it)
                    St = S.to(torch.float64, copy=True)
                sc = col_scales(torch.diag(St), alpha) if kind.endswith("colscale") else None
                # H = 2·diag(sc)·St·diag(sc), built in place in this candidate's own float64 array
                Hm = St
                del St
                if sc is not None:
                    v = torch.from_numpy(sc).to(Hm.dtype)
                    Hm.mul_(v[:, None]).mul_(v[None, :])
                box = [Hm.mul_(2)]  # hessian_factor takes the only reference
                del Hm
                R, perm, _ = hessian_factor(box, damp, act_order=True, factor="reverse", dtype=torch.float32)
                cache[key] = (sc, R, perm)
        sc, R, perm = cache[key]
        if lazy:  # rows computed when read (a large tensor: no full float32 copy per candidate)
            C = RowView(lambda sl, W=job.W, hd=hd, sc=sc: candidate_rows(W.rows(sl), hd, sc), job.W.shape)
        else:
            C = torch.empty(job.W.shape, dtype=torch.float32)
            for r in row_chunks(job.W.shape[0]):  # float64 work one row chunk at a time
                C[r] = candidate_rows(job.W[r], hd, sc)
        job.cands.append(Candidate(kind, lossy.TRANSFORM_HADAMARD if had else lossy.TRANSFORM_IDENTITY, hd, sc,
                                   C, R, perm))


# --------------------------------------------------------------------------- coding one tensor


def _thread_init():
    """What a thread started for this one's fan-out runs first: this thread's numba thread count
    (numba's is per thread; one thread selects the kernels' serial twins, rans.launch)."""
    import numba

    n = numba.get_num_threads()
    return lambda: numba.set_num_threads(n)


# symbol classes tried per tensor (k, axis): each class has its own frequency table (spec §7.4)
CLASS_OPTIONS = ((1, 0), (4, 0), (8, 0), (4, 1), (8, 1), (16, 1))


def code_candidate(job: TensorJob, cand: Candidate, step: float, stride: int = 1,
                   class_options=None, keep_w_hat: bool = True) -> TensorCode:
    """Code the tensor with one candidate at one step. ``stride`` > 1 codes every stride-th row
    only (GPTQ rows are independent given H) and returns *estimates* for the whole tensor:
    bytes = exact bytes of the subsample + the symbol payload scaled up; distortion scaled up.
    GPTQ runs one row chunk at a time (the same symbols; tcq: each column's trellis state carried
    from chunk to chunk). ``keep_w_hat=False``: the reconstruction is measured chunk by chunk
    and not kept (``W_hat`` None)."""
    rows = job.W.shape[0]
    sl = slice(None) if stride <= 1 else slice(0, None, stride)
    Wt = job.W[sl]
    Ct = cand.C[sl]
    # int16 symbols: ecsq's |q| ≤ MAX_ABS_SYMBOL = 32767 and tcq's levels |2k − sgn k| ≤ 32766 fit;
    # half the memory of int32 (a 3B model's embedding: 394 M symbols, 0.8 GB instead of 1.6)
    q = np.empty(Wt.shape, dtype=np.int16)
    f = rows / q.shape[0]
    # GPTQ rows are independent given H: the same symbols in row chunks. tcq's state machine
    # walks every row of a column (spec §7.6): its row chunks are searched in order, each column
    # entering a chunk in the final state of the chunk above (the decoder's walk exactly; a
    # search restarted at state 0 per chunk chose symbols for a state the decoder does not have:
    # SmolLM2's 49,152-row embedding decoded with 1.8x the error the encoder measured).
    chunks = row_chunks(q.shape[0])
    lam_c, passes, refine = job.settings()
    # the row chunks of a tall tensor run on the threads the caller allows (parallel.inner_threads:
    # the stream encoder's scheduling thread; 1 elsewhere), each chunk's arithmetic unchanged
    threads, init = parallel.inner_threads(), _thread_init()

    rl = None if job.row_lambda is None else np.asarray(job.row_lambda, dtype=np.float64)[sl]

    def tcq_search(rate=None):
        state = np.zeros(q.shape[1], np.int64)  # row 0 of every column: state 0

        def plan(r):
            rr = None if rate is None else (rate[0], rate[1][r], rate[2])
            k = yield from gptq_tcq_steps(Ct[r], cand.R, cand.perm, step, job.trellis, lam_c=lam_c, rate=rr, state=state,
                                          row_lambda=None if rl is None else rl[r])
            q[r] = k.numpy()

        # chunk c's batch k after chunk c − 1's (the trellis states it enters in): a wavefront
        parallel.pipeline([lambda r=r: plan(r) for r in chunks], threads, init)

    if job.trellis:  # mode 4: the trellis search per column inside GPTQ (codec/quant/trellis.py)
        tcq_search()
        # search again, each symbol priced by its class's table of the previous pass (the
        # classes chosen as below): the rate the format's class streams will charge
        for _ in range(passes):
            cls = choose_classes(q, f, class_options, refine, threads, init)
            ids = None if cls[0] == 1 else (cls[2] if len(cls) > 2 else lossy.make_classes(q, *cls))
            tcq_search(class_rate(q, ids, cls[1]))  # the tables are taken before q is overwritten
    else:
        def ecsq_chunk(r):
            q[r] = gptq_ecsq(Ct[r], cand.R, cand.perm, step, maxq=lossy.MAX_ABS_SYMBOL).numpy()

        parallel.run_tasks([lambda r=r: ecsq_chunk(r) for r in chunks], threads, init)
    del Ct
    qmax = lossy.MAX_ABS_TCQ_SYMBOL if job.trellis else lossy.MAX_ABS_SYMBOL
    saturated = bool(q.size) and max(int(q.max()), -int(q.min())) >= qmax
    base = lossy.EcsqParams(cand.transform, step, 0, lossy.FLAG_COL_SCALES if cand.scales is not None else 0,
                            cand.hd.m if cand.hd is not None else 0, trellis=job.trellis)
    best_cls = choose_classes(q, f, class_options, refine, threads, init)
    params, streams = lossy.encode_symbols(q, base, cand.scales, cand.hd, classes=best_cls)
    nbytes = lossy.entry_bytes(job.name, 2, lossy.PARAMS_SIZE, lossy.streams_bytes(streams))
    if stride > 1:  # whole-tensor estimate: the symbol payload scales with the rows
        nbytes += (f - 1) * sum(len(x.payload) for x in streams[: params.n_classes])
    W_hat = np.empty(q.shape, dtype=np.float32) if keep_w_hat else None
    S = job.sigma
    d = sig = noise = 0.0
    rparams = params
    if job.trellis:  # tcq: the levels of each column's whole walk first (int32, in place), then row chunks as ecsq's
        trellis_levels(q, job.trellis, out=q, threads=threads, init=init)  # lossy.trellis_levels' walk, in numba
        rparams = dataclasses.replace(params, trellis=0)

    def measure(r):  # one chunk (the plain expressions) unless the tensor is large
        # element-wise float32 work: the same bits in row chunks
        Wh = lossy.rounded_f32(lossy.reconstruct_from(rparams, q[r], cand.scales, cand.hd), job.dtype)
        if W_hat is not None:
            W_hat[r] = Wh
        Wr = Wt[r]
        D = torch.from_numpy(Wh) - Wr
        D64 = D.double()
        return (sigma_quad(D, S) if S is not None else float((D64 ** 2).sum()), float((Wr.double() ** 2).sum()),
                float((D64 ** 2).sum()))

    # the chunks on the caller's threads; their sums added in chunk order (the bits of one thread)
    for dc, sc_, nc in parallel.run_tasks([lambda r=r: measure(r) for r in row_chunks(q.shape[0])], threads, init):
        d += dc
        sig += sc_
        noise += nc
    del q
    nbytes = int(round(nbytes))
    sqnr = 10 * math.log10(sig / noise) if noise > 0 and sig > 0 else (math.inf if noise == 0 else -math.inf)
    if stride > 1:
        d *= f
        noise *= f
        W_hat, streams = None, []
    return TensorCode(job.name, cand.kind, params, streams, W_hat, nbytes, d, d / max(job.energy, 1e-300),
                      sqnr, noise, saturated)


def choose_classes(q: np.ndarray, f: float = 1.0, class_options=None, refine: bool = False, threads: int = 1,
                   init=None) -> tuple:
    """The symbol classes of the least order-0 estimate (entropy + table + stream headers + class
    map, the symbol part scaled by ``f`` for a subsample): (k, axis) with the class map of
    ``lossy.make_classes``, or with ``refine`` (k, axis, ids), each option's map refined by
    ``lossy.refine_classes`` before it is estimated. rANS table fitting is the slow part, so only
    the chosen option is coded for real. The options are estimated on up to ``threads`` threads
    (``parallel.run_tasks``), the least taken in option order (the first of equal ones)."""

    def estimate(cls):
        k, axis = cls
        k = min(k, q.shape[axis])
        ids = None
        if k > 1:
            ids = lossy.make_classes(q, k, axis)
            if refine:
                ids = lossy.refine_classes(q, ids, axis)
                k = int(ids.max()) + 1
        parts = [q.reshape(-1)] if k == 1 else lossy.ClassMap(ids, []).split(q, axis, k)  # (one class at a time)
        est = 0.0 if k == 1 else 4 * k + (q.shape[axis] + 1) / 2 + 8
        for part in parts:
            cnt = histogram(part, int(part.min()), int(part.max()))
            nz = cnt[cnt > 0].astype(np.float64)
            est += f * float(-(nz * np.log2(nz / part.size)).sum()) / 8 + 1.2 * len(cnt) + 56
        return ((k, axis, ids) if refine and k > 1 else (k, axis)), est

    best_cls, best_est = (1, 0), math.inf
    options = list(class_options if class_options is not None else CLASS_OPTIONS)
    for cls, est in parallel.run_tasks([lambda c=c: estimate(c) for c in options], threads, init):
        if est < best_est:
            best_cls, best_est = cls, est
    return best_cls


def choose(job: TensorJob, step: float, stride: int = 1) -> tuple[Candidate, TensorCode]:
    """The candidate with the least J = D + λR at this step.

    λ is the local slope of the tensor's operational D(R): for ECSQ, D ∝ 2^(−2R) per
    weight, so −dD/dR_bits = 2 ln 2 · D / N, with D the *measured* distortion (the least
    over the candidates). A slope from Δ²/12 would ignore GPTQ's noise shaping, which
    lowers the output error well below Δ²/12 per weight, and over-reward rate savings."""
    codes = [(cand, code_candidate(job, cand, step, stride)) for cand in job.cands]
    lam = 2 * math.log(2) * min(tc.dist for _, tc in codes) / job.numel
    return min(codes, key=lambda ct: ct[1].dist + lam * 8 * ct[1].bytes_all_in)


def stride_for(rows: int, sample_rows: int) -> int:
    return max(1, rows // max(1, sample_rows))
