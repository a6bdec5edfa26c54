"""Baseline weight coders, each with an honest all-in bit count (docs/baselines.md).

Methods (``METHODS``), per linear weight W (out × in):

==================  =========  ========  ====================================
method              basis      rounding  grid
==================  =========  ========  ====================================
rtn                 identity   RTN       B-bit fixed, per row (channel)
rtn-g128            identity   RTN       B-bit fixed, per group of 128 columns
hadamard-rtn        W·H        RTN       B-bit fixed, per row (QuaRot)
gptq                identity   GPTQ      B-bit fixed, per group of 128
hadamard-gptq       W·H        GPTQ      B-bit fixed, per row (QuaRot's path)
<any>-ec            as above   as above  ECSQ, symbols entropy coded
==================  =========  ========  ====================================

H is the seeded randomized Hadamard on the input dimension
(:mod:`aligncodec.codec.transforms.hadamard`), folded: Ŵ = Q(W H) Hᵀ, GPTQ then sees the
rotated second moment Hᵀ Σ H. The group size of any method can be overridden.

Fixed-length methods: ``bits`` is the code length B; the all-in count is
B·weights + per group (fp16 scale + B-bit zero-point if asymmetric) + 32 bits
of rotation seed for rotated tensors. Grid: ``sym=None`` (auto) picks the
stronger one as measured by RTN weight SQNR on four layers of SmolLM2
(layers 0/10/20/29, all 7 linears): symmetric mid-rise at B = 2 (8.77 vs
8.06 dB per channel, 8.91 vs 8.46 dB g128, and fewer side bits), asymmetric
at B ≥ 3 (g128: 14.20 vs 13.98 dB at 3 bits, 20.18 vs 19.55 dB at 4 bits;
per channel within ±0.15 dB).

Entropy-coded (``-ec``) methods use ECSQ (uniform step, unbounded integers, no
clipping) and code each tensor's symbols with the project's rANS
(``aligncodec.codec.entropy.coded_bits``: payload, frequency table and chunk
table). The step is set by one *global multiplier* c for the whole model:

* ``step_rule='shared'`` (default): Δ = c for every tensor — one absolute step
  shared by all tensors, i.e. the same weight-domain noise everywhere; measured to
  beat equal-SQNR allocation for every method (docs/results/2026-11-28-rd.md);
* ``step_rule='rms'``: Δ_t = c · rms(W_t) (equal SQNR per tensor), for comparison;
* ``rtn-g128-ec`` always uses Δ = c · rms(group row) per group of 128 (fp16,
  sent), the ECSQ analogue of a per-group scale.

Side information charged per EC tensor: 32 bits for the step (float32), 32 bits
for the symbol offset (symbols are shifted to start at 0), 16 bits per group
step for rtn-g128-ec, 32 bits of seed if rotated. ``find_multiplier`` finds the
c that meets a target all-in bits per weight over a set of tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from aligncodec.codec.transforms import hadamard as _had
from aligncodec.codec import quant as _q

__all__ = [
    "METHODS",
    "Method",
    "get_method",
    "TensorResult",
    "quantize_site",
    "coded_bits",
    "find_multiplier",
    "STEP_RULES",
]

STEP_RULES = ("shared", "rms")
EC_STEP_BITS = 32  # float32 step per tensor
EC_OFFSET_BITS = 32  # symbol offset per tensor


@dataclass(frozen=True)
class Method:
    name: str
    rotate: bool
    algo: str  # "rtn" | "gptq"
    group_size: int
    entropy_coded: bool

    @property
    def needs_sigma(self) -> bool:
        return self.algo == "gptq"


_BASE = {
    "rtn": (False, "rtn", 0),
    "rtn-g128": (False, "rtn", 128),
    "hadamard-rtn": (True, "rtn", 0),
    "gptq": (False, "gptq", 128),
    "hadamard-gptq": (True, "gptq", 0),
}
METHODS: dict[str, Method] = {}
for _n, (_r, _a, _g) in _BASE.items():
    METHODS[_n] = Method(_n, _r, _a, _g, False)
    METHODS[_n + "-ec"] = Method(_n + "-ec", _r, _a, _g, True)


def get_method(name: str, group_size: int | None = None) -> Method:
    """The method called ``name``, optionally with another group size (0 = per row)."""
    if name not in METHODS:
        raise ValueError(f"unknown baseline method {name!r}; choose from {', '.join(METHODS)}")
    m = METHODS[name]
    if group_size is not None:
        if group_size < 0:
            raise ValueError(f"group size must be >= 0, got {group_size}")
        m = Method(m.name, m.rotate, m.algo, group_size, m.entropy_coded)
    return m


def _standin_coded_bits(symbols: np.ndarray) -> int:
    """Order-0 estimate used until the project's rANS lands: n·H + 16 bits per alphabet symbol."""
    s = np.asarray(symbols).ravel()
    counts = np.bincount(s)
    nz = counts[counts > 0].astype(np.float64)
    h = float(-(nz * np.log2(nz / s.size)).sum())
    return int(math.ceil(h)) + 16 * counts.size


