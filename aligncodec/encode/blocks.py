"""Stage 4: the block pass.

For each decoder block: load its weights (float32), run the calibration activations through it
while accumulating Σ = E[x xᵀ] of each linear input (calibration.run_block), code each linear with
the per-tensor encoder (:mod:`aligncodec.codec.encoder`: candidate transforms chosen by
J = D + λR, GPTQ with the run's quantiser, codec/quant/registry.py) at the step the controller
solved before the block, write it (the writer spools to disk) and check it by decoding it
(:func:`check_coded`), then produce the next block's inputs and free the block.
``calibration="float"`` (the default) keeps the unmodified model's activations, so the next
block's forward pass runs beside this block's coding; ``"quantized"`` puts the *decoded* weights in
place and runs the block again (block L calibrated on the outputs of the already coded blocks).
On SmolLM2 at 3.0 bpw both give KLD 0.3095 and float the better perplexity
(docs/results/2026-11-30-stream-speed-memory.md). Every finished block goes to the resume spool.

Threads: a block's linears are coded side by side, biggest first (:func:`largest_first`), each
computed exactly as with one thread (library pools held at one thread, :func:`thread_limits`),
so the archive is the same bytes for every thread count.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict

import torch

from aligncodec.codec import encoder as E
from aligncodec.encode import arch as A
from aligncodec.encode.calibration import run_block
from aligncodec.formats.writer import ArchiveWriter

LAZY_MIN_ROWS = E.CHUNK_ROWS  # tensors with more rows (embeddings, lm_head) are read and coded a row chunk at a time


def tensor_rows(ckpt: A.Checkpoint, nm: str) -> "torch.Tensor | E.RowView":
    """The tensor in float32: whole for a small one; a :class:`E.RowView` reading row chunks
    from the checkpoint for one with more than LAZY_MIN_ROWS rows (no float32 copy of the
    whole tensor is ever held: the coder works one row chunk at a time)."""
    ti = ckpt.tensors[nm]
    if len(ti.shape) == 2 and ti.shape[0] > LAZY_MIN_ROWS:
        return E.RowView(lambda sl: ckpt.rows_float32(nm, sl), tuple(ti.shape))
    return ckpt.float32(nm)


VERIFY_RTOL = 1e-3  # relative tolerance of the decoded weight-domain error against the measured one


def check_coded(w: ArchiveWriter, entry, tc: E.TensorCode, ckpt: A.Checkpoint, nm: str, keep: dict | None = None) -> float:
    """The encoder's check of what it wrote, each tensor right after coding it: the entry's
    bytes are read back from the writer's spool, parsed and decoded
    by the CPU decoder, then compared, one row chunk at a time, bit for bit with the encoder's
    own reconstruction (where it was kept) and, in the weight domain, with the error the encoder
    measured (‖W − Ŵ‖² within VERIFY_RTOL). A mismatch is EncodeVerifyError (exit 8): the
    archive never gets its final name. Returns the decoded error. ``keep``: a dict that receives
    the decoded float32 weight under ``nm`` (--tune-norms)."""
    from aligncodec.codec.modes import release_decoder_scratch

    try:
        What = read_written(w, entry)
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
    if keep is not None:
        keep[nm] = What.to(torch.float32)
    del What
    release_decoder_scratch()  # the CPU decoder's pooled symbol buffers: not kept between tensors here
    want = tc.noise
    if not (math.isfinite(got) and abs(got - want) <= VERIFY_RTOL * max(want, 0.0) + 1e-30):
        raise E.EncodeVerifyError(f"tensor {nm!r} decodes with error {got:.6g}, the encoder measured {want:.6g}")
    return got


def code_tensor(name: str, W: "torch.Tensor | E.RowView", dtype: str, S: torch.Tensor | None, step: float, opts,
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


def worker_init() -> None:
    """A thread of the encoder's pool: one numba thread (numba's count is per calling thread;
    one thread selects the kernels' serial, GIL-free twins, rans.launch) and no fan-out of its
    own (parallel.inner_threads, and the decoder of check_coded, run inline in it)."""
    import numba

    from aligncodec.codec import parallel

    numba.set_num_threads(1)
    parallel.set_thread_default(1)


def largest_first(names: list[str], ckpt: A.Checkpoint, sig: dict) -> list[str]:
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


def peak_rss_gb() -> float:
    """The process's peak resident set so far (getrusage; 0 where unavailable)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9
    except (ImportError, OSError):  # pragma: no cover - not POSIX
        return 0.0


def resume_blocks(run, spool) -> int:
    """The finished blocks of an interrupted run back from the spool (their entries re-added to
    the writer; with --tune-norms also decoded again); returns how many."""
    from aligncodec.encode.state import Coded

    if not spool.steps:
        return 0
    for i in range(len(spool.steps)):
        pl = spool.load_step(i)
        for nm, dtype, shape, mode, params, streams in pl["entries"]:
            e = run.w.add(nm, dtype, shape, mode, streams, params)
            if run.decoded is not None and nm in run.lossy_names and nm not in pl.get("lossless", {}):
                run.decoded[nm] = read_written(run.w, e).to(torch.float32)
        for c in pl["coded"]:
            run.coded[c["name"]] = Coded(**c)
        run.lossless_why.update(pl.get("lossless", {}))
    run.ctl.restore(pl["ctl"])
    if run.calibrate:
        run.hs = spool.load_acts()
    run.log(f"resume: {len(spool.steps)} finished blocks from {spool.path}")
    return len(spool.steps)


