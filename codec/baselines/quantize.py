"""The baselines' quantisers: one site (the weights that read the same input) with one
method of :mod:`aligncodec.codec.baselines`, its all-in bit count, and the global step
multiplier search (see the package doc)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from aligncodec.codec.baselines import STEP_RULES, Method, auto_sym
from aligncodec.codec.entropy import rans
from aligncodec.codec.quant.gptq import gptq
from aligncodec.codec.quant.grids import ECSQ, FixedGrid, fp16_up, rtn
from aligncodec.codec.quant.rate import secant_search
from aligncodec.codec.transforms import hadamard as _had

__all__ = ["TensorResult", "coded_bits", "quantize_site", "find_multiplier"]

EC_STEP_BITS = 32  # float32 step per tensor
EC_OFFSET_BITS = 32  # symbol offset per tensor


def coded_bits(symbols) -> tuple[int, str]:
    """(bits of the rANS stream for non-negative integer symbols as an archive stores it, "rans")."""
    s = np.asarray(symbols.cpu().numpy() if isinstance(symbols, torch.Tensor) else symbols).ravel()
    if s.size == 0:
        return 0, "empty"
    if s.min() < 0:
        raise ValueError("coded_bits: symbols must be non-negative")
    return int(rans.coded_bits(s.astype(np.int64))), "rans"


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


def _grid_for(method: Method, W_rows: list[torch.Tensor], bits: int | None, mult: float | None, step_rule: str,
              sym: bool | None = None):
    if not method.entropy_coded:
        if bits is None:
            raise ValueError(f"{method.name}: needs bits (code length)")
        return FixedGrid(int(bits), sym=auto_sym(bits) if sym is None else bool(sym))
    if mult is None or not mult > 0:
        raise ValueError(f"{method.name}: needs a positive step multiplier")
    if method.name.startswith("rtn-g128"):
        return ECSQ(group_rel=float(mult))
    if step_rule == "shared":
        return ECSQ(step=float(mult))
    if step_rule == "rms":
        steps = [torch.full((W.shape[0],), float(mult) * float(W.pow(2).mean().sqrt())) for W in W_rows]
        return ECSQ(step=fp16_up(torch.cat(steps)))
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
        res = gptq(Wall, sigma, grid, method.group_size, act_order=act_order, damp=damp)
    else:
        res = rtn(Wall, grid, method.group_size)
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

    x0 = math.log2(c0)
    x, fx, ok = secant_search(f, x0, f(x0), tol=tol, max_iter=max_iter, first_step=1.0, max_jump=4.0)
    if ok:
        return 2.0**x, fx + target, hist
    best = min(hist, key=lambda t: abs(t[1] - target))
    raise RuntimeError(
        f"find_multiplier: no multiplier within {tol} bpw of {target} after {max_iter} steps "
        f"(closest: c={best[0]:.4g} gives {best[1]:.4f} bpw)"
    )
