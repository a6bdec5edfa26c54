"""The lossy encoder (``aligncodec compress MODEL --bpw B`` or ``--distortion D``): memory set by
one decoder block, time linear in the parameters, the whole file's rate controlled.

Its stages, each a module of this package, in the order they run (GPTQ's own order; see
DESIGN.md §7 "upstream error"):

1. **plan** (:mod:`.plan`, :mod:`.arch`): the input checked, the model built on the meta device
   from its config, blocks and linears found, every parameter mapped to its checkpoint tensor;
   the coding order. Nothing is encoded before this succeeds.
2. **rate pass and rate control** (:mod:`.rate`): every lossy tensor read once, checked for
   NaN/Inf, its rate curve measured on a row subsample; the controller that turns the target
   into one common step before each block.
3. **calibration** (:mod:`.calibration`): the calibration windows embedded, every block's
   arguments recorded.
4. **block pass** (:mod:`.blocks`): per decoder block, Σ of each linear's input from the
   calibration activations, each linear coded (codec/encoder.py: candidate transforms by
   J = D + λR; the quantiser of codec/quant/registry.py inside GPTQ), written, decoded and checked.
5. **head** (:mod:`.head`): the embedding and lm_head, coded last at the head's own step; with a
   bpw target the last one's step searched on the real coder so the file lands on the target.
6. **tune** (:mod:`.tune`, optional ``--tune-norms``): the norms and biases fitted to the
   unmodified model with the lossy tensors frozen at their decoded values.

Before the blocks, the lossless tensors (norms, biases, small tensors) and the folder's auxiliary
files are coded, so their bytes are known to the controller. Finished blocks go to a resume
spool (:mod:`.spool`). ``EncodeOptions.scope="all"`` (default): B = (file bytes, auxiliary files
included) × 8 / every parameter; ``"linear"``: B = all-in bytes of the block linears × 8 / their
weights (the studies' definition; embeddings lossless).
"""

from __future__ import annotations

import json
import os
import sys
import time

from aligncodec.encode.options import CALIB_MODES, SCOPES, EncodeOptions, StreamOptions

__all__ = ["encode", "encode_stream", "EncodeOptions", "StreamOptions", "CALIB_MODES", "SCOPES"]


def encode(model: str | os.PathLike, out: str | os.PathLike, opts: EncodeOptions, *, progress: bool = True,
           tokenizer=None, resume: bool = False, on_block=None, follow_symlinks: bool = False) -> dict:
    """Encode ``model`` (a reference model's name, a safetensors file or a model folder) into the
    archive ``out``. Returns the summary (also stored in the archive's ``acz.lossy.summary``).

    Runs on ``opts.n_threads()`` threads (default: every core). Each library's own thread pool
    (torch's intra-op pool, numba's kernels, numpy's BLAS) is held at one thread
    (:func:`.blocks.thread_limits`) and the parallel work is whole tasks, each computed exactly as
    with one thread: a block's linears, the next block's calibration forward pass (float
    calibration), the rate pass's tensors, the row chunks of a tall tensor (a wavefront for
    tcq). The archive is therefore the same bytes for every thread count."""
    from aligncodec.codec import parallel
    from aligncodec.encode.blocks import thread_limits

    with thread_limits(1), parallel.threads_override(opts.n_threads()):
        return _encode(model, out, opts, progress=progress, tokenizer=tokenizer, resume=resume, on_block=on_block,
                       follow_symlinks=follow_symlinks)


encode_stream = encode  # the name before 2026-12-08


