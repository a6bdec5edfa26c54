"""Block-sequential lossy encoder: memory set by one decoder block, time linear in the
parameters, whole-model rate control (``aligncodec compress MODEL --bpw B``).

Order of work (GPTQ's own order; see DESIGN.md §7 "upstream error"):

1. **Plan** (:mod:`aligncodec.arch`): the model is built on the meta device from the
   folder's config, its decoder blocks and their ``nn.Linear`` layers are found, every
   parameter is mapped to its checkpoint tensor; shards, shapes and dtypes are checked.
   Nothing is encoded before this succeeds.
2. **Rate pass**: every lossy tensor is read once (memory-mapped), checked for NaN/Inf,
   and its rate curve measured on a row subsample: the empirical entropy of
   round(W T / Δ) (T the randomized Hadamard when a Hadamard candidate is on) on a grid
   of steps. Lossless tensors (norms, biases, small tensors) and the folder's auxiliary
   files are coded now, so their bytes are known.
3. **Calibration inputs**: the calibration windows (BOS + up to 1023 tokens of the
   built-in calibration half, or ``calib_text``) are embedded and the arguments every
   block receives (masks, rotary tables: whatever the architecture passes) are recorded
   by running the model with recording stubs in place of the blocks.
4. **Block pass**, for each decoder block: load its weights (float32), run the
   activations through it while accumulating Σ = E[x xᵀ] of each linear input, encode
   each linear with the per-tensor encoder (:mod:`aligncodec.codec.encoder`: candidate
   transforms, J = D + λR, GPTQ + ECSQ) at the step the rate controller gives, write it
   to the archive writer (which spools to disk), put the *decoded* weights in place and
   run the block again to produce the next block's inputs (``calibration="quantized"``:
   block L is calibrated on the outputs of the already encoded blocks; ``"float"``, the
   default, keeps the unmodified model's activations, as the whole-model calibration does),
   free it. On SmolLM2 at 3.0 bpw both give KLD 0.3095 and float the better perplexity
   (docs/results/2026-11-30-stream-speed-memory.md).
5. **Head**: the input of the output projection (after the final norm) is captured from
   the last block's outputs; the embedding (tied: with that Σ; untied: weight MSE) and an
   untied lm_head are coded last, their step searched on the real coder so that the file
   lands on the target.

Rate control: one absolute weight-domain step Δ for every lossy tensor (DESIGN.md §6:
one global step beat equal-SQNR and sensitivity-weighted allocations; the mode decision
inside each tensor uses λ = 2 ln 2 · D/N). Before each block the controller solves
spent + Σ_remaining c_type · B_t(Δ) = budget for Δ, with B_t the rate pass's curve and
c_type the measured ratio of real to predicted bytes for that kind of layer so far
(two-pass video rate control).

``bpw_scope="all"`` (default): B = (file bytes, auxiliary files included) × 8 / every
parameter. ``"linear"``: B = all-in bytes of the block linears × 8 / their weights
(the studies' definition; embeddings lossless).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from aligncodec import arch as A
from aligncodec.codec import encoder as E
from aligncodec.codec.modes import lossless, lossy
from aligncodec.formats.constants import PREAMBLE_SIZE, SECTION_METADATA
from aligncodec.formats.writer import ArchiveWriter, build_section
from aligncodec.tools.eval.text import STREAM_CALIB_TOKENS

CALIB_MODES = ("quantized", "float", "none")
SCOPES = ("all", "linear")
MIN_NUMEL = 4096
LOG2_GRID = np.arange(-24.0, 6.0 + 1e-9, 0.125)  # log2 of the steps the rate curves are measured at
SAMPLE_VALUES = 1 << 14  # values per tensor in the rate pass
# The output head's step multiple when not given (StreamOptions.head_step None): the balance of
# marginal KL per byte between the head and the other lossy tensors (docs/lossy-encoder.md,
# "The output head's step"). KL_h ∝ m² (D ∝ Δ²); the others' KL falls e^(-BLOCK_KL_SLOPE) per bit
# per weight, and each bit per head weight the head takes costs them r = N_head / N_others bits
# per weight; with equal KL from both at m = 1 (SmolLM2's calibration text: 0.142 vs 0.146) the
# optimum is m = (β/2)^(1/(2+β)), β = BLOCK_KL_SLOPE·r/ln 2
BLOCK_KL_SLOPE = 1.5  # ln KLD per bit per weight around 3 bpw (SmolLM2 1.42–1.73, Gemma-3 1.57: results 2026-12-01)
HEAD_STEP_RANGE = (0.25, 4.0)
# transforms the embeddings and lm_head try besides opts.candidates (by J, on a row subsample).
# None: `identity` was tried and dropped — on SmolLM2's tied head it wins J (same D at 2.6 % fewer
# bytes) but its KL on held-out calibration text is 26 % higher than hadamard's (0.0881 vs 0.0698 at
# M = 0.7): D weighs every vocabulary row alike, and identity-domain zeros shrink rows (a logit bias)
OUTER_EXTRA_CANDIDATES: tuple[str, ...] = ()


def outer_candidates(opts: "StreamOptions") -> tuple[str, ...]:
    """The candidates of the tensors outside the blocks (embeddings, lm_head)."""
    return tuple(opts.candidates) + tuple(c for c in OUTER_EXTRA_CANDIDATES if c not in opts.candidates)


def auto_head_step(n_head: int, n_others: int) -> float:
    """The head's step multiple m from the parameter ratio r = n_head / n_others (see the note
    above BLOCK_KL_SLOPE): SmolLM2-135M (r = 0.27) 0.62, Gemma-3-270M (r = 1.67) 1.11."""
    if n_head <= 0 or n_others <= 0:
        return 1.0
    beta = BLOCK_KL_SLOPE * (n_head / n_others) / math.log(2)
    return float(min(max((beta / 2) ** (1 / (2 + beta)), HEAD_STEP_RANGE[0]), HEAD_STEP_RANGE[1]))


class CalibrationError(RuntimeError):
    """The calibration forward pass cannot run or leaves a linear layer without Σ."""


class NonFiniteError(A.CheckpointError, E.NonFiniteError):
    """A weight to be coded holds NaN or Inf (``nonfinite="error"``, the default)."""


class TokenizerMismatchError(A.CheckpointError):
    """The calibration tokenizer yields token ids the model has no embedding row for (a
    tokenizer that belongs to another model beside the weights)."""


def check_vocab(plan: A.ModelPlan, ckpt: A.Checkpoint, windows, tokenizer_size=None) -> None:
    """Raise TokenizerMismatchError, naming both numbers, when a calibration token id is not
    below the model's vocabulary: its config's ``vocab_size`` and its input embedding's rows
    (before any work; the first forward pass would otherwise fail deep in the embedding lookup).
    ``tokenizer_size``: a callable giving len(tokenizer) for the message (called on error only)."""
    top = max((int(w.max()) for w in windows if w.numel()), default=-1)
    cfg = plan.config
    vs = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    rows = ckpt.tensors[plan.embedding].shape[0] if plan.embedding in ckpt.tensors else None
    limits = [(int(v), what) for v, what in ((vs, "config vocab_size"), (rows, f"rows of {plan.embedding}")) if v]
    bad = [(v, what) for v, what in limits if top >= v]
    if bad:
        v, what = min(bad)
        size = tokenizer_size() if callable(tokenizer_size) else tokenizer_size
        tok = f" (of {size:,} tokens)" if size and size > top else ""
        raise TokenizerMismatchError(
            f"the calibration tokenizer{tok} gives token id {top:,}, but the model has a vocabulary of {v:,} "
            f"({what}): the tokenizer does not belong to this model; put the model's own tokenizer beside its weights, "
            "or use --no-calibration")


@dataclass
class StreamOptions:
    bpw: float
    scope: str = "all"
    calibration: str = "float"  # measured: same KLD as "quantized", better perplexity, one forward pass
    candidates: tuple[str, ...] = E.DEFAULT_CANDIDATES
    alpha: float = 0.25
    seed: int = 0
    calib_tokens: int = STREAM_CALIB_TOKENS
    calib_text: str | None = None  # a file path
    window: int = 1024
    lossy_embeddings: bool | None = None  # None: True for scope "all", False for "linear"
    threads: int | None = None  # threads of the encode (None/0: every core, parallel.default_threads); the archive is the same for any count
    sample_rows: int = 64
    workers: int | None = None  # deprecated: the thread count when ``threads`` is not given
    device: str | None = None  # torch device of the calibration forward passes (None: cuda if present, else cpu)
    trellis: int = 0  # 0: mode 2 ecsq; else mode 4 tcq with this state machine (encoder.trellis_id)
    nonfinite: str = "error"  # a lossy candidate holding NaN/Inf: NonFiniteError, or coded lossless ("lossless")
    # the output head's step (a tied embedding, or an untied lm_head) as a multiple of the blocks'
    # step; None: auto_head_step (whole-file scope; 1 in linear scope, where the head is not in the target)
    head_step: float | None = None

    def __post_init__(self):
        if self.nonfinite not in ("error", "lossless"):
            raise ValueError(f"nonfinite must be 'error' or 'lossless', not {self.nonfinite!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"bpw scope must be one of {SCOPES}, got {self.scope!r}")
        if self.calibration not in CALIB_MODES:
            raise ValueError(f"calibration must be one of {CALIB_MODES}, got {self.calibration!r}")
        if not (self.bpw > 0 and math.isfinite(self.bpw)):
            raise ValueError(f"bpw must be positive, got {self.bpw}")
        if self.calib_tokens < 1:
            raise ValueError("calib_tokens must be positive")
        for c in self.candidates:
            if c not in E.CANDIDATES:
                raise ValueError(f"unknown candidate {c!r}; choose from {', '.join(E.CANDIDATES)}")
        if self.trellis and self.trellis not in lossy.TRELLIS_MACHINES:
            raise ValueError(f"unknown trellis state-machine id {self.trellis}")
        if self.head_step is not None and not (self.head_step > 0 and math.isfinite(self.head_step)):
            raise ValueError(f"head step multiplier must be positive, got {self.head_step}")
        if self.lossy_embeddings is None:
            self.lossy_embeddings = self.scope == "all"
        for k in ("threads", "workers"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{k} must be a non-negative integer (0: every core), not {v!r}")

    def n_threads(self) -> int:
        """The encode's threads: ``threads`` (or the deprecated ``workers``) when given and
        non-zero, else every core (``ACZ_THREADS`` if set; :func:`parallel.default_threads`)."""
        from aligncodec.codec import parallel

        return (self.threads if self.threads is not None else self.workers) or parallel.default_threads()

    def fingerprint(self) -> dict:
        """What the archive bytes depend on (workers and device do not change them)."""
        d = asdict(self)
        for k in ("workers", "device", "threads"):
            d.pop(k)
        if self.calib_text:
            d["calib_text"] = hashlib.sha256(Path(self.calib_text).read_bytes()).hexdigest()
        return json.loads(json.dumps(d))  # the form it has after a trip through the manifest


# --------------------------------------------------------------------------- rate curves


@dataclass
class RateCurve:
    """Predicted all-in bytes of one tensor on LOG2_GRID (from a row subsample)."""

    name: str
    kind: str  # controller class: the linear's leaf name (q_proj, ...), "embedding", "lm_head"
    numel: int
    bits: np.ndarray  # bits per weight on LOG2_GRID

    def bytes_at(self, x: float) -> float:
        b = float(np.interp(x, LOG2_GRID, self.bits))
        if x < LOG2_GRID[0]:
            b += LOG2_GRID[0] - x
        return self.numel * b / 8 + 512


def measure_curve(name: str, kind: str, W: torch.Tensor, hadamard: bool, seed: int, step_ratio: float = 1.0) -> RateCurve:
    """Empirical entropy of round(W T / Δ) on a row subsample (≈ SAMPLE_VALUES values), on the
    part of LOG2_GRID where a useful step can lie (rms·2^-10 … rms·2^3); outside it the curve
    continues at 1 bit per halving (fine end) or halves per doubling (coarse end).
    ``step_ratio``: the curve of a quantiser whose step Δ codes like ECSQ at Δ / step_ratio
    (tcq: encoder.TCQ_STEP_RATIO; the controller's measured ratios correct the rest)."""
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
        raise NonFiniteError(f"tensor {name!r}: rms {rms:g} outside the rate grid")
    bits = np.full(len(LOG2_GRID), np.nan)
    for i in idx[::2]:  # every other grid point, interpolated below
        q = np.rint(X / (2.0 ** LOG2_GRID[i] / step_ratio)).astype(np.int64)
        lo = int(q.min())
        cnt = np.bincount(q - lo)
        p = cnt[cnt > 0] / q.size
        bits[i] = float(-(p * np.log2(p)).sum())
    ok = np.where(~np.isnan(bits))[0]
    bits = np.interp(LOG2_GRID, LOG2_GRID[ok], bits[ok])
    a, b = ok[0], ok[-1]
    bits[:a] = bits[a] + (LOG2_GRID[a] - LOG2_GRID[:a])
    bits[b + 1:] = bits[b] * 0.5 ** (LOG2_GRID[b + 1:] - LOG2_GRID[b])
    return RateCurve(name, kind, rows * n, bits)


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
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if self._predict_agg(mid, *agg) > left:
                lo = mid
            else:
                hi = mid
        return hi

    def record(self, name: str, x: float, nbytes: int) -> None:
        """``name`` coded at log2 step ``x`` (its own step: the common one plus its offset)."""
        c = self.curves[name]
        self.actual[c.kind] = self.actual.get(c.kind, 0.0) + nbytes
        self.predicted[c.kind] = self.predicted.get(c.kind, 0.0) + c.bytes_at(x)
        self.remaining.discard(name)
        self.spent += nbytes

    def skip(self, name: str, nbytes: int = 0, share: float = 0.0) -> None:
        """``name`` was coded lossless after all: its curve (and the ratio of its kind) take no
        further part; its ``nbytes`` are spent (whole-file scope: they are in the file) or its
        ``share`` of the budget is withdrawn (linear scope: the target counts lossy tensors only,
        as the whole encoder's)."""
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


class _Stop(Exception):
    pass


def calibration_windows(folder: Path, opts: StreamOptions, tokenizer=None):
    from aligncodec.tools.eval.evaluate import make_windows

    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # noqa: BLE001
            raise CalibrationError(f"{folder}: no tokenizer for the calibration text ({type(exc).__name__}: {exc}); "
                                   "use --no-calibration") from None
    text = None
    if opts.calib_text:
        text = Path(opts.calib_text).read_text(encoding="utf-8")
    try:
        return make_windows(tokenizer, opts.calib_tokens, "calib", opts.window, text=text)
    except Exception as exc:  # noqa: BLE001 - too little text etc.
        raise CalibrationError(f"calibration text: {exc}") from None


def record_block_inputs(plan: A.ModelPlan, windows) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Run the model with recording stubs in place of its blocks: the first block's input per
    window and the keyword arguments each block receives (masks, rotary tables, ...)."""
    blocks = A.get_module(plan.model, plan.blocks_path)
    nb = len(blocks)
    inputs: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in range(nb)]
    saved = []
    for i, blk in enumerate(blocks):
        def fwd(*args, _i=i, **kw):
            h = args[0] if args else kw.pop("hidden_states")
            if len(args) > 1:
                raise A.UnsupportedArchitectureError("decoder blocks called with positional arguments beyond the hidden states")
            if _i == 0:
                inputs.append(h.detach())
            kwargs[_i].append(kw)
            if _i == nb - 1:
                raise _Stop
            return h

        saved.append(blk.__dict__.get("forward"))
        blk.forward = fwd
    try:
        with torch.no_grad():
            for w in windows:
                try:
                    plan.model(input_ids=w[None], use_cache=False)
                except _Stop:
                    pass
                else:
                    raise CalibrationError("the model's forward pass did not reach its last decoder block")
    finally:
        for blk, f in zip(blocks, saved):
            if f is None:
                del blk.forward
            else:
                blk.forward = f
    for i in range(nb):
        if len(kwargs[i]) != len(windows):
            raise CalibrationError(f"decoder block {i} was called {len(kwargs[i])} times for {len(windows)} windows")
    return inputs, kwargs


def head_input_sigma(plan: A.ModelPlan, windows, finals: list[torch.Tensor]) -> torch.Tensor:
    """Σ of the output projection's input: the model's tail (final norm, ...) run on the last
    block's outputs."""
    blocks = A.get_module(plan.model, plan.blocks_path)
    nb = len(blocks)
    head = A.get_module(plan.model, plan.lm_head_module)
    acc = None
    n_pos = 0
    state = {"w": 0}
    saved = []
    for i, blk in enumerate(blocks):
        def fwd(*args, _i=i, **kw):
            h = args[0] if args else kw["hidden_states"]
            return finals[state["w"]] if _i == nb - 1 else h

        saved.append(blk.__dict__.get("forward"))
        blk.forward = fwd

    def hook(_m, args):
        nonlocal acc, n_pos
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        acc = x.T @ x if acc is None else acc.addmm_(x.T, x)
        n_pos += x.shape[0]
        raise _Stop

    h = head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for wi, w in enumerate(windows):
                state["w"] = wi
                # dummy input embeddings: the blocks' stubs return the real final states, and
                # the (possibly freed) embedding is not needed
                dummy = torch.zeros(1, len(w), finals[wi].shape[-1], dtype=finals[wi].dtype)
                try:
                    plan.model(inputs_embeds=dummy, use_cache=False)
                except _Stop:
                    pass
    finally:
        h.remove()
        for blk, f in zip(blocks, saved):
            if f is None:
                del blk.forward
            else:
                blk.forward = f
    if acc is None:
        raise CalibrationError("the output projection was never reached")
    acc /= n_pos
    return E.symmetrize_(acc)


def _to(obj, dev):
    """``obj`` (tensors inside tuples, lists and dicts) moved to ``dev``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(x, dev) for x in obj)
    if isinstance(obj, dict):
        return {k: _to(v, dev) for k, v in obj.items()}
    return obj


GRAM_TILE = 1024  # Σ's columns accumulated per product: inputs wider than this fill the lower triangle only


def add_gram_lower_(G: torch.Tensor, x: torch.Tensor, tile: int = GRAM_TILE) -> None:
    """G += xᵀ x on and below the diagonal (G's upper triangle beyond the diagonal tiles is left
    as it is; :func:`mirror_lower_` completes it): one float32 product per column tile of
    ``tile`` columns, widened into G element by element. Half the multiplications of the full
    product for a wide input (n = 8,192: 56 %); an input of at most ``tile`` is the one product."""
    n = x.shape[1]
    for a in range(0, n, tile):
        G[a:, a:a + tile].add_(x[:, a:].T @ x[:, a:a + tile])


def mirror_lower_(G: torch.Tensor, tile: int = GRAM_TILE) -> torch.Tensor:
    """G's upper triangle beyond the diagonal tiles set to its lower one (in place, a tile at a
    time), and each diagonal tile symmetrised, (X + Xᵀ)/2: G exactly symmetric. Returns G."""
    n = G.shape[0]
    for a in range(0, n, tile):
        X = G[a:a + tile, a:a + tile]
        X.copy_((X + X.T) / 2)
        for b in range(a + tile, n, tile):
            G[a:a + tile, b:b + tile].copy_(G[b:b + tile, a:a + tile].T)
    return G


def run_block(block: torch.nn.Module, hs: list[torch.Tensor], kws: list[dict], capture: list[tuple[str, torch.nn.Module]] | None,
              dev: torch.device | None = None, sigma_only: bool = False, energy: dict[str, float] | None = None):
    """Outputs of ``block`` per window; with ``capture``, also Σ per linear (float64; aliases
    share the tensor: linears that read the very same input get the same Σ object).
    ``sigma_only``: the outputs are not wanted (quantized calibration runs the block again with
    the decoded weights), so each window stops as soon as every captured linear has seen its
    input (the last linear itself, e.g. ``down_proj``, and what follows it are skipped); returns
    no outputs. ``energy``: filled with tr(W Σ Wᵀ) = ‖X Wᵀ‖² / positions per captured linear
    whose output was computed, from the outputs the forward pass makes anyway (the encoder's
    relative error needs it; otherwise a rows × n² product per tensor)."""
    acc: dict[str, torch.Tensor] = {}
    en: dict[str, float] = {}
    aliases: dict[str, str] = {}
    last = {"x": None, "key": None}
    seen: set[str] = set()
    n_capture = len({k for k, _m in capture or []})
    handles = []
    n_pos = 0

    def hook_for(key):
        def hook(_m, args):
            x = args[0]
            seen.add(key)
            if x is last["x"]:
                aliases[key] = aliases.get(last["key"], last["key"])
                if sigma_only and len(seen) == n_capture:
                    raise _Stop
                return
            last["x"], last["key"] = x, key
            # one window's product in float32 (≤ 1024 positions), accumulated in float64
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            if key not in acc:
                acc[key] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64, device=x2.device)
            add_gram_lower_(acc[key], x2)
            if sigma_only and len(seen) == n_capture:
                raise _Stop

        return hook

    def out_hook_for(key):
        def hook(m, _args, y):
            y2 = y.detach().reshape(-1, y.shape[-1]).float()
            b = getattr(m, "bias", None)
            if isinstance(b, torch.Tensor):
                y2 = y2 - b.detach().float()
            en[key] = en.get(key, 0.0) + float((y2 * y2).sum(dtype=torch.float64))

        return hook

    for key, m in capture or []:
        handles.append(m.register_forward_pre_hook(hook_for(key)))
        if energy is not None:
            handles.append(m.register_forward_hook(out_hook_for(key)))
    outs = []
    try:
        with torch.no_grad():
            for h, kw in zip(hs, kws):
                last["x"] = last["key"] = None
                seen.clear()
                try:
                    o = block(h.to(dev) if dev is not None else h, **kw)
                except _Stop:
                    o = None
                if not sigma_only:
                    if o is None:
                        raise CalibrationError("a decoder block stopped before its output")
                    outs.append((o[0] if isinstance(o, tuple) else o).detach().cpu())
                n_pos += h.shape[0] * h.shape[1]
    finally:
        for hd in handles:
            hd.remove()
        last["x"] = None
    sig = {}
    if capture:
        for k in list(acc):  # accumulated and kept in float64 (float32 storage cost Gemma-3 4 % KLD)
            acc[k] /= n_pos
            acc[k] = mirror_lower_(acc[k]).to(device="cpu")
        if energy is not None:
            energy.update({k: v / n_pos for k, v in en.items()})
        for key, _m in capture:
            if key in acc:
                sig[key] = acc[key]
            elif key in aliases:
                sig[key] = acc[aliases[key]]
            else:
                raise CalibrationError(f"linear {key} was never called during the calibration pass")
    return outs, sig


# --------------------------------------------------------------------------- spool (resume)


class ResumeError(ValueError):
    """A resume does not fit the spool: different input or settings, or a damaged spool."""


class SpoolSpaceError(OSError):
    """Too little free disk for the spool and the archive."""


SPOOL_FORMAT = "aligncodec-stream-spool/1"


def spool_dir(out: str | os.PathLike) -> Path:
    o = Path(os.path.abspath(out))
    return o.parent / f".{o.name}.spool"


def input_fingerprint(ckpt: A.Checkpoint) -> dict:
    """Names, sizes and modification times of the shards plus a hash of their headers."""
    h = hashlib.sha256()
    files = []
    for f in ckpt.files:
        st = f.stat()
        files.append([f.name, st.st_size, st.st_mtime_ns])
        with open(f, "rb") as fh:
            (n,) = __import__("struct").unpack("<Q", fh.read(8))
            h.update(fh.read(n))
    return {"files": files, "headers_sha256": h.hexdigest()}


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 22), b""):
            h.update(b)
    return h.hexdigest()


class Spool:
    """Finished blocks of an interrupted encode: ``manifest.json`` (input and settings
    fingerprints, the list of finished steps with each file's sha256), one ``step-N.pt`` per
    finished block (its coded tensors, the controller state and the activations for the next
    block). Every file is written to a temporary name, fsynced and renamed; the manifest last."""

    def __init__(self, path: Path, ident: dict):
        self.path = path
        self.ident = ident
        self.steps: list[dict] = []

    @classmethod
    def create(cls, path: Path, ident: dict) -> "Spool":
        if path.exists():
            import shutil

            shutil.rmtree(path)
        path.mkdir(parents=True)
        sp = cls(path, ident)
        sp._write_manifest()
        return sp

    @classmethod
    def open(cls, path: Path, ident: dict) -> "Spool":
        man = path / "manifest.json"
        if not man.is_file():
            raise ResumeError(f"no spool to resume from at {path}")
        try:
            m = json.loads(man.read_text())
        except ValueError:
            raise ResumeError(f"{man} is damaged (not JSON)") from None
        if m.get("format") != SPOOL_FORMAT:
            raise ResumeError(f"{man}: not an {SPOOL_FORMAT} spool")
        if m.get("input") != ident["input"]:
            raise ResumeError(f"the spool at {path} was written for a different input checkpoint")
        if m.get("options") != ident["options"]:
            diff = sorted(k for k in set(m.get("options", {})) | set(ident["options"])
                          if m.get("options", {}).get(k) != ident["options"].get(k))
            raise ResumeError(f"the spool at {path} was written with different settings ({', '.join(diff)})")
        sp = cls(path, ident)
        for st in m.get("steps", []):
            f = path / st["file"]
            if not f.is_file() or _sha256_file(f) != st["sha256"]:
                raise ResumeError(f"the spool at {path} is damaged ({st['file']} is missing or fails its checksum)")
            sp.steps.append(st)
        return sp

    def _write_manifest(self) -> None:
        m = {"format": SPOOL_FORMAT, **self.ident, "steps": self.steps}
        _atomic_write(self.path / "manifest.json", json.dumps(m, indent=1, sort_keys=True).encode())

    def save_step(self, key: str, payload: dict, acts=None) -> None:
        """Record a finished step; ``acts`` (the activations for the next block) are kept for the
        latest step only: written first, then the manifest that names them, then the old ones go."""
        fname = f"step-{len(self.steps):05d}.pt"
        data = _torch_bytes(payload)
        _atomic_write(self.path / fname, data)
        st = {"key": key, "file": fname, "sha256": hashlib.sha256(data).hexdigest()}
        old = self.steps[-1].get("acts") if self.steps else None
        if acts is not None:
            an = f"acts-{len(self.steps):05d}.pt"
            ad = _torch_bytes(acts)
            _atomic_write(self.path / an, ad)
            st["acts"], st["acts_sha256"] = an, hashlib.sha256(ad).hexdigest()
        for prev in self.steps:
            prev.pop("acts", None)
            prev.pop("acts_sha256", None)
        self.steps.append(st)
        self._write_manifest()
        if old:
            try:
                os.unlink(self.path / old)
            except FileNotFoundError:
                pass

    def load_step(self, i: int) -> dict:
        return torch.load(self.path / self.steps[i]["file"], weights_only=False)

    def load_acts(self):
        st = self.steps[-1]
        f = self.path / st["acts"]
        if not f.is_file() or _sha256_file(f) != st["acts_sha256"]:
            raise ResumeError(f"{f}: the activations of the last finished block are missing or damaged")
        return torch.load(f, weights_only=False)

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the encoder


@dataclass
class Coded:
    name: str
    kind: str
    step: float
    nbytes: int
    rel_err: float
    sqnr_db: float
    type: str


def _lossy_shape_ok(shape) -> bool:
    return len(shape) == 2 and min(shape) >= 16 and shape[0] * shape[1] >= MIN_NUMEL


LAZY_MIN_ROWS = E.CHUNK_ROWS  # tensors with more rows (embeddings, lm_head) are read and coded a row chunk at a time
SEARCH_ROWS = 4096  # rows of the subsample on which the last tensor's step is searched
FULL_TOL = 0.0025  # the last tensor is coded again if its full code misses the file target by more


def tensor_rows(ckpt: A.Checkpoint, nm: str) -> "torch.Tensor | E.RowView":
    """The tensor in float32: whole for a small one; a :class:`E.RowView` reading row chunks
    from the checkpoint for one with more than LAZY_MIN_ROWS rows (no float32 copy of the
    whole tensor is ever held: the coder works one row chunk at a time)."""
    ti = ckpt.tensors[nm]
    if len(ti.shape) == 2 and ti.shape[0] > LAZY_MIN_ROWS:
        return E.RowView(lambda sl: ckpt.rows_float32(nm, sl), tuple(ti.shape))
    return ckpt.float32(nm)


VERIFY_RTOL = 1e-3  # as lossy_compress.verify_lossy


def check_coded(w: ArchiveWriter, entry, tc: E.TensorCode, ckpt: A.Checkpoint, nm: str) -> float:
    """The stream encoder's check of what it wrote (the whole encoder decodes its archive after
    writing, :func:`aligncodec.lossy_compress.verify_lossy`; this one checks each tensor right
    after coding it): the entry's bytes are read back from the writer's spool, parsed and decoded
    by the CPU decoder, then compared, one row chunk at a time, bit for bit with the encoder's
    own reconstruction (where it was kept) and, in the weight domain, with the error the encoder
    measured (‖W − Ŵ‖² within VERIFY_RTOL). A mismatch is EncodeVerifyError (exit 8): the
    archive never gets its final name. Returns the decoded error."""
    from aligncodec.codec.modes import decode_entry, release_decoder_scratch
    from aligncodec.codec.torch_interop import bytes_to_tensor
    from aligncodec.formats.streams import parse_streams

    try:
        What = bytes_to_tensor(entry, decode_entry(entry, parse_streams(w.read_back(entry), entry.stream_count)))
    except Exception as exc:  # noqa: BLE001 - any failure to decode what was just written is the check failing
        raise E.EncodeVerifyError(f"tensor {nm!r} does not decode ({type(exc).__name__}: {exc})") from None
    if tuple(What.shape) != tuple(ckpt.tensors[nm].shape):
        raise E.EncodeVerifyError(f"tensor {nm!r} decodes to shape {tuple(What.shape)}")
    got = 0.0
    for r in E.row_chunks(What.shape[0]):
        Wh = What[r].to(torch.float32)
        if not bool(torch.isfinite(Wh).all()):
            raise E.EncodeVerifyError(f"tensor {nm!r} decodes to non-finite values")
        if tc.W_hat is not None and not torch.equal(Wh, torch.from_numpy(tc.W_hat[r])):
            raise E.EncodeVerifyError(f"tensor {nm!r} decodes to other values than the encoder's reconstruction")
        got += float(((Wh - ckpt.rows_float32(nm, r)).double() ** 2).sum())
    del What
    release_decoder_scratch()  # the CPU decoder's pooled symbol buffers: not kept between tensors here
    want = tc.noise
    if not (math.isfinite(got) and abs(got - want) <= VERIFY_RTOL * max(want, 0.0) + 1e-30):
        raise E.EncodeVerifyError(f"tensor {nm!r} decodes with error {got:.6g}, the encoder measured {want:.6g}")
    return got


def code_tensor(name: str, W: "torch.Tensor | E.RowView", dtype: str, S: torch.Tensor | None, step: float, opts: StreamOptions,
                cache: dict, keep_w_hat: bool = True, energy: float | None = None,
                candidates: tuple[str, ...] | None = None) -> tuple[E.TensorCode, E.TensorJob]:
    """Code one tensor at ``step``: candidates by J on a row subsample, then the chosen one in
    full (a :class:`E.RowView` ``W``: row chunk by row chunk). ``energy``: tr(W Σ Wᵀ) if known
    (:func:`run_block`'s), else measured."""
    job = E.TensorJob(name, W, dtype, S, trellis=opts.trellis, energy=energy)
    E.build_candidates(job, candidates or opts.candidates, alpha=opts.alpha, seed=opts.seed, cache=cache,
                       lazy=isinstance(W, E.RowView))
    if len(job.cands) > 1:
        cand, _ = E.choose(job, step, E.stride_for(W.shape[0], opts.sample_rows))
    else:
        cand = job.cands[0]
    job.cands = [cand]  # the others' C (one float32 copy of W each) go before the full code
    tc = E.code_candidate(job, cand, step, keep_w_hat=keep_w_hat)
    job.unfit = E.unfit_reason(tc, job)  # a code lossy coding cannot serve: the tensor goes lossless
    job.cands = []
    return tc, job


@contextlib.contextmanager
def thread_limits(n: int | None):
    """At most ``n`` threads in each of the encoder's thread pools for the duration (torch's
    intra-op pool, numba's kernels, numpy's BLAS through threadpoolctl); ``None`` or 0 leaves
    the libraries' defaults. The previous settings come back afterwards."""
    if not n:
        yield
        return
    import numba

    t_old, nb_old = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; without it numpy's BLAS keeps its pool
        ctx = contextlib.nullcontext()
    else:
        ctx = threadpool_limits(limits=n)
    try:
        with ctx:
            yield
    finally:
        torch.set_num_threads(t_old)
        numba.set_num_threads(nb_old)


_LIBC = None


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``). Block-sized
    temporaries (a few MB each) come from the heap once glibc's mmap threshold has risen; the
    holes they leave kept the resident set growing by ~30 MB per block (SmolLM2, measured).
    Called after every block and every large tensor; a no-op without glibc. (A fixed low mmap
    threshold did the same but tripled the system time: every temporary was a fresh mapping.)"""
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _worker_init() -> None:
    """A thread of the encoder's pool: one numba thread (numba's count is per calling thread;
    one thread selects the kernels' serial, GIL-free twins, rans.launch) and no fan-out of its
    own (parallel.inner_threads, and the decoder of check_coded, run inline in it)."""
    import numba

    from aligncodec.codec import parallel

    numba.set_num_threads(1)
    parallel.set_thread_default(1)


def encode_stream(model: str | os.PathLike, out: str | os.PathLike, opts: StreamOptions, *, progress: bool = True,
                  tokenizer=None, resume: bool = False, on_block=None, follow_symlinks: bool = False) -> dict:
    """Encode ``model`` block by block into ``out`` (see the module doc). Returns a summary.

    Runs on ``opts.n_threads()`` threads (default: every core). Each library's own thread pool
    (torch's intra-op pool, numba's kernels, numpy's BLAS) is held at one thread
    (:func:`thread_limits`) and the parallel work is whole tasks, each computed exactly as with
    one thread: a block's linears, the next block's calibration forward pass (float
    calibration), the rate pass's tensors, the row chunks of a tall tensor (a wavefront for
    tcq). The archive is therefore the same bytes for every thread count."""
    from aligncodec.codec import parallel

    with thread_limits(1), parallel.threads_override(opts.n_threads()):
        return _encode_stream(model, out, opts, progress=progress, tokenizer=tokenizer, resume=resume, on_block=on_block,
                              follow_symlinks=follow_symlinks)


def _encode_stream(model: str | os.PathLike, out: str | os.PathLike, opts: StreamOptions, *, progress: bool,
                   tokenizer, resume: bool, on_block, follow_symlinks: bool = False) -> dict:
    from aligncodec import archive

    log = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    t0 = time.perf_counter()
    src_path = Path(model)
    if not src_path.exists():
        from aligncodec.lossy_compress import resolve_input

        src_path = resolve_input(model)
    folder = src_path.parent if src_path.is_file() else src_path
    src = archive.find_inputs(src_path, follow_symlinks=follow_symlinks)  # InputError before any work (symlinks, names,
    src_meta, notes = src.metadata()  # a file that is not safetensors, an index that disagrees with its shards), as
    for n in notes:  # the whole encoder
        log(f"note: {n}")
    ckpt = A.Checkpoint(src_path)
    calibrate = opts.calibration != "none"
    has_config = (folder / "config.json").is_file()
    plan = A.plan_model(src_path, ckpt) if (calibrate or has_config) else None

    # ---- which tensors are lossy, in coding order
    order: list[tuple[str, str, int | None]] = []  # (checkpoint name, controller kind, block index or None)
    if plan is not None:
        for b in plan.blocks:
            for li in b.linears:
                ti = ckpt.tensors[li.weight]
                if _lossy_shape_ok(ti.shape):
                    order.append((li.weight, li.module.rsplit(".", 1)[-1], b.index))
        if opts.lossy_embeddings:
            for nm, kind in ((plan.embedding, "embedding"), (None if plan.tied else plan.lm_head, "lm_head")):
                if nm is not None and _lossy_shape_ok(ckpt.tensors[nm].shape):
                    order.append((nm, kind, None))
    else:
        from aligncodec.lossy_compress import is_lossy_candidate, layer_type

        for nm, ti in ckpt.tensors.items():
            if is_lossy_candidate(nm, ti.dtype, ti.shape, lossy_embeddings=opts.lossy_embeddings):
                order.append((nm, layer_type(nm), None))
    if not order:
        raise ValueError(f"{model}: no tensor qualifies for lossy coding")
    n_params = ckpt.n_params

    # ---- spool: finished blocks survive a kill; --resume continues from them
    ident = {"input": input_fingerprint(ckpt), "options": opts.fingerprint()}
    sp_path = spool_dir(out)
    if resume:
        spool = Spool.open(sp_path, ident)
    else:
        if sp_path.exists():
            log(f"note: discarding the spool of an interrupted encode at {sp_path} (use --resume to continue it)")
        spool = None
    import shutil

    need = 3 * min(opts.bpw, 32.0) * n_params / 8 + (2 * opts.calib_tokens * 4 * _hidden(plan) if calibrate else 0) + (64 << 20)
    free = shutil.disk_usage(sp_path.parent).free
    if free < need:
        raise SpoolSpaceError(f"{sp_path.parent}: {free / 1e9:.2f} GB free, the encode needs about {need / 1e9:.2f} GB "
                              "(archive, its spool and the resume spool)")

    # ---- rate pass, with the checks of every lossy candidate before any work (as the whole
    # encoder's build_jobs): NaN/Inf is NonFiniteError naming every such tensor, or (nonfinite
    # "lossless") that tensor goes lossless; so do all-zero tensors, weights beyond the lossy
    # range, rms outside the rate grid, and every tensor when the target is beyond lossy coding
    # ---- calibration text, tokenized and checked against the model's vocabulary before any work
    data = None
    if calibrate and opts.bpw < E.LOSSY_MAX_BPW:
        data = calibration_windows(folder, opts, tokenizer)
        check_vocab(plan, ckpt, data.windows, lambda: _tokenizer_size(folder, tokenizer))

    had = any(c.startswith("hadamard") for c in opts.candidates)
    curves: dict[str, RateCurve] = {}
    lossless_why: dict[str, str] = {}  # lossy candidates coded lossless instead, with the reason
    bad: dict[str, int] = {}
    t_rate = time.perf_counter()

    def rate_one(item):
        """(non-finite count, why the tensor goes lossless or None, its rate curve or None)."""
        nm, kind, _b = item
        t = ckpt.get(nm)
        n_bad = E.count_nonfinite(t)
        if n_bad:
            bad[nm] = n_bad
            return n_bad, f"{n_bad} NaN/Inf values", None
        if opts.nonfinite == "error" and bad:
            return 0, None, None  # an error follows: no curve needed
        why = E.lossless_reason(t)
        if why is None and opts.bpw >= E.LOSSY_MAX_BPW:
            why = f"target {opts.bpw:g} bpw is beyond what lossy coding delivers (< {E.LOSSY_MAX_BPW:g} bpw)"
        curve = None
        if why is None:
            try:
                curve = measure_curve(nm, kind, t, had, opts.seed, E.TCQ_STEP_RATIO if opts.trellis else 1.0)
            except NonFiniteError as exc:  # finite, but no useful step on the grid
                why = str(exc)
        return 0, why, curve

    from aligncodec.codec import parallel

    rated = parallel.run_tasks([lambda o=o: rate_one(o) for o in order], parallel.inner_threads(), _worker_init)
    for (nm, _kind, _b), (n_bad, why, curve) in zip(order, rated):
        if curve is not None:
            curves[nm] = curve
        if why is not None:
            lossless_why[nm] = why
    del rated
    if bad and opts.nonfinite == "error":
        try:
            E.check_finite(bad)
        except E.NonFiniteError as exc:
            raise NonFiniteError(str(exc)) from None
    order = [o for o in order if o[0] not in lossless_why]
    t_rate = time.perf_counter() - t_rate
    log(f"rate pass: {len(curves)} tensors in {t_rate:.1f} s")
    if lossless_why:
        log(f"note: {len(lossless_why)} tensor(s) coded lossless instead of lossy: "
            + "; ".join(f"{n}: {w}" for n, w in list(lossless_why.items())[:3]) + (" ..." if len(lossless_why) > 3 else ""))
    lossy_names = {n for n, _, _ in order}
    kinds = {n: k for n, k, _ in order}
    linear_names = {n for n, k, _ in order if k not in ("embedding", "lm_head")}
    n_linear = sum(ckpt.tensors[n].numel for n in linear_names)
    if not order:
        calibrate = False  # nothing left to code lossy: no calibration, no rate control
    if spool is None:
        spool = Spool.create(sp_path, ident)

    # ---- calibration inputs (before any coding: a model that cannot run fails here)
    windows = None
    if calibrate:
        if data is None:
            data = calibration_windows(folder, opts, tokenizer)
            check_vocab(plan, ckpt, data.windows, lambda: _tokenizer_size(folder, tokenizer))
        windows = data.windows
        for path, cname in plan.outer.items():
            # the output projection is never run (its input is captured by a hook that stops there)
            if plan.lm_head_module and path.startswith(plan.lm_head_module + "."):
                continue
            A.set_param(plan.model, path, ckpt.float32(cname))
        hs, kws = record_block_inputs(plan, windows)
        for path, cname in plan.outer.items():  # the embedding is only needed for the inputs
            if cname in (plan.embedding, plan.lm_head):
                A.set_param(plan.model, path, None)
        log(f"calibration: {data.n_tokens} tokens in {len(windows)} windows")

    # ---- writer: lossless tensors and auxiliary files first (their bytes are then known)
    from aligncodec.auxfiles import AUX_PREFIX
    from aligncodec.codec.torch_interop import tensor_bytes

    from aligncodec import __version__

    meta = {"acz.tool": f"aligncodec {__version__}", **src_meta}
    src_model = archive._reference_model_of(src.root, src.files)
    if src_model:
        meta["acz.source_model"] = src_model
    w = ArchiveWriter(out, meta)

    def add_lossless(nm: str, dtype: str, shape: tuple, raw) -> tuple[tuple, int]:
        """Code ``raw`` (the tensor's bytes) losslessly into the archive: (its spool entry, its
        bytes in the file)."""
        mode, params, streams = lossless.encode(raw, dtype, int(np.prod(shape)))
        e = w.add(nm, dtype, shape, mode, streams, params)
        return (nm, dtype, shape, mode, params, streams), lossy.entry_bytes(nm, len(shape), len(params), e.size)

    try:
        other_bytes = 0
        for nm, ti in ckpt.tensors.items():
            if nm in lossy_names:
                continue
            raw = tensor_bytes(ckpt.get(nm))
            other_bytes += add_lossless(nm, ti.dtype, ti.shape, raw)[1]
            del raw
            if ti.numel >= 1 << 22:
                release_free_memory()
        for a in src.aux:
            data_b = a.read_bytes()
            other_bytes += add_lossless(AUX_PREFIX + a.name, "U8", (len(data_b),), data_b)[1]
        # bytes outside the entries: preamble, the metadata section (per-tensor results ≈ 150 bytes
        # each, recomputed exactly before the last tensor), final alignment
        overhead = _overhead(meta, 150 * len(order) + 1200)
        if opts.scope == "all":
            budget = opts.bpw * n_params / 8 - other_bytes - overhead
        else:
            budget = opts.bpw * n_linear / 8
            curves_ctl = {n: c for n, c in curves.items() if n in linear_names}
        # the output head (a tied embedding, or an untied lm_head) at head_step x the blocks' step
        head_name = None
        if plan is not None and opts.lossy_embeddings:
            head_name = plan.embedding if plan.tied else plan.lm_head
        head_step = opts.head_step
        if head_step is None:
            head_step = 1.0
            if opts.scope == "all" and head_name in curves:
                n_head = curves[head_name].numel
                head_step = auto_head_step(n_head, sum(c.numel for c in curves.values()) - n_head)
        offsets = {head_name: math.log2(head_step)} if head_name in curves and head_step != 1.0 else {}
        ctl = RateController(budget, curves if opts.scope == "all" else curves_ctl, offsets)
        if budget <= 0 and order:
            raise ValueError(f"--bpw {opts.bpw}: the lossless tensors alone take {8 * other_bytes / n_params:.3f} bits per parameter")

        coded: dict[str, Coded] = {}

        def metadata() -> dict[str, str]:
            per = {n: {"kind": c.kind, "bpw": round(8 * c.nbytes / ckpt.tensors[n].numel, 5),
                       "act_rel_err": float(f"{c.rel_err:.6g}"), "sqnr_db": round(c.sqnr_db, 3), "type": c.type,
                       "step": float(f"{c.step:.6g}")} for n, c in coded.items()}
            lin_bytes = sum(c.nbytes for n, c in coded.items() if n in linear_names)
            n_lin = sum(ckpt.tensors[n].numel for n in coded if n in linear_names)
            n_coded = sum(ckpt.tensors[n].numel for n in coded)
            modes: dict[str, int] = {}
            for c in coded.values():
                modes[c.kind] = modes.get(c.kind, 0) + 1
            summ = {"encoder": "stream", "target": {"bpw": opts.bpw, "scope": opts.scope}, "calibration": opts.calibration,
                    "calib_tokens": opts.calib_tokens if calibrate else 0,
                    "calib_text": hashlib.sha256(Path(opts.calib_text).read_bytes()).hexdigest() if opts.calib_text else "builtin",
                    "candidates": list(opts.candidates), "alpha": opts.alpha, "seed": opts.seed,
                    "quantizer": "ecsq" if not opts.trellis else f"tcq{lossy.TRELLIS_MACHINES[opts.trellis][0]}",
                    "steps": [float(f"{s:.6g}") for s in ctl.steps],
                    "step": float(f"{np.median(ctl.steps):.6g}") if ctl.steps else None,
                    "n_params": n_params, "n_lossy_weights": n_coded, "n_linear_weights": n_lin,
                    "bpw_linear_all_in": 8 * lin_bytes / max(1, n_lin),
                    "bpw_lossy_all_in": 8 * sum(c.nbytes for c in coded.values()) / max(1, n_coded), "modes": modes,
                    "nonfinite": opts.nonfinite, "lossless": dict(sorted(lossless_why.items())),
                    "head": head_name, "head_step": head_step, "head_step_given": opts.head_step is not None}
            return {**meta, "acz.lossy": json.dumps(per, sort_keys=True), "acz.lossy.summary": json.dumps(summ, sort_keys=True)}

        def exact_overhead(n_more: int) -> int:
            m = metadata()
            return _overhead(m, n_more * (len(m["acz.lossy"]) // max(1, len(coded)) + 2 if coded else 150))

        def put(nm: str, tc: E.TensorCode, x: float, unfit: str | None = None):
            """Write one coded tensor and check it (:func:`check_coded`); a code lossy coding
            cannot serve (``unfit``: clamped symbols, an underflowing step) is replaced by the
            tensor's lossless code, its bytes counted as spent."""
            ti = ckpt.tensors[nm]
            if unfit:
                lossless_why[nm] = unfit
                entry, nb = add_lossless(nm, ti.dtype, ti.shape, tensor_bytes(ckpt.get(nm)))
                if nm in ctl.curves:
                    if opts.scope == "all":
                        ctl.skip(nm, nbytes=nb)
                    else:
                        ctl.skip(nm, share=opts.bpw * ti.numel / 8)
                log(f"note: {nm} coded lossless instead of lossy: {unfit}")
                return entry
            e = w.add(nm, ti.dtype, ti.shape, tc.params.mode, tc.streams, tc.params.pack())
            check_coded(w, e, tc, ckpt, nm)
            nb = lossy.entry_bytes(nm, 2, lossy.PARAMS_SIZE, e.size)
            if nm in ctl.curves:
                ctl.record(nm, x, nb)
            coded[nm] = Coded(nm, tc.kind, float(tc.params.step), nb, float(tc.rel_err), float(tc.sqnr_db), kinds[nm])
            return (nm, ti.dtype, ti.shape, tc.params.mode, tc.params.pack(), tc.streams)

        # ---- block pass (finished blocks of an interrupted run come back from the spool)
        by_block: dict[int | None, list[str]] = {}
        for nm, _k, b in order:
            by_block.setdefault(b, []).append(nm)
        blocks_list = plan.blocks if (plan is not None and order) else []
        blocks_mod = A.get_module(plan.model, plan.blocks_path) if plan is not None else None
        done = 0
        if resume and spool.steps:
            for i in range(len(spool.steps)):
                pl = spool.load_step(i)
                for nm, dtype, shape, mode, params, streams in pl["entries"]:
                    w.add(nm, dtype, shape, mode, streams, params)
                for c in pl["coded"]:
                    coded[c["name"]] = Coded(**c)
                lossless_why.update(pl.get("lossless", {}))
            ctl.restore(pl["ctl"])
            done = len(spool.steps)
            if calibrate:
                hs = spool.load_acts()
            log(f"resume: {done} finished blocks from {spool.path}")
        from tqdm import tqdm

        dev = torch.device(opts.device) if opts.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if calibrate and dev.type != "cpu":
            kws = [[_to(kw, dev) for kw in per] for per in kws]
        # threads: a block's linears are coded side by side (all at the step solved before the block,
        # their results taken in order); with float calibration the next block's forward pass runs
        # beside them (its inputs are the unmodified model's: they do not wait for any coding)
        n_threads = opts.n_threads()
        pool = None
        if n_threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="acz-encode", initializer=_worker_init)
        lookahead = pool is not None and calibrate and opts.calibration == "float"

        def forward(b, hs_in):
            """Block ``b``'s weights in place and its calibration pass: (outputs, Σ, energies)."""
            energies: dict[str, float] = {}
            for path, cname in b.params.items():
                A.set_param(plan.model, path, ckpt.float32(cname).to(dev))
            cap = [(li.weight, A.get_module(plan.model, li.module)) for li in b.linears]
            outs, sig = run_block(blocks_mod[b.index], hs_in, kws[b.index], cap, dev,
                                  sigma_only=opts.calibration == "quantized", energy=energies)
            return outs, sig, energies

        bar = tqdm(total=len(blocks_list), initial=done, desc="blocks", unit="blk", disable=not progress, leave=False)
        cpu_mark = time.process_time()
        todo = blocks_list[done:]
        ahead = None  # the next block's forward pass, running in the pool

        def start(i: int) -> dict:
            """Block todo[i] under way: its calibration pass done (or taken from the pool), the
            following block's pass handed to the pool (float calibration), its step solved and
            its tensors handed to the pool (threads > 1) or left for ``results`` (one thread)."""
            nonlocal ahead
            b = todo[i]
            st: dict = {"b": b, "sig": {}, "energies": {}, "outs": None}
            if calibrate:
                st["outs"], st["sig"], st["energies"] = ahead.result() if ahead is not None else forward(b, hs)
                ahead = None
                if lookahead and i + 1 < len(todo):
                    ahead = pool.submit(forward, todo[i + 1], st["outs"])
            x = ctl.solve()
            ctl.steps.append(2.0**x)
            st["x"], st["cache"], st["names"] = x, {}, by_block.get(b.index, [])

            def work(nm, x=x, sig=st["sig"], cache=st["cache"], energies=st["energies"]):
                tc, job = code_tensor(nm, ckpt.float32(nm), ckpt.tensors[nm].dtype, sig.get(nm), 2.0**x, opts, cache,
                                      energy=energies.get(nm))
                return tc, job.unfit

            if pool is not None:
                futs = {nm: pool.submit(work, nm) for nm in _largest_first(st["names"], ckpt, st["sig"])}
                st["results"] = (futs[nm].result() for nm in st["names"])
            else:
                st["results"] = map(work, st["names"])
            return st

        try:
            cur = start(0) if todo else None
            for i in range(len(todo)):
                b, x, names, outs = cur["b"], cur["x"], cur["names"], cur["outs"]
                blk = blocks_mod[b.index]
                lin_by_w = {li.weight: li for li in b.linears}
                entries = []
                for nm, (tc, unfit) in zip(names, cur["results"]):
                    entries.append(put(nm, tc, x, unfit))
                    if calibrate and opts.calibration == "quantized" and not unfit:
                        A.set_param(plan.model, lin_by_w[nm].module + ".weight", torch.from_numpy(tc.W_hat).to(dev))
                    del tc
                cur["cache"].clear()
                if calibrate:
                    if opts.calibration == "quantized":
                        outs, _ = run_block(blk, hs, kws[b.index], None, dev)
                    hs = outs
                    for path in b.params:
                        A.set_param(plan.model, path, None)
                cur = None
                step = {"entries": entries, "ctl": ctl.state(), "coded": [asdict(coded[n]) for n in names if n in coded],
                        "lossless": {n: lossless_why[n] for n in names if n in lossless_why}}
                if pool is not None and i + 1 < len(todo):
                    cur = start(i + 1)  # the pool works on the next block while this one is saved
                spool.save_step(f"block{b.index}", step, hs if calibrate else None)
                del step, entries
                release_free_memory()
                if on_block is not None:  # tests: interrupt after a given block
                    on_block(b.index)
                bar.update(1)
                bar.set_postfix_str(f"step {2.0**x:.4g}, {8 * ctl.spent / max(1, sum(ckpt.tensors[n].numel for n in coded)):.3f} bpw, "
                                    f"peak RSS {_peak_rss_gb():.2f} GB, CPU {time.process_time() - cpu_mark:.1f} s")
                cpu_mark = time.process_time()
                if cur is None and i + 1 < len(todo):
                    cur = start(i + 1)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

        # ---- tensors outside the blocks (embeddings, lm_head; everything without a plan)
        rest = by_block.get(None, [])
        if rest:
            S_head = None
            if calibrate and plan.lm_head_module is not None and any(k == "lm_head" or (plan.tied and k == "embedding")
                                                                     for k in (kinds[n] for n in rest)):
                S_head = head_input_sigma(plan, windows, hs)
            hs = None
            for i, nm in enumerate(rest):
                S = None
                if calibrate and (nm == plan.lm_head or (plan.tied and nm == plan.embedding)):
                    S = S_head
                W = tensor_rows(ckpt, nm)
                dtype = ckpt.tensors[nm].dtype
                if nm not in ctl.curves:  # linear scope: lossy embeddings at the last step (the head at its multiple)
                    st = (ctl.steps[-1] if ctl.steps else 2.0 ** ctl.solve()) * (head_step if nm == head_name else 1.0)
                    tc, job = code_tensor(nm, W, dtype, S, st, opts, {}, keep_w_hat=False, candidates=outer_candidates(opts))
                    put(nm, tc, math.log2(st), job.unfit)
                    continue
                last = i == len(rest) - 1
                if last and opts.scope == "all":
                    ov = exact_overhead(1)
                    ctl.budget += overhead - ov
                    overhead = ov
                tol = FULL_TOL * (opts.bpw * n_params / 8 if opts.scope == "all" else ctl.budget)
                tc, x, unfit = _search_last(nm, W, dtype, S, ctl, opts, exact=last, log=log, tol_bytes=tol)
                log(f"{nm}: coded; peak RSS so far {_peak_rss_gb():.2f} GB")
                ctl.steps.append(2.0**x)
                put(nm, tc, x, unfit)
                del W, tc
                release_free_memory()
        # ---- metadata and close
        w.metadata.update(metadata())
        summ = json.loads(w.metadata["acz.lossy.summary"])
        w.close()
    except BaseException:
        if not w._closed:
            w._closed = True
            w._spool.close()
        raise
    finally:
        ckpt.close()
    spool.remove()
    fb = os.path.getsize(out)
    summ.update({"file_bytes": fb, "bpw_file": 8 * fb / n_params, "seconds_total": time.perf_counter() - t0,
                 "bpw_lossy_in_archive": summ["bpw_lossy_all_in"]})
    return summ


