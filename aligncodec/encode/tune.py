"""Stage 6 (optional, ``--tune-norms``): fit the losslessly stored 1-D parameters (norm gains, norm and linear
biases) of a lossy-coded causal LM to the unmodified model, in the style of norm tweaking.

Every lossy weight is frozen at the value the decoder reconstructs (``TensorCode.W_hat``);
the free parameters are every floating-point 1-D parameter of the model (they go through
the lossless coder whatever their value). The objective is the mean over calibration
positions of KL(P_ref ‖ Q), P_ref the unmodified model's next-token distribution, Q the
quantised model's, on the built-in calibration half of the text (or a given text), cut
into protocol windows (BOS + up to ``window`` − 1 tokens). Adam, one window per step, a
step size relative to each tensor's RMS.

Held-out check (``val_tokens``, default 1,024): the calibration tokens that follow the
training tokens are held out. Every ``VAL_EVERY`` steps and at the end the KL on them is
measured, and the values of the best such check are the result (early stopping); they are
kept only if, rounded to the checkpoint's dtype, they lower the held-out KL (else the
originals are kept and ``info["kept"]`` is False). Without a hold-out (``val_tokens`` 0) the
rounded values must lower the KL over the training windows instead. On Gemma-3-270M, 16 steps
of 2,048 tokens without a hold-out lowered the calibration KL from 0.194 to 0.112 and raised
the evaluation KLD by 9.5 % (docs/results/2026-12-01-table32k-final.md): the check is there for
that. The archive stores the values losslessly: the format and the decoder change nothing.

Cost: one reference forward pass over the calibration and held-out tokens (log-probabilities
kept in float16), ``steps`` forward + backward passes of one window, and a forward pass over
the held-out windows every ``VAL_EVERY`` steps; ``minutes`` caps the optimisation loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch


@dataclass
class TuneOptions:
    steps: int = 32  # optimiser steps (one window each)
    tokens: int = 4096  # calibration tokens (BOS excluded)
    window: int = 512  # positions per window, BOS included
    lr: float = 2e-3  # Adam step, relative to each tensor's RMS
    minutes: float | None = None  # time budget of the optimisation loop (None: no limit)
    calib_text: str | None = None  # a text file instead of the built-in calibration half
    threads: int | None = None  # torch threads (None: leave as is)
    val_tokens: int = 1024  # held-out calibration tokens after the training ones (0: no hold-out)

    def __post_init__(self):
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise ValueError(f"tune-norms steps must be an integer >= 0, not {self.steps!r}")
        if not (isinstance(self.tokens, int) and self.tokens >= 1):
            raise ValueError(f"tune-norms tokens must be an integer >= 1, not {self.tokens!r}")
        if not (isinstance(self.val_tokens, int) and self.val_tokens >= 0):
            raise ValueError(f"tune-norms val_tokens must be an integer >= 0, not {self.val_tokens!r}")
        if not (isinstance(self.window, int) and self.window >= 2):
            raise ValueError(f"tune-norms window must be an integer >= 2, not {self.window!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"tune-norms lr must be a positive finite number, not {self.lr!r}")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise ValueError(f"tune-norms minutes must be a positive finite number, not {self.minutes!r}")


class TuneError(RuntimeError):
    """The model cannot be tuned (not a causal LM transformers can build, no tokenizer, names that
    do not match the model)."""


def load_model(folder: Path):
    """The unmodified float32 causal LM of a checkpoint folder, in eval mode."""
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - one named error with the cause attached
        raise TuneError(f"{folder}: cannot build the causal LM to tune its norms ({type(exc).__name__}: {exc})") from exc
    return model.eval()


VAL_EVERY = 4  # optimiser steps between two held-out checks


def calibration_windows(folder: Path, opts: TuneOptions, tokenizer=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(training windows, held-out windows): the first ``opts.tokens`` calibration tokens, and
    the ``opts.val_tokens`` that follow them in windows of their own (none if 0)."""
    from aligncodec.tools.eval.evaluate import EvalError, make_windows

    if tokenizer is None:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # noqa: BLE001
            raise TuneError(f"{folder}: no tokenizer for the calibration text ({type(exc).__name__}: {exc})") from exc
    text = Path(opts.calib_text).read_text(encoding="utf-8") if opts.calib_text else None
    try:
        train = make_windows(tokenizer, opts.tokens, "calib", opts.window, text=text).windows
        val = []
        if opts.val_tokens:
            skip = len(train) * (opts.window - 1)  # the held-out windows start after the last training window
            val = make_windows(tokenizer, skip + opts.val_tokens, "calib", opts.window, text=text).windows[len(train):]
    except EvalError as exc:
        raise TuneError(f"calibration text: {exc} (tune-norms needs tokens + val_tokens of it)") from None
    return train, val