def _encode(model, out, opts: EncodeOptions, *, progress: bool, tokenizer, resume: bool, on_block,
            follow_symlinks: bool) -> dict:
    from aligncodec.codec.quant import registry as Q
    from aligncodec.encode import blocks, calibration, head, plan, rate, spool as SP, tune
    from aligncodec.encode.state import Run

    log = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    t0 = time.perf_counter()
    run = Run(opts, log, quantizer=Q.by_trellis(opts.trellis))
    plan.plan(run, model, follow_symlinks)  # ---- 1. plan
    if opts.tune is not None:
        tune.check_inputs(run, tokenizer)  # a tokenizer and enough text for --tune-norms, before any coding
    try:
        ident = {"input": SP.input_fingerprint(run.ckpt), "options": opts.fingerprint()}
        sp_path = SP.spool_dir(out)
        if resume:
            spool = SP.Spool.open(sp_path, ident)
        else:
            if sp_path.exists():
                log(f"note: discarding the spool of an interrupted encode at {sp_path} (use --resume to continue it)")
            spool = None
        SP.check_space(run, sp_path)
        # the calibration text, tokenized and checked against the model's vocabulary before any work
        if run.calibrate and not opts.beyond_lossy():
            calibration.load_windows(run, tokenizer)
        t_rate = time.perf_counter()
        rate.rate_pass(run)  # ---- 2. rate pass
        log(f"rate pass: {len(run.curves)} tensors in {time.perf_counter() - t_rate:.1f} s")
        if run.lossless_why:
            log(f"note: {len(run.lossless_why)} tensor(s) coded lossless instead of lossy: "
                + "; ".join(f"{n}: {w}" for n, w in list(run.lossless_why.items())[:3])
                + (" ..." if len(run.lossless_why) > 3 else ""))
        if not run.order:
            run.calibrate = False  # nothing left to code lossy: no calibration, no rate control
        if spool is None:
            spool = SP.Spool.create(sp_path, ident)
        if run.calibrate:
            calibration.calibration_inputs(run, tokenizer)  # ---- 3. calibration (a model that cannot run fails here)
        _open_writer(run, out)
        try:
            other_bytes = _write_lossless(run)
            # bytes outside the entries: preamble, the metadata section (per-tensor results ≈ 150
            # bytes each, recomputed exactly before the last tensor), final alignment
            from aligncodec.encode.state import overhead_bytes

            run.overhead = overhead_bytes(run.meta, 150 * len(run.order) + 1200)
            if opts.scope == "all":
                budget = (opts.bpw or 0.0) * run.n_params / 8 - other_bytes - run.overhead
            else:
                budget = (opts.bpw or 0.0) * sum(run.ckpt.tensors[n].numel for n in run.linear_names) / 8
            run.ctl = rate.make_controller(run, budget, head.head_offsets(run))
            if opts.bpw is not None and budget <= 0 and run.order:
                raise ValueError(f"--bpw {opts.bpw}: the lossless tensors alone take "
                                 f"{8 * other_bytes / run.n_params:.3f} bits per parameter")
            blocks.block_pass(run, spool, resume=resume, on_block=on_block, progress=progress)  # ---- 4. block pass
            head.head_pass(run)  # ---- 5. head
            extra = {}
            if opts.tune is not None:  # ---- 6. tune (optional)
                extra["tune_norms"] = tune.tune_stage(run, tokenizer)
            run.w.metadata.update(run.metadata(extra))
            summ = json.loads(run.w.metadata["acz.lossy.summary"])
            run.w.close()
        except BaseException:
            run.w.abort()
            raise
    finally:
        run.ckpt.close()
    spool.remove()
    fb = os.path.getsize(out)
    summ.update({"file_bytes": fb, "bpw_file": 8 * fb / run.n_params, "seconds_total": time.perf_counter() - t0,
                 "bpw_lossy_in_archive": summ["bpw_lossy_all_in"]})
    return summ


def _open_writer(run, out) -> None:
    from aligncodec import __version__, archive
    from aligncodec.formats.writer import ArchiveWriter

    run.meta = {"acz.tool": f"aligncodec {__version__}", **run.src_meta}
    src_model = archive._reference_model_of(run.src.root, run.src.files)
    if src_model:
        run.meta["acz.source_model"] = src_model
    run.w = ArchiveWriter(out, run.meta)
    if run.opts.tune is not None:
        run.decoded = {}


def _write_lossless(run) -> int:
    """Every tensor that is not coded lossy, and the folder's auxiliary files, coded losslessly
    into the archive first (their bytes are then known); returns their bytes in the file. With
    --tune-norms the tunable 1-D tensors are coded to count their bytes but written after tuning."""
    import numpy as np

    from aligncodec.auxfiles import AUX_PREFIX
    from aligncodec.codec.modes import lossless, lossy
    from aligncodec.codec.torch_interop import tensor_bytes
    from aligncodec.encode.blocks import release_free_memory
    from aligncodec.formats.writer import serialize_streams

    deferred = set()
    if run.opts.tune is not None:
        from aligncodec.encode.tune import tunable_names

        deferred = tunable_names(run)
    lossy_names = run.lossy_names
    other = 0
    for nm, ti in run.ckpt.tensors.items():
        if nm in lossy_names:
            continue
        raw = tensor_bytes(run.ckpt.get(nm))
        if nm in deferred:  # counted as their code stored raw: tuned values are rarely as compressible as the
            mode, params, streams = lossless.encode(raw, ti.dtype, int(np.prod(ti.shape)))  # originals (SmolLM2's
            run.deferred[nm] = True  # norms: 78 KB more than their original code), so the file lands on or below B
            size = max(len(serialize_streams(streams)), raw.nbytes + 64)
            other += lossy.entry_bytes(nm, len(ti.shape), len(params), size)
        else:
            other += run.add_lossless(nm, ti.dtype, ti.shape, raw)[1]
        del raw
        if ti.numel >= 1 << 22:
            release_free_memory()
    for a in run.src.aux:
        data_b = a.read_bytes()
        other += run.add_lossless(AUX_PREFIX + a.name, "U8", (len(data_b),), data_b)[1]
    return other
