"""Stage 2: the rate pass and rate control.

**Rate pass** (:func:`rate_pass`): every lossy tensor is read once (memory-mapped), checked for
NaN/Inf, and its rate curve measured on a row subsample: the empirical entropy of
round(W T / Δ) (T the randomized Hadamard when a Hadamard candidate is on) on a grid of steps
(:func:`measure_curve`). Tensors lossy coding cannot serve go lossless here, with the reason:
NaN/Inf (``nonfinite="lossless"``; else :class:`NonFiniteError` naming every such tensor), all
zero, weights beyond the lossy range, an rms off the grid, a target beyond what lossy coding
delivers.

**Rate control** (:class:`RateController`): one absolute weight-domain step Δ for every lossy
tensor (DESIGN.md §6: one global step beat equal-SQNR and sensitivity-weighted allocations; the
mode decision inside each tensor uses λ = 2 ln 2 · D/N), the output head at its own multiple of
it (head.py). Before each block the controller solves
spent + Σ_remaining c_type · B_t(Δ) = budget for Δ, with B_t the rate pass's curve and c_type
the measured ratio of real to predicted bytes for that kind of layer so far (two-pass video rate
control). A distortion target (:class:`DistortionController`) solves the same way for the mean
relative error, from the rate pass's error curves and the measured ratio of real to predicted
error per kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from aligncodec.codec import encoder as E
from aligncodec.codec.modes import lossy

LOG2_GRID = np.arange(-24.0, 6.0 + 1e-9, 0.125)  # log2 of the steps the rate curves are measured at
SAMPLE_VALUES = 1 << 14  # values per tensor in the rate pass


def bisect_boundary(pred, lo: float, hi: float, iters: int = 60) -> tuple[float, float]:
    """[lo, hi] narrowed by bisection to where the monotone ``pred`` (True at lo, False at hi)
    changes: the controllers' step solves."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if pred(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


class OffGridError(ValueError):
    """A finite tensor whose rms puts every useful step outside the rate grid (it goes lossless)."""


@dataclass
class RateCurve:
    """Predicted all-in bytes of one tensor on LOG2_GRID (from a row subsample)."""

    name: str
    kind: str  # controller class: the linear's leaf name (q_proj, ...), "embedding", "lm_head"
    numel: int
    bits: np.ndarray  # bits per weight on LOG2_GRID
    rel: np.ndarray | None = None  # relative squared error of plain rounding on LOG2_GRID (distortion targets)

    def bytes_at(self, x: float) -> float:
        b = float(np.interp(x, LOG2_GRID, self.bits))
        if x < LOG2_GRID[0]:
            b += LOG2_GRID[0] - x
        return self.numel * b / 8 + 512