def coded_bits(symbols) -> tuple[int, str]:
    """(bits of the entropy-coded stream for non-negative integer symbols, which coder counted it)."""
    s = np.asarray(symbols.cpu().numpy() if isinstance(symbols, torch.Tensor) else symbols).ravel()
    if s.size == 0:
        return 0, "empty"
    if s.min() < 0:
        raise ValueError("coded_bits: symbols must be non-negative")
    try:
        from aligncodec.codec.entropy import coded_bits as _cb
    except ImportError:
        try:  # the rANS module itself: exact stream size (header, table, chunk table, payload)
            from aligncodec.codec.entropy.rans import coded_bits as _cb
        except ImportError:
            return _standin_coded_bits(s), "stand-in order-0 estimate"
    return int(_cb(s.astype(np.int64))), "rans"


@dataclass
class TensorResult:
    """Reconstruction of one tensor and its all-in bit count, split by kind."""

    name: str
    W_hat: torch.Tensor
    numel: int
    symbol_bits: int
    side_bits: int
    coder: str

    @property
    def bits(self) -> int:
        return self.symbol_bits + self.side_bits

    @property
    def bpw(self) -> float:
        return self.bits / self.numel


def auto_sym(bits: int) -> bool:
    """The stronger fixed grid, measured on SmolLM2's weights (see the module doc): symmetric
    mid-rise at 2 bits, asymmetric with a zero-point from 3 bits on."""
    return int(bits) <= 2


def _grid_for(method: Method, W_rows: list[torch.Tensor], bits: int | None, mult: float | None, step_rule: str,
              sym: bool | None = None):
    if not method.entropy_coded:
        if bits is None:
            raise ValueError(f"{method.name}: needs bits (code length)")
        return _q.FixedGrid(int(bits), sym=auto_sym(bits) if sym is None else bool(sym))
    if mult is None or not mult > 0:
        raise ValueError(f"{method.name}: needs a positive step multiplier")
    if method.name.startswith("rtn-g128"):
        return _q.ECSQ(group_rel=float(mult))
    if step_rule == "shared":
        return _q.ECSQ(step=float(mult))
    if step_rule == "rms":
        steps = [torch.full((W.shape[0],), float(mult) * float(W.pow(2).mean().sqrt())) for W in W_rows]
        return _q.ECSQ(step=_q._fp16(torch.cat(steps)))
    raise ValueError(f"unknown step rule {step_rule!r}; choose from {STEP_RULES}")


def quantize_site(
    weights: dict[str, torch.Tensor],
    method: Method,
    *,
    bits: int | None = None,
    mult: float | None = None,
    sigma: torch.Tensor | None = None,
    seed: int = 0,
    step_rule: str = "shared",
    act_order: bool = False,
    damp: float = 0.01,
    sym: bool | None = None,
) -> list[TensorResult]:
    """Quantise the weights that read the same input (e.g. q, k, v) with one method.

    All weights must have the same input dimension; they share Σ (for GPTQ,
    whose rows are independent given H, they are processed as one stacked
    matrix) and the rotation (seed ``seed``, charged once per tensor). Bits are
    counted per tensor (each tensor has its own frequency table).
    """
    names = list(weights)
    if not names:
        raise ValueError("quantize_site: no weights")
    Ws = [weights[k].detach().to(torch.float32) for k in names]
    n = Ws[0].shape[1]
    if any(W.ndim != 2 or W.shape[1] != n for W in Ws):
        raise ValueError("quantize_site: weights must be 2-D with the same input dimension")
    if method.needs_sigma:
        if sigma is None:
            raise ValueError(f"{method.name}: needs the input second moment Σ (calibration)")
        sigma = sigma.to(torch.float64)
    rh = _had.RandomizedHadamard(n, seed) if method.rotate else None
    Wall = torch.cat(Ws, 0)
    if rh is not None:
        Wall = _had.fold_weight(Wall.double(), rh).float()
        if sigma is not None:
            sigma = _had.rotate_sigma(sigma, rh)
    grid = _grid_for(method, Ws, bits, mult, step_rule, sym)
    if method.algo == "gptq":
        res = _q.gptq(Wall, sigma, grid, method.group_size, act_order=act_order, damp=damp)
    else:
        res = _q.rtn(Wall, grid, method.group_size)
    W_hat = res.W_hat
    if rh is not None:
        W_hat = _had.unfold_weight(W_hat.double(), rh).float()
    out, r0 = [], 0
    for name, W in zip(names, Ws):
        r1 = r0 + W.shape[0]
        rows = W.shape[0]
        n_groups = res.params[0][r0:r1].numel() if res.params else 0
        side = _had.SEED_BITS if rh is not None else 0
        if method.entropy_coded:
            sym = res.symbols[r0:r1]
            sbits, coder = coded_bits((sym - sym.min()).numpy())
            side += EC_STEP_BITS + EC_OFFSET_BITS + n_groups * grid.side_bits_per_group()
        else:
            sbits, coder = rows * n * grid.bits, "fixed-length"
            side += n_groups * grid.side_bits_per_group()
        out.append(TensorResult(name, W_hat[r0:r1].clone(), W.numel(), int(sbits), int(side), coder))
        r0 = r1
    return out