def read_written(w: ArchiveWriter, entry) -> torch.Tensor:
    """An entry just written, read back from the writer's spool and decoded (its own dtype)."""
    from aligncodec.codec.modes import decode_entry
    from aligncodec.codec.torch_interop import bytes_to_tensor
    from aligncodec.formats.streams import parse_streams

    return bytes_to_tensor(entry, decode_entry(entry, parse_streams(w.read_back(entry), entry.stream_count)))


def block_pass(run, spool, *, resume: bool, on_block=None, progress: bool = True) -> None:
    """Stage 4 on a :class:`~aligncodec.encode.state.Run` (see the module doc)."""
    opts, ckpt, plan, ctl = run.opts, run.ckpt, run.plan, run.ctl
    calibrate = run.calibrate
    by_block: dict[int | None, list[str]] = {}
    for nm, _k, b in run.order:
        by_block.setdefault(b, []).append(nm)
    run.by_block = by_block
    blocks_list = plan.blocks if (plan is not None and run.order) else []
    blocks_mod = A.get_module(plan.model, plan.blocks_path) if plan is not None else None
    done = resume_blocks(run, spool) if resume else 0
    from tqdm import tqdm

    dev = torch.device(opts.device) if opts.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kws = run.kws
    if calibrate and dev.type != "cpu":
        kws = [[_to(kw, dev) for kw in per] for per in kws]
    # threads: a block's linears are coded side by side (all at the step solved before the block,
    # their results taken in order); with float calibration the next block's forward pass runs
    # beside them (its inputs are the unmodified model's: they do not wait for any coding)
    n_threads = opts.n_threads()
    pool = None
    if n_threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="acz-encode", initializer=worker_init)
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
            st["outs"], st["sig"], st["energies"] = ahead.result() if ahead is not None else forward(b, run.hs)
            ahead = None
            if lookahead and i + 1 < len(todo):
                ahead = pool.submit(forward, todo[i + 1], st["outs"])
        st["cache"], st["names"] = {}, by_block.get(b.index, [])
        x = ctl.solve()
        if opts.distortion is not None and st["names"]:
            x = probe_distortion(run, st["names"], st["sig"], st["energies"], st["cache"], x, pool)
        ctl.steps.append(2.0**x)
        st["x"] = x

        def work(nm, x=x, sig=st["sig"], cache=st["cache"], energies=st["energies"]):
            tc, job = code_tensor(nm, ckpt.float32(nm), ckpt.tensors[nm].dtype, sig.get(nm), 2.0**x, opts, cache,
                                  energy=energies.get(nm))
            return tc, job.unfit

        if pool is not None:
            futs = {nm: pool.submit(work, nm) for nm in largest_first(st["names"], ckpt, st["sig"])}
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
                entries.append(run.put(nm, tc, x, unfit))
                if calibrate and opts.calibration == "quantized" and not unfit:
                    A.set_param(plan.model, lin_by_w[nm].module + ".weight", torch.from_numpy(tc.W_hat).to(dev))
                del tc
            cur["cache"].clear()
            if calibrate:
                if opts.calibration == "quantized":
                    outs, _ = run_block(blk, run.hs, kws[b.index], None, dev)
                run.hs = outs
                for path in b.params:
                    A.set_param(plan.model, path, None)
            cur = None
            step = {"entries": entries, "ctl": ctl.state(), "coded": [asdict(run.coded[n]) for n in names if n in run.coded],
                    "lossless": {n: run.lossless_why[n] for n in names if n in run.lossless_why}}
            if pool is not None and i + 1 < len(todo):
                cur = start(i + 1)  # the pool works on the next block while this one is saved
            spool.save_step(f"block{b.index}", step, run.hs if calibrate else None)
            del step, entries
            release_free_memory()
            if on_block is not None:  # tests: interrupt after a given block
                on_block(b.index)
            bar.update(1)
            n_coded = max(1, sum(ckpt.tensors[n].numel for n in run.coded))
            bar.set_postfix_str(f"step {2.0**x:.4g}, {8 * ctl.spent / n_coded:.3f} bpw, "
                                f"peak RSS {peak_rss_gb():.2f} GB, CPU {time.process_time() - cpu_mark:.1f} s")
            cpu_mark = time.process_time()
            if cur is None and i + 1 < len(todo):
                cur = start(i + 1)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def probe_distortion(run, names, sig, energies, cache, x: float, pool) -> float:
    """A distortion target's step for one block: each of its tensors coded on its row subsample
    at the solved step (the candidate choice's own codes), their relative errors given to the
    controller (DistortionController.probe), the step solved again. Deterministic: the same
    step for any thread count."""
    opts, ckpt = run.opts, run.ckpt

    def one(nm):
        W = ckpt.float32(nm)
        job = E.TensorJob(nm, W, ckpt.tensors[nm].dtype, sig.get(nm), trellis=opts.trellis, energy=energies.get(nm))
        E.build_candidates(job, opts.candidates, alpha=opts.alpha, seed=opts.seed, cache=cache)
        try:
            return E.choose(job, 2.0**x, E.stride_for(W.shape[0], opts.sample_rows))[1].rel_err
        finally:
            job.cands = []

    rels = list(pool.map(one, names)) if pool is not None else [one(n) for n in names]
    run.ctl.probe({n: float(r) for n, r in zip(names, rels) if n in run.ctl.remaining}, x)
    return run.ctl.solve()


def _to(obj, dev):
    """``obj`` (tensors inside tuples, lists and dicts) moved to ``dev``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(x, dev) for x in obj)
    if isinstance(obj, dict):
        return {k: _to(v, dev) for k, v in obj.items()}
    return obj
