"""Quantiser grids for weight matrices (RTN and the grids GPTQ uses: :mod:`.gptq`).

All functions take a weight matrix W (out × in, "rows × columns"; a linear
layer computes y = W x) and return a :class:`QuantResult` holding the
reconstruction, the integer symbols and the side information a decoder needs.
Pure torch, no file I/O.

Two kinds of quantiser grid (the ``grid`` argument):

* :class:`FixedGrid` — fixed-length B-bit codes. Asymmetric by default:
  levels q ∈ {0 … 2^B−1}, w ≈ s·(q − z) with one fp16 scale s and one B-bit
  integer zero-point z per group (a row, or 128 consecutive columns of a row).
  The range [min, max] of the group is widened to contain 0 (as in GPTQ) and,
  with ``clip=True`` (default), shrunk by the factor in {1, 0.975, …, 0.2}
  that minimises the group's squared error (GPTQ's ``mse`` option; it makes
  RTN a much stronger baseline at 2–3 bits). Symmetric (``sym=True``): a
  mid-rise grid, z fixed at (2^B−1)/2 and not sent, s = 2·max|w| / (2^B − 1),
  levels ±s/2, ±3s/2, … up to ±max|w| (0 is not a level). Which is stronger
  depends on B (symmetric at 2 bits, asymmetric from 3 bits on SmolLM2; see
  ``aligncodec.codec.baselines.auto_sym``); the scale is rounded up to fp16
  *before* use so the reconstruction is exactly what a decoder gets.
* :class:`ECSQ` — entropy-coded scalar quantisation: w ≈ Δ·q with q an
  unbounded integer, no clipping, meant to be entropy coded. Δ is a scalar, a
  per-row tensor, or, with ``group_rel``, Δ = group_rel · rms(group) per group
  (fp16, sent as side information).

GPTQ (Frantar et al., 2023) follows the reference algorithm: H = 2Σ, dead
inputs (H_jj = 0) zeroed, damping ``damp``·mean(diag H), the upper Cholesky
factor of H⁻¹, block-wise lazy batch updates, group parameters computed on the
fly from the partially updated weights when a group starts. With
``act_order`` the columns are processed in order of decreasing H_jj; groups
then stay the contiguous original column groups and their parameters are
computed up front from the original weights ("static groups"), so a decoder
needs no permutation or group index — no extra side information.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["FixedGrid", "ECSQ", "QuantResult", "rtn", "fixed_length_bits", "fp16_up", "CLIP_FACTORS"]

CLIP_FACTORS = torch.linspace(1.0, 0.2, 33).tolist()  # shrink factors tried by the clip search
SCALE_BITS = 16  # fp16 scale / step per group


def fp16_up(x: torch.Tensor) -> torch.Tensor:
    """Round *up* to the next fp16 value (what a decoder reads), positive and finite.

    Rounding up keeps a grid built from a range covering that range, so RTN's
    error stays within half a step for every entry that is not clipped.
    """
    x = x.clamp(6e-8, 65000.0)  # fp16 subnormals included
    h = x.to(torch.float16)
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.to(x.dtype) < x, up, h).to(x.dtype)


@dataclass(frozen=True)
class FixedGrid:
    """B-bit uniform grid, asymmetric (default) or symmetric, optional MSE clip search."""

    bits: int
    sym: bool = False
    clip: bool = True

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise ValueError(f"FixedGrid: bits must be an integer in 1..16, got {self.bits!r}")
        if self.sym and self.bits < 2:
            raise ValueError("FixedGrid: symmetric grid needs at least 2 bits")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def _scale_zero(self, xmin: torch.Tensor, xmax: torch.Tensor):
        if self.sym:
            amax = torch.maximum(xmin.abs(), xmax)
            scale = fp16_up(2 * amax / self.maxq)
            zero = torch.full_like(scale, self.maxq / 2)  # mid-rise: levels ±s/2, ±3s/2, …
        else:
            scale = fp16_up((xmax - xmin) / self.maxq)
            zero = torch.round(-xmin / scale).clamp(0, self.maxq)
        return scale, zero

    def quant(self, w: torch.Tensor, params):
        """Quantise w (rows × k, or rows) with per-row params -> (symbols int64, reconstruction)."""
        scale, zero = params
        if w.ndim == 2:
            scale, zero = scale[:, None], zero[:, None]
        q = torch.clamp(torch.round(w / scale + zero), 0, self.maxq)
        return q.to(torch.int64), scale * (q - zero)

    def params(self, Wg: torch.Tensor):
        """Per-row (scale, zero) for the group Wg (rows × k)."""
        xmin = Wg.min(1).values.clamp(max=0)
        xmax = Wg.max(1).values.clamp(min=0)
        tiny = (xmax - xmin) < 1e-12  # all-zero row: any positive scale reconstructs it
        xmin = torch.where(tiny, torch.full_like(xmin, -1e-3), xmin)
        xmax = torch.where(tiny, torch.full_like(xmax, 1e-3), xmax)
        best = self._scale_zero(xmin, xmax)
        if not self.clip:
            return best
        best_err = torch.full_like(xmin, math.inf)
        for f in CLIP_FACTORS:
            cand = self._scale_zero(f * xmin, f * xmax)
            _, deq = self.quant(Wg, cand)
            err = ((deq - Wg) ** 2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = tuple(torch.where(better, c, b) for c, b in zip(cand, best))
        return best

    def side_bits_per_group(self) -> int:
        return SCALE_BITS + (0 if self.sym else self.bits)

    def affine(self, params):
        """(scale, zero, lo, hi) such that quant(w) = clamp(round(w / scale + zero), lo, hi) and
        w_hat = scale · (q − zero): the form the GPTQ kernel evaluates."""
        scale, zero = params
        return scale, zero, 0.0, float(self.maxq)


@dataclass(frozen=True)
class ECSQ:
    """Uniform step, unbounded integer symbols, no clipping (to be entropy coded).

    ``step``: a positive float or a per-row tensor. ``group_rel``: if set, the
    step of each group is group_rel · rms(group row) rounded to fp16 (and sent).
    """

    step: float | torch.Tensor | None = None
    group_rel: float | None = None

    def __post_init__(self):
        if (self.step is None) == (self.group_rel is None):
            raise ValueError("ECSQ: give exactly one of step or group_rel")
        if self.group_rel is not None and not self.group_rel > 0:
            raise ValueError(f"ECSQ: group_rel must be positive, got {self.group_rel}")
        if self.step is not None:
            s = torch.as_tensor(self.step)
            if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
                raise ValueError("ECSQ: step must be positive and finite")

    def params(self, Wg: torch.Tensor):
        rows = Wg.shape[0]
        if self.group_rel is not None:
            rms = Wg.pow(2).mean(1).sqrt()
            return (fp16_up(self.group_rel * rms),)
        s = torch.as_tensor(self.step, dtype=Wg.dtype)
        return (s.expand(rows).clone() if s.ndim == 0 else s.to(Wg.dtype).reshape(rows),)

    def quant(self, w: torch.Tensor, params):
        (step,) = params
        if w.ndim == 2:
            step = step[:, None]
        q = torch.round(w / step)
        return q.to(torch.int64), q * step

    def side_bits_per_group(self) -> int:
        return SCALE_BITS if self.group_rel is not None else 0

    def affine(self, params):
        (step,) = params
        return step, torch.zeros_like(step), -math.inf, math.inf


@dataclass
class QuantResult:
    """Reconstruction ``W_hat`` (float32), ``symbols`` (int64, same shape), per-group params
    (each rows × n_groups), ``group_size`` (0 = one group per row)."""

    W_hat: torch.Tensor
    symbols: torch.Tensor
    params: tuple = field(default_factory=tuple)
    group_size: int = 0

    @property
    def ngroups(self) -> int:
        return self.params[0].numel() if self.params else 0


def column_groups(n: int, group_size: int) -> list[tuple[int, int]]:
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0, got {group_size}")
    g = group_size or n
    return [(a, min(a + g, n)) for a in range(0, n, g)]


def check_weight(W: torch.Tensor) -> torch.Tensor:
    if not isinstance(W, torch.Tensor) or W.ndim != 2 or W.numel() == 0:
        raise ValueError("expected a non-empty 2-D weight tensor")
    if not torch.isfinite(W).all():
        raise ValueError("weight contains NaN or Inf")
    return W.detach().to(torch.float32)


def rtn(W: torch.Tensor, grid, group_size: int = 0) -> QuantResult:
    """Round-to-nearest with per-row (group_size=0) or per-group parameters."""
    W = check_weight(W)
    W_hat = torch.empty_like(W)
    sym = torch.empty(W.shape, dtype=torch.int64)
    plist = []
    for a, b in column_groups(W.shape[1], group_size):
        p = grid.params(W[:, a:b])
        sym[:, a:b], W_hat[:, a:b] = grid.quant(W[:, a:b], p)
        plist.append(p)
    params = tuple(torch.stack([p[i] for p in plist], 1) for i in range(len(plist[0])))
    return QuantResult(W_hat, sym, params, group_size)


def fixed_length_bits(shape: tuple[int, int], grid: FixedGrid, group_size: int = 0) -> int:
    """All-in bits of a fixed-length code: B bits per weight + per group an fp16 scale and,
    asymmetric, a B-bit zero-point."""
    rows, n = shape
    n_groups = rows * len(column_groups(n, group_size))
    return rows * n * grid.bits + n_groups * grid.side_bits_per_group()