def find_multiplier(
    rate_fn: Callable[[float], float],
    target: float,
    c0: float,
    *,
    tol: float = 0.005,
    max_iter: int = 20,
) -> tuple[float, float, list[tuple[float, float]]]:
    """Find c with rate_fn(c) ≈ target (bits per weight), rate decreasing in c.

    Works in log2 c: a first step assumes slope −1 bit per doubling (the
    high-rate law of ECSQ), then secant steps kept inside a bracket, with
    bisection when a secant step leaves it. Returns (c, rate, history); the
    history lists every (c, rate) evaluated. Stops when |rate − target| ≤ tol.
    """
    if not c0 > 0 or not target > 0:
        raise ValueError("find_multiplier: c0 and target must be positive")
    hist: list[tuple[float, float]] = []

    def f(x):
        r = float(rate_fn(2.0**x))
        hist.append((2.0**x, r))
        return r - target

    lo = hi = None  # lo: x with rate above target (f > 0); hi: rate below target
    x0 = math.log2(c0)
    f0 = f(x0)
    if abs(f0) <= tol:
        return 2.0**x0, f0 + target, hist
    x1 = x0 + f0  # slope -1
    for _ in range(max_iter):
        f1 = f(x1)
        for x, fx in ((x0, f0), (x1, f1)):
            if fx > 0 and (lo is None or x > lo[0]):
                lo = (x, fx)
            if fx < 0 and (hi is None or x < hi[0]):
                hi = (x, fx)
        if abs(f1) <= tol:
            return 2.0**x1, f1 + target, hist
        if f1 != f0:
            xn = x1 - f1 * (x1 - x0) / (f1 - f0)
        else:
            xn = x1 + f1
        if lo is not None and hi is not None and not (lo[0] < xn < hi[0]):
            xn = 0.5 * (lo[0] + hi[0])
        elif lo is None or hi is None:  # not yet bracketed: limit the jump
            xn = x1 + max(-4.0, min(4.0, xn - x1))
        x0, f0, x1 = x1, f1, xn
    best = min(hist, key=lambda t: abs(t[1] - target))
    raise RuntimeError(
        f"find_multiplier: no multiplier within {tol} bpw of {target} after {max_iter} steps "
        f"(closest: c={best[0]:.4g} gives {best[1]:.4f} bpw)"
    )


# --------------------------------------------------------------------------- whole-model transforms
# Methods whose model is first changed by a function-preserving transform (SmoothQuant, KurTail,
# SpinQuant: codec/baselines/smoothquant.py, kurtail.py, spinquant.py register themselves below).
# tools/experiments/baseline.run_baseline calls MODEL_TRANSFORMS[name](model, sigma, method=, bits=, seed=,
# log=, calib_windows=, cache_dir=) -> codec.folding.Prepared before quantising.
MODEL_TRANSFORMS: dict[str, Callable] = {}


def register_method(method: Method, transform: Callable | None = None) -> None:
    """Add a method (and the whole-model transform it needs) to METHODS."""
    METHODS[method.name] = method
    if transform is not None:
        MODEL_TRANSFORMS[method.name] = transform


from aligncodec.codec.baselines import kurtail, smoothquant, spinquant  # noqa: E402,F401  (they register their methods)
