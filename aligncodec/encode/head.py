"""Stage 5: the head — the tensors outside the blocks (the embedding, an untied lm_head; every
tensor of a checkpoint without a model plan), coded last.

The output projection's input Σ (after the final norm) is captured from the last block's
outputs (calibration.head_input_sigma); a tied embedding is coded with that Σ (it *is* the output
projection), an untied one with weight MSE. The output head (a tied embedding, or an untied
lm_head) gets its own step, M × the blocks' (``EncodeOptions.head_step``; default
:func:`auto_head_step`, the balance of marginal KL per byte between the head and the other
tensors, docs/lossy-encoder.md "The output head's step"). With a bpw target the last tensor's step
is searched on the real coder (:func:`search_last`) so that the file lands on the target.
"""

from __future__ import annotations

import math

from aligncodec.codec import encoder as E
from aligncodec.encode import blocks
from aligncodec.encode.blocks import peak_rss_gb, release_free_memory

# The output head's step multiple when not given (EncodeOptions.head_step None): the balance of
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
SEARCH_ROWS = 4096  # rows of the subsample on which the last tensor's step is searched
FULL_TOL = 0.0025  # the last tensor is coded again if its full code misses the file target by more


def outer_candidates(opts) -> tuple[str, ...]:
    """The candidates of the tensors outside the blocks (embeddings, lm_head)."""
    return tuple(opts.candidates) + tuple(c for c in OUTER_EXTRA_CANDIDATES if c not in opts.candidates)


def auto_head_step(n_head: int, n_others: int) -> float:
    """The head's step multiple m from the parameter ratio r = n_head / n_others (see the note
    above BLOCK_KL_SLOPE): SmolLM2-135M (r = 0.27) 0.62, Gemma-3-270M (r = 1.67) 1.11."""
    if n_head <= 0 or n_others <= 0:
        return 1.0
    beta = BLOCK_KL_SLOPE * (n_head / n_others) / math.log(2)
    return float(min(max((beta / 2) ** (1 / (2 + beta)), HEAD_STEP_RANGE[0]), HEAD_STEP_RANGE[1]))


def head_offsets(run) -> dict[str, float]:
    """The output head's name and step multiple on the run, and the controller's offsets
    (log2 of each tensor's multiple of the common step)."""
    opts, plan, curves = run.opts, run.plan, run.curves
    run.head_name = None
    if plan is not None and opts.lossy_embeddings:
        run.head_name = plan.embedding if plan.tied else plan.lm_head
    m = opts.head_step
    if m is None:
        m = 1.0
        if (opts.scope == "all" or opts.distortion is not None) and run.head_name in curves:
            n_head = curves[run.head_name].numel
            m = auto_head_step(n_head, sum(c.numel for c in curves.values()) - n_head)
    run.head_step = m
    return {run.head_name: math.log2(m)} if run.head_name in curves and m != 1.0 else {}


def head_pass(run) -> None:
    """Stage 5 on a :class:`~aligncodec.encode.state.Run` (see the module doc)."""
    from aligncodec.encode.calibration import head_input_sigma

    opts, plan, ctl, ckpt = run.opts, run.plan, run.ctl, run.ckpt
    rest = run.by_block.get(None, [])
    if not rest:
        return
    kinds = run.kinds
    S_head = None
    if run.calibrate and plan.lm_head_module is not None and any(k == "lm_head" or (plan.tied and k == "embedding")
                                                                 for k in (kinds[n] for n in rest)):
        S_head = head_input_sigma(plan, run.windows, run.hs)
    run.hs = None
    by_bytes = opts.distortion is None
    for i, nm in enumerate(rest):
        S = None
        if run.calibrate and (nm == plan.lm_head or (plan.tied and nm == plan.embedding)):
            S = S_head
        W = blocks.tensor_rows(ckpt, nm)
        dtype = ckpt.tensors[nm].dtype
        if nm not in ctl.curves:  # linear scope: lossy embeddings at the last step (the head at its multiple)
            st = (ctl.steps[-1] if ctl.steps else 2.0 ** ctl.solve()) * (run.head_step if nm == run.head_name else 1.0)
            tc, job = blocks.code_tensor(nm, W, dtype, S, st, opts, {}, keep_w_hat=False, candidates=outer_candidates(opts))
            run.put(nm, tc, math.log2(st), job.unfit)
            continue
        last = by_bytes and i == len(rest) - 1
        if last and opts.scope == "all":
            ov = run.exact_overhead(1)
            ctl.budget += run.overhead - ov
            run.overhead = ov
        tol = FULL_TOL * (opts.bpw * run.n_params / 8 if opts.scope == "all" else ctl.budget) if by_bytes else 0.0
        tc, x, unfit = search_last(nm, W, dtype, S, ctl, opts, exact=last, log=run.log, tol_bytes=tol)
        run.log(f"{nm}: coded; peak RSS so far {peak_rss_gb():.2f} GB")
        ctl.steps.append(2.0**x)
        run.put(nm, tc, x, unfit)
        del W, tc
        release_free_memory()


def search_last(nm, W, dtype, S, ctl, opts, exact: bool, log,
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
        if hasattr(ctl, "probe"):  # a distortion target: the tensor's error on its subsample, then the step again
            stride = E.stride_for(rows, opts.sample_rows)
            ctl.probe({nm: float(E.code_candidate(job, cand, 2.0**x, stride, keep_w_hat=False).rel_err)}, x - ctl.offset(nm))
            x = ctl.solve() + ctl.offset(nm)
            cand = pick(x)
        if not exact:
            tc = E.code_candidate(job, cand, 2.0**x, keep_w_hat=False)
            return tc, x, E.unfit_reason(tc, job)
        left = ctl.budget - ctl.spent
        stride = max(1, rows // SEARCH_ROWS)

        def estimate(z):
            return E.code_candidate(job, cand, 2.0**z, stride).bytes_all_in

        x = secant_bytes(estimate, x, left, nm, log)
        c2 = pick(x)
        if c2.kind != cand.kind:  # the step moved enough to change the candidate: search again
            cand = c2
            x = secant_bytes(estimate, x, left, nm, log)
        tc = E.code_candidate(job, cand, 2.0**x, keep_w_hat=False)
        log(f"{nm}: step {2.0**x:.4g} -> {tc.bytes_all_in} bytes in full (target {left:.0f})")
        if abs(tc.bytes_all_in - left) > tol_bytes and left > 0:
            # the subsample's estimate was biased: correct the target by the measured ratio
            ratio = tc.bytes_all_in / estimate(x)
            x2 = secant_bytes(lambda z: ratio * estimate(z), x, left, nm, log)
            release_free_memory()
            tc2 = E.code_candidate(job, cand, 2.0**x2, keep_w_hat=False)
            log(f"{nm}: step {2.0**x2:.4g} -> {tc2.bytes_all_in} bytes in full (target {left:.0f})")
            if abs(tc2.bytes_all_in - left) < abs(tc.bytes_all_in - left):
                tc, x = tc2, x2
        return tc, x, E.unfit_reason(tc, job)
    finally:
        job.cands = []


def secant_bytes(f, x: float, left: float, nm: str, log, tol: float = 0.001, max_iter: int = 12) -> float:
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