def _largest_first(names: list[str], ckpt: A.Checkpoint, sig: dict) -> list[str]:
    """The order a block's tensors are handed to the pool: the most work first (the block ends
    when its last tensor does), work ~ rows·n·(1 + n/1024) for an (rows × n) tensor (the column
    sweep's error feedback grows with n; SmolLM2: down_proj 576 × 1536 takes 1.45× the CPU of
    gate_proj 1536 × 576), and of equal work one whose input site (Σ) differs from the previous
    one's first (tensors of one site share the Cholesky factors, computed once: the second
    would wait for the first)."""
    def work(n):
        rows, cols = ckpt.tensors[n].shape[0], ckpt.tensors[n].shape[-1]
        return rows * cols * (1 + cols / 1024)

    left = sorted(names, key=lambda n: -work(n))  # stable: equal work in block order
    out: list[str] = []
    while left:
        prev = id(sig.get(out[-1])) if out and sig.get(out[-1]) is not None else None
        big = work(left[0])
        pick = next((n for n in left if work(n) == big and (sig.get(n) is None or id(sig.get(n)) != prev)), left[0])
        out.append(pick)
        left.remove(pick)
    return out


def _tokenizer_size(folder: Path, tokenizer) -> int | None:
    """len(tokenizer) of the given tokenizer, or of the folder's (for an error message only)."""
    try:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return len(tokenizer)
    except Exception:  # noqa: BLE001 - only a detail of the message
        return None