def measure_curve(name: str, kind: str, W: torch.Tensor, hadamard: bool, seed: int, step_ratio: float = 1.0,
                  with_rel: bool = False) -> RateCurve:
    """Empirical entropy of round(W T / Δ) on a row subsample (≈ SAMPLE_VALUES values), on the
    part of LOG2_GRID where a useful step can lie (rms·2^-10 … rms·2^3); outside it the curve
    continues at 1 bit per halving (fine end) or halves per doubling (coarse end).
    ``step_ratio``: the curve of a quantiser whose step Δ codes like ECSQ at Δ / step_ratio
    (tcq: its registry entry's ``step_ratio``; the controller's measured ratios correct the rest).
    ``with_rel``: also the relative squared error of that rounding on the grid (``RateCurve.rel``),
    which a distortion target's controller predicts from."""
    rows, n = W.shape
    want = max(1, math.ceil(SAMPLE_VALUES / n))
    stride = max(1, rows // want)
    X = W[::stride].to(torch.float64).numpy()
    if hadamard:
        from aligncodec.codec.transforms.hadamard import tensor_seed

        X = lossy.HadamardData.from_seed(n, tensor_seed(seed, f"site:{n}")).apply64(X)
    X = X.reshape(-1)
    rms = float(np.sqrt(np.mean(X * X))) or 1e-30
    centre = math.log2(rms)
    idx = np.where((LOG2_GRID >= centre - 10) & (LOG2_GRID <= centre + 3))[0]
    if len(idx) == 0:
        raise OffGridError(f"tensor {name!r}: rms {rms:g} outside the rate grid")
    bits = np.full(len(LOG2_GRID), np.nan)
    rel = np.full(len(LOG2_GRID), np.nan)
    energy = float(np.mean(X * X)) or 1e-300
    for i in idx[::2]:  # every other grid point, interpolated below
        d = 2.0 ** LOG2_GRID[i] / step_ratio
        q = np.rint(X / d).astype(np.int64)
        lo = int(q.min())
        cnt = np.bincount(q - lo)
        p = cnt[cnt > 0] / q.size
        bits[i] = float(-(p * np.log2(p)).sum())
        if with_rel:
            rel[i] = float(np.mean((X - d * q) ** 2)) / energy
    ok = np.where(~np.isnan(bits))[0]
    bits = np.interp(LOG2_GRID, LOG2_GRID[ok], bits[ok])
    a, b = ok[0], ok[-1]
    bits[:a] = bits[a] + (LOG2_GRID[a] - LOG2_GRID[:a])
    bits[b + 1:] = bits[b] * 0.5 ** (LOG2_GRID[b + 1:] - LOG2_GRID[b])
    if not with_rel:
        return RateCurve(name, kind, rows * n, bits)
    # below the measured range the error falls 4x per halving of the step (D ∝ Δ²); above it, it
    # stays at the coarsest point's (every value rounds to zero: relative error 1)
    rel = np.interp(LOG2_GRID, LOG2_GRID[ok], np.maximum(rel[ok], 1e-300))
    rel[:a] = rel[a] * 4.0 ** (LOG2_GRID[:a] - LOG2_GRID[a])
    rel[b + 1:] = rel[b]
    return RateCurve(name, kind, rows * n, bits, np.maximum.accumulate(rel))


class RateController:
    """Chooses the step for the tensors still to code so the total lands on the budget."""

    def __init__(self, budget: float, curves: dict[str, RateCurve], offsets: dict[str, float] | None = None):
        self.budget = budget
        self.curves = curves
        self.offsets = dict(offsets or {})  # tensor name -> log2 of its step's multiple of the common step
        self.remaining = set(curves)
        self.spent = 0.0
        self.actual: dict[str, float] = {}
        self.predicted: dict[str, float] = {}
        self.steps: list[float] = []

    def ratio(self, kind: str) -> float:
        a = sum(v for k, v in self.actual.items() if k == kind)
        p = sum(v for k, v in self.predicted.items() if k == kind)
        if p > 0:
            return a / p
        a, p = sum(self.actual.values()), sum(self.predicted.values())
        return a / p if p > 0 else 1.0

    def offset(self, name: str) -> float:
        """log2 of the multiple of the common step at which ``name`` is coded."""
        return self.offsets.get(name, 0.0)

    def predict(self, x: float, names) -> float:
        return sum(self.ratio(self.curves[t].kind) * self.curves[t].bytes_at(x + self.offset(t)) for t in names)

    def _aggregate(self, names) -> tuple[np.ndarray, float, float]:
        """The remaining tensors' curves summed once (every curve lives on LOG2_GRID, and
        interpolation is linear): Σ ratio·numel·bits on the grid, Σ ratio·numel, Σ ratio·512."""
        agg = np.zeros(len(LOG2_GRID))
        n_w = fixed = 0.0
        for t in names:
            c = self.curves[t]
            r = self.ratio(c.kind)
            off = self.offsets.get(t, 0.0)
            # the curve at x + off, on the grid (interpolation is linear; beyond the fine end: 1 bit per halving)
            bits = c.bits if off == 0.0 else (np.interp(LOG2_GRID + off, LOG2_GRID, c.bits)
                                              + np.maximum(0.0, LOG2_GRID[0] - (LOG2_GRID + off)))
            agg += (r * c.numel) * bits
            n_w += r * c.numel
            fixed += r * 512
        return agg, n_w, fixed

    @staticmethod
    def _predict_agg(x: float, agg: np.ndarray, n_w: float, fixed: float) -> float:
        b = float(np.interp(x, LOG2_GRID, agg))
        if x < LOG2_GRID[0]:
            b += n_w * (LOG2_GRID[0] - x)
        return b / 8 + fixed

    def solve(self, extra: float = 0.0) -> float:
        """log2 step such that spent + extra + predicted(remaining) = budget."""
        left = self.budget - self.spent - extra
        agg = self._aggregate(sorted(self.remaining))
        lo, hi = -40.0, 12.0
        if self._predict_agg(hi, *agg) > left:
            return hi
        return bisect_boundary(lambda x: self._predict_agg(x, *agg) > left, lo, hi)[1]

    def record(self, name: str, x: float, nbytes: int, rel_err: float | None = None) -> None:
        """``name`` coded at log2 step ``x`` (its own step: the common one plus its offset)."""
        c = self.curves[name]
        self.actual[c.kind] = self.actual.get(c.kind, 0.0) + nbytes
        self.predicted[c.kind] = self.predicted.get(c.kind, 0.0) + c.bytes_at(x)
        self.remaining.discard(name)
        self.spent += nbytes

    def skip(self, name: str, nbytes: int = 0, share: float = 0.0) -> None:
        """``name`` was coded lossless after all: its curve (and the ratio of its kind) take no
        further part; its ``nbytes`` are spent (whole-file scope: they are in the file) or its
        ``share`` of the budget is withdrawn (linear scope: the target counts lossy tensors only)."""
        self.remaining.discard(name)
        self.spent += nbytes
        self.budget -= share

    def restore(self, st: dict) -> None:
        self.spent = st["spent"]
        self.actual = dict(st["actual"])
        self.predicted = dict(st["predicted"])
        self.remaining = set(st["remaining"])
        self.steps = list(st["steps"])
        self.budget = st.get("budget", self.budget)  # lowered by skip() in linear scope

    def state(self) -> dict:
        return {"budget": self.budget, "spent": self.spent, "actual": dict(self.actual), "predicted": dict(self.predicted),
                "remaining": sorted(self.remaining), "steps": list(self.steps)}


# --------------------------------------------------------------------------- calibration pieces


class DistortionController(RateController):
    """Chooses the step for the tensors still to code so that the mean over the lossy tensors of
    the activation-weighted relative error lands on ``target`` (``EncodeOptions.distortion``).
    Predicted error of a tensor at a step: its rate pass's error of plain rounding (``RateCurve.rel``)
    times the ratio of real (GPTQ, Σ-weighted) to predicted error of its kind: from the latest
    probe of that kind (:meth:`probe`: the block's tensors coded on their row subsample at the
    solved step, before the block is coded), else from the tensors coded so far. Bytes are
    recorded as spent (the summary), the budget plays no part."""

    def __init__(self, target: float, curves: dict[str, RateCurve], offsets: dict[str, float] | None = None):
        super().__init__(math.inf, curves, offsets)
        self.target = target
        self.err_done = 0.0
        self.n_done = 0
        self.err_actual: dict[str, float] = {}
        self.err_predicted: dict[str, float] = {}
        self.probed: dict[str, float] = {}  # kind -> ratio of its latest probe

    def probe(self, rel_errs: dict[str, float], x: float) -> None:
        """Relative errors of tensors still to code, estimated on their row subsample at log2
        step ``x``: the ratio to the prediction, per kind, for the next :meth:`solve`."""
        a: dict[str, float] = {}
        p: dict[str, float] = {}
        for nm, r in rel_errs.items():
            k = self.curves[nm].kind
            a[k] = a.get(k, 0.0) + r
            p[k] = p.get(k, 0.0) + self.rel_at(nm, x)
        self.probed.update({k: a[k] / p[k] for k in a if p[k] > 0})

    def err_ratio(self, kind: str) -> float:
        if kind in self.probed:
            return self.probed[kind]
        for a, p in ((self.err_actual.get(kind, 0.0), self.err_predicted.get(kind, 0.0)),
                     (sum(self.err_actual.values()), sum(self.err_predicted.values()))):
            if p > 0:
                return a / p
        return 1.0

    def rel_at(self, name: str, x: float) -> float:
        c = self.curves[name]
        return float(np.interp(x + self.offset(name), LOG2_GRID, c.rel))

    def solve(self, extra: float = 0.0) -> float:
        names = sorted(self.remaining)
        n = self.n_done + len(names)
        if n == 0:
            return 0.0
        ratios = {t: self.err_ratio(self.curves[t].kind) for t in names}

        def mean_err(x: float) -> float:
            return (self.err_done + sum(ratios[t] * self.rel_at(t, x) for t in names)) / n

        lo, hi = float(LOG2_GRID[0]) - 16.0, float(LOG2_GRID[-1])
        if mean_err(hi) <= self.target:
            return hi
        if mean_err(lo) >= self.target:
            return lo
        return bisect_boundary(lambda x: mean_err(x) <= self.target, lo, hi)[0]

    def record(self, name: str, x: float, nbytes: int, rel_err: float | None = None) -> None:
        c = self.curves[name]
        if rel_err is not None:
            self.err_actual[c.kind] = self.err_actual.get(c.kind, 0.0) + rel_err
            self.err_predicted[c.kind] = self.err_predicted.get(c.kind, 0.0) + float(np.interp(x, LOG2_GRID, c.rel))
            self.err_done += rel_err
            self.n_done += 1
        self.remaining.discard(name)
        self.spent += nbytes

    def skip(self, name: str, nbytes: int = 0, share: float = 0.0) -> None:
        """A tensor coded lossless after all: it leaves the mean (as it has no lossy error)."""
        self.remaining.discard(name)
        self.spent += nbytes

    def state(self) -> dict:
        return {**super().state(), "err_done": self.err_done, "n_done": self.n_done,
                "err_actual": dict(self.err_actual), "err_predicted": dict(self.err_predicted), "probed": dict(self.probed)}

    def restore(self, st: dict) -> None:
        super().restore(st)
        self.budget = math.inf
        self.err_done, self.n_done = st["err_done"], st["n_done"]
        self.err_actual, self.err_predicted = dict(st["err_actual"]), dict(st["err_predicted"])
        self.probed = dict(st["probed"])


def rate_pass(run) -> None:
    """Stage 2 on a :class:`~aligncodec.encode.state.Run`: every lossy tensor checked and its
    curve measured (in parallel over tensors); ``run.curves``, ``run.lossless_why`` and the coding
    order (tensors going lossless leave it) are filled in. NonFiniteError before any coding."""
    from aligncodec.codec import parallel
    from aligncodec.encode.blocks import worker_init
    from aligncodec.encode.plan import NonFiniteError

    opts, ckpt = run.opts, run.ckpt
    had = any(c.startswith("hadamard") for c in opts.candidates)
    ratio = run.quantizer.step_ratio
    bad: dict[str, int] = {}

    def rate_one(item):
        """(why the tensor goes lossless or None, its rate curve or None)."""
        nm, kind, _b = item
        t = ckpt.get(nm)
        n_bad = E.count_nonfinite(t)
        if n_bad:
            bad[nm] = n_bad
            return f"{n_bad} NaN/Inf values", None
        if opts.nonfinite == "error" and bad:
            return None, None  # an error follows: no curve needed
        why = E.lossless_reason(t)
        if why is None and opts.beyond_lossy():
            why = f"target {opts.bpw:g} bpw is beyond what lossy coding delivers (< {E.LOSSY_MAX_BPW:g} bpw)"
        curve = None
        if why is None:
            try:
                curve = measure_curve(nm, kind, t, had, opts.seed, ratio, with_rel=opts.distortion is not None)
            except OffGridError as exc:  # finite, but no useful step on the grid
                why = str(exc)
        return why, curve

    rated = parallel.run_tasks([lambda o=o: rate_one(o) for o in run.order], parallel.inner_threads(), worker_init)
    for (nm, _kind, _b), (why, curve) in zip(run.order, rated):
        if curve is not None:
            run.curves[nm] = curve
        if why is not None:
            run.lossless_why[nm] = why
    del rated
    if bad and opts.nonfinite == "error":
        try:
            E.check_finite(bad)
        except E.NonFiniteError as exc:
            raise NonFiniteError(str(exc)) from None
    run.order = [o for o in run.order if o[0] not in run.lossless_why]


def make_controller(run, budget: float, offsets: dict[str, float]) -> RateController:
    """The controller of the run's target: bytes (``bpw``; in linear scope over the block
    linears' curves only) or mean relative error (``distortion``, over every lossy tensor)."""
    opts = run.opts
    if opts.distortion is not None:
        return DistortionController(opts.distortion, run.curves, offsets)
    curves = run.curves if opts.scope == "all" else {n: c for n, c in run.curves.items() if n in run.linear_names}
    return RateController(budget, curves, offsets)
