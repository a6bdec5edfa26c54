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
(:func:`aligncodec.codec.entropy.rans.coded_bits`: stream header, frequency table,
chunk table and payload). The step is set by one *global multiplier* c for the whole model:

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

Methods whose model is first changed by a function-preserving transform (SmoothQuant,
KurTail, SpinQuant) name it in :data:`MODEL_TRANSFORMS`: the ``transform_model`` of
:mod:`.smoothquant`, :mod:`.kurtail` or :mod:`.spinquant`, imported on first use.

This module is the declared registry only (no torch); the quantisers are in
:mod:`.quantize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from aligncodec.codec.registry import lazy

__all__ = ["METHODS", "MODEL_TRANSFORMS", "Method", "STEP_RULES", "auto_sym", "get_method"]

STEP_RULES = ("shared", "rms")


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


# name, randomized Hadamard, rounding, group size (0: per row), whole-model transform (module) or None;
# each method also exists entropy coded, as "<name>-ec"
_DECLARED = (
    ("rtn", False, "rtn", 0, None),
    ("rtn-g128", False, "rtn", 128, None),
    ("hadamard-rtn", True, "rtn", 0, None),
    ("gptq", False, "gptq", 128, None),
    ("hadamard-gptq", True, "gptq", 0, None),
    ("kurtail-gptq", False, "gptq", 0, "kurtail"),
    ("kurtail-rtn", False, "rtn", 0, "kurtail"),
    ("smoothquant-rtn", False, "rtn", 0, "smoothquant"),
    ("smoothquant-gptq", False, "gptq", 128, "smoothquant"),
    ("spinquant-gptq", False, "gptq", 0, "spinquant"),
    ("spinquant-rtn", False, "rtn", 0, "spinquant"),
)
METHODS: dict[str, Method] = {}
# method name -> transform_model(model, sigma, *, method, bits, seed, log, calib_windows, cache_dir) -> folding.Prepared,
# run by tools/experiments/baseline.run_baseline before quantising
MODEL_TRANSFORMS: dict[str, Callable] = {}
for _name, _rotate, _algo, _group, _module in _DECLARED:
    for _ec in (False, True):
        _m = Method(_name + ("-ec" if _ec else ""), _rotate, _algo, _group, _ec)
        METHODS[_m.name] = _m
        if _module is not None:
            MODEL_TRANSFORMS[_m.name] = lazy(f"aligncodec.codec.baselines.{_module}", "transform_model")


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


def auto_sym(bits: int) -> bool:
    """The stronger fixed grid, measured on SmolLM2's weights (see the module doc): symmetric
    mid-rise at 2 bits, asymmetric with a zero-point from 3 bits on."""
    return int(bits) <= 2