def _peak_rss_gb() -> float:
    """The process's peak resident set so far (getrusage; 0 where unavailable)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9
    except (ImportError, OSError):  # pragma: no cover - not POSIX
        return 0.0


def _hidden(plan) -> int:
    cfg = plan.config if plan is not None else None
    return int(getattr(cfg, "hidden_size", 0) or getattr(getattr(cfg, "text_config", None), "hidden_size", 0) or 4096)


def _overhead(meta: dict[str, str], extra_json: int) -> int:
    body = json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return PREAMBLE_SIZE + len(build_section(SECTION_METADATA, 0, body)) + extra_json + 32


def _search_last(nm, W, dtype, S, ctl: RateController, opts: StreamOptions, exact: bool, log,
                 tol_bytes: float = 0.0) -> tuple[E.TensorCode, float]:
    """Code a tensor outside the blocks at the controller's step; the last one (``exact``)
    absorbs what the controller missed. Its candidate is chosen on a row subsample, its step
    searched by secant on the bytes estimated from a subsample of ~SEARCH_ROWS rows (GPTQ rows
    are independent given H), then it is coded in full **once**; a second full code, at a step
    corrected by the measured ratio of full to estimated bytes, only if the first misses the
    target by more than ``tol_bytes``. The full code runs row chunk by row chunk and keeps no
    reconstruction: memory beyond the symbols is a few row chunks, whatever the tensor's size."""
    x = ctl.solve() + ctl.offset(nm)  # its own step: the common one times its multiple (the head's)
    rows = W.shape[0]
    job = E.TensorJob(nm, W, dtype, S, trellis=opts.trellis)
    E.build_candidates(job, outer_candidates(opts), alpha=opts.alpha, seed=opts.seed, cache={}, lazy=isinstance(W, E.RowView))
    try:
        def pick(z):
            if len(job.cands) > 1:
                return E.choose(job, 2.0**z, E.stride_for(rows, opts.sample_rows))[0]
            return job.cands[0]

        cand = pick(x)
        if not exact:
            tc = E.code_candidate(job, cand, 2.0**x, keep_w_hat=False)
            return tc, x, E.unfit_reason(tc, job)
        left = ctl.budget - ctl.spent
        stride = max(1, rows // SEARCH_ROWS)

        def estimate(z):
            return E.code_candidate(job, cand, 2.0**z, stride).bytes_all_in

        x = _secant_bytes(estimate, x, left, nm, log)
        c2 = pick(x)
        if c2.kind != cand.kind:  # the step moved enough to change the candidate: search again
            cand = c2
            x = _secant_bytes(estimate, x, left, nm, log)
        tc = E.code_candidate(job, cand, 2.0**x, keep_w_hat=False)
        log(f"{nm}: step {2.0**x:.4g} -> {tc.bytes_all_in} bytes in full (target {left:.0f})")
        if abs(tc.bytes_all_in - left) > tol_bytes and left > 0:
            # the subsample's estimate was biased: correct the target by the measured ratio
            ratio = tc.bytes_all_in / estimate(x)
            x2 = _secant_bytes(lambda z: ratio * estimate(z), x, left, nm, log)
            release_free_memory()
            tc2 = E.code_candidate(job, cand, 2.0**x2, keep_w_hat=False)
            log(f"{nm}: step {2.0**x2:.4g} -> {tc2.bytes_all_in} bytes in full (target {left:.0f})")
            if abs(tc2.bytes_all_in - left) < abs(tc.bytes_all_in - left):
                tc, x = tc2, x2
        return tc, x, E.unfit_reason(tc, job)
    finally:
        job.cands = []


def _secant_bytes(f, x: float, left: float, nm: str, log, tol: float = 0.001, max_iter: int = 12) -> float:
    """log2 step at which ``f`` (estimated bytes) meets ``left`` within ``tol``: secant on
    log2(bytes / left) (~1 bit per halving of the step); returns the best step seen."""
    if left <= 0:
        return x
    x0, f0 = x, math.log2(f(x) / left)
    best = (abs(f0), x0)
    x1 = x0 + f0
    for _ in range(max_iter):
        if best[0] <= tol * 1.4427:  # |log2 r| ≤ tol/ln 2 ⇔ |r − 1| ≲ tol
            break
        f1 = math.log2(f(x1) / left)
        if abs(f1) < best[0]:
            best = (abs(f1), x1)
        xn = x1 - f1 * (x1 - x0) / (f1 - f0) if f1 != f0 else x1 + f1
        x0, f0, x1 = x1, f1, xn
    log(f"{nm}: step {2.0**best[1]:.4g} by the subsample's estimate (target {left:.0f} bytes)")
    return best[1]