def tunable(model, lossy_names) -> dict[str, torch.nn.Parameter]:
    """Every floating-point 1-D parameter that is not coded lossy, by name."""
    lossy_names = set(lossy_names)
    return {n: p for n, p in model.named_parameters() if p.ndim == 1 and p.is_floating_point() and n not in lossy_names}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids[None], use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0])[0, :-1].float()


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(P_ref ‖ Q) (nats)."""
    logq = torch.log_softmax(logits, dim=-1)
    ref = ref_logp.float()
    return (ref.exp() * (ref - logq)).sum()


def _mean_kl(model, windows, refs) -> float:
    tot, n = 0.0, 0
    with torch.no_grad():
        for w, r in zip(windows, refs):
            tot += float(_kl(r, _logits(model, w)))
            n += r.shape[0]
    return tot / n


def tune_norms(folder: Path, decoded: dict[str, torch.Tensor | np.ndarray], dtypes: dict[str, torch.dtype],
               opts: TuneOptions, *, tokenizer=None, progress: Callable[[str], None] | None = None,
               model=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tune the free 1-D parameters of the model in ``folder`` with the lossy weights frozen at
    ``decoded`` (name -> decoded float32 weight). ``dtypes``: name -> the checkpoint dtype each
    free tensor is stored in (values are rounded to it). ``model``: the unmodified float32 model,
    if already loaded (it is modified in place into the quantised model).

    Returns ``(tuned, info)``: ``tuned`` maps names to tuned tensors in their checkpoint dtype,
    empty when tuning did not lower the calibration KL; ``info`` has the KL before and after,
    steps, seconds."""
    say = progress or (lambda m: None)
    t0 = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model = load_model(folder) if model is None else model.eval()
    windows, val = calibration_windows(folder, opts, tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    # reference log-probabilities of the unmodified model, float16
    refs, val_refs = [], []
    with torch.no_grad():
        for ws, rs in ((windows, refs), (val, val_refs)):
            for w in ws:
                rs.append(torch.log_softmax(_logits(model, w), dim=-1).to(torch.float16))
    t_ref = time.perf_counter() - t0
    # freeze the lossy weights at their decoded values
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, W in decoded.items():
        p = params.get(name)
        if p is None:
            raise TuneError(f"lossy tensor {name!r} is not a parameter of the model")
        Wt = torch.as_tensor(W, dtype=torch.float32)
        if tuple(Wt.shape) != tuple(p.shape):
            raise TuneError(f"lossy tensor {name!r}: decoded shape {tuple(Wt.shape)} != model shape {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(Wt)
    free = tunable(model, decoded)
    missing = [n for n in free if n not in dtypes]
    if missing:
        raise TuneError(f"free parameters not in the checkpoint: {missing[:3]}")
    orig = {n: p.detach().clone() for n, p in free.items()}
    kl0 = _mean_kl(model, windows, refs)
    val0 = _mean_kl(model, val, val_refs) if val else None
    best = (val0, 0, orig)  # (held-out KL, step, values) of the best check so far: step 0 = untuned
    say(f"tune-norms: {len(free)} tensors, {sum(p.numel() for p in free.values()):,} values; "
        f"{sum(len(w) - 1 for w in windows):,} calibration tokens in {len(windows)} windows; KL before {kl0:.5f}"
        + (f"; held out {sum(len(w) - 1 for w in val):,} tokens, KL {val0:.5f}" if val else ""))

    def check(step: int) -> None:
        nonlocal best
        v = _mean_kl(model, val, val_refs)
        if v < best[0]:
            best = (v, step, {n: p.detach().clone() for n, p in free.items()})
    groups = []
    for n, p in free.items():
        rms = float(p.detach().double().pow(2).mean().sqrt())
        groups.append({"params": [p], "lr": opts.lr * max(rms, 1e-2)})
        p.requires_grad_(True)
    optim = torch.optim.Adam(groups, betas=(0.9, 0.99))
    t_loop = time.perf_counter()
    rng = np.random.default_rng(0)
    order: list[int] = []
    steps = 0
    losses = []
    model.train(False)
    while steps < opts.steps:
        if opts.minutes is not None and time.perf_counter() - t_loop > 60 * opts.minutes:
            break
        if not order:
            order = list(rng.permutation(len(windows)))
        i = order.pop()
        optim.zero_grad(set_to_none=True)
        loss = _kl(refs[i], _logits(model, windows[i])) / refs[i].shape[0]
        loss.backward()
        optim.step()
        steps += 1
        losses.append(float(loss.detach()))
        if val and steps % VAL_EVERY == 0:
            check(steps)
        if steps % 8 == 0:
            say(f"tune-norms step {steps}: window KL {np.mean(losses[-8:]):.5f}"
                + (f", best held-out KL {best[0]:.5f} (step {best[1]})" if val else ""))
    for p in free.values():
        p.requires_grad_(False)
    if val and steps % VAL_EVERY:
        check(steps)
    tuned = {}
    with torch.no_grad():
        for n, p in free.items():
            t = (best[2][n] if val else p.detach()).to(dtypes[n])  # early stopping: the best check's values
            p.copy_(t.to(torch.float32))
            tuned[n] = t
    kl1 = _mean_kl(model, windows, refs)
    val1 = _mean_kl(model, val, val_refs) if val else None
    kept = (val1 < val0) if val else (kl1 < kl0)
    if not kept:
        tuned = {}
        with torch.no_grad():
            for n, p in free.items():
                p.copy_(orig[n])
    changed = sum(int((tuned[n].to(torch.float32) != orig[n]).sum()) for n in tuned)
    info = {"kl_calib_before": kl0, "kl_calib_after": kl1, "kl_val_before": val0, "kl_val_after": val1,
            "best_step": best[1] if val else steps, "val_tokens": sum(len(w) - 1 for w in val),
            "kept": bool(kept), "steps": steps,
            "tokens": sum(len(w) - 1 for w in windows), "window": opts.window, "lr": opts.lr,
            "n_tensors": len(free), "n_values_changed": changed,
            "seconds_reference": t_ref, "seconds_loop": time.perf_counter() - t_loop,
            "seconds_total": time.perf_counter() - t0}
    say(f"tune-norms: KL on the calibration windows {kl0:.5f} -> {kl1:.5f}"
        + (f", held out {val0:.5f} -> {val1:.5f} (values of step {best[1]})" if val else "")
        + f" ({'kept' if kept else 'not kept'}), {steps} steps, {info['seconds_total']:.0f} s")
    return tuned, info


def tunable_names(run) -> set[str]:
    """Checkpoint tensors ``--tune-norms`` may change: every floating-point 1-D tensor that is not
    coded lossy (the model's free parameters; :func:`tunable` checks them against the model)."""
    from aligncodec.codec.modes import lossy

    lossy_names = run.lossy_names
    return {n for n, ti in run.ckpt.tensors.items() if len(ti.shape) == 1 and ti.dtype in lossy.LOSSY_DTYPES
            and n not in lossy_names}


def check_inputs(run, tokenizer=None) -> None:
    """Before any coding: the model folder has a tokenizer and enough calibration text for the
    tuning and its hold-out (TuneError otherwise)."""
    calibration_windows(run.folder, run.opts.tune, tokenizer)


def tune_stage(run, tokenizer=None) -> dict:
    """Stage 6 on a :class:`~aligncodec.encode.state.Run`: the deferred 1-D tensors fitted with
    every lossy tensor frozen at its decoded value (``run.decoded``, filled by the checks of the
    block pass and the head), then written losslessly (the fitted values when the held-out check
    keeps them, else the originals). Returns the tuning summary."""
    from aligncodec.codec.torch_interop import tensor_bytes, torch_dtype

    dtypes = {n: torch_dtype(run.ckpt.tensors[n].dtype) for n in run.ckpt.tensors}
    decoded = {n: W for n, W in run.decoded.items() if n not in run.lossless_why}
    tuned, info = tune_norms(run.folder, decoded, dtypes, run.opts.tune, tokenizer=tokenizer, progress=run.log)
    run.decoded = None
    for nm in sorted(run.deferred):
        ti = run.ckpt.tensors[nm]
        raw = tensor_bytes(tuned[nm]) if nm in tuned else tensor_bytes(run.ckpt.get(nm))
        run.add_lossless(nm, ti.dtype, ti.shape, raw)
    run.deferred.clear()
    return info
