"""GPU check and benchmark of the CUDA decoders: one command, a JSON report (a few minutes on an H100/H200).

    python -m aligncodec.tools.bench.bench_gpu [--json OUT] [--rows 4096 --cols 4096] [--repeat 20]
                                                [--layouts 16384x1,131072x32] [--archive A.acz ...]

1. Bit-exactness on the GPU first, every case against the CPU decoder (nothing is timed
   unless its output was checked):
   - rANS symbols, chunked (coder 2) and interleaved lanes (coder 3), shared- and
     global-memory slot tables; a corrupt chunk gives the CPU's CorruptStreamError;
   - float-split bf16 / fp16 / fp32 tensors through the loader's decode_tensor, both layouts;
   - lossy ``ecsq`` (spec §7.4) reconstructed on the device: every golden vector of
     spec/vectors/lossy, random tensors of every shape class (identity / hadamard, power-of-two
     and odd m, K = 1 and K > 1 on either axis, with and without column scales, F32/F16/BF16),
     rows longer than the shared-memory segment (global butterfly stages); the same shape classes
     as lossy ``tcq`` (spec §7.6, each state machine: the level kernel, then ecsq's);
   - the streaming loader with device="cuda" on an archive mixing both layouts and both kinds;
   - ``--archive``: every tensor of the given archives (e.g. the SmolLM2 3-bpw lossy archive and
     the fp16 lossless one), GPU against CPU.
2. Throughput in GB/s of reconstructed bf16 (2 bytes per weight), CUDA-event timed, best and
   median of ``--repeat`` runs, for a rows x cols layer in each layout of ``--layouts``:
   - lossless bf16 float-split: kernels only (compressed data already staged on the device)
     and from host bytes (staging, one copy in, kernels, one status copy back);
   - lossy ecsq bf16 (hadamard, column scales, 4 row classes; m = 1 and m = 3, the latter with
     rows longer than the shared segment): kernels only (streams and tables already on the
     device), and from host streams to the bf16 tensor on the device; lossy tcq bf16 (64 states,
     the default lossy mode) at the first shape, the same two timings (``--no-kernels``: none of these);
   - ``--archive`` and ``--synth SIZE:LAYERS[:noembed][:lossless]`` (a stand-in lossy archive of synth_checkpoint's
     widths, tools/bench/synth_archive.py, written first): the whole archive through
     load_state_dict(device="cuda") (the batched GPU path) checked against the CPU decoder, then
     timed, wall time from a warm page cache, in GB/s of bf16 (2 bytes per weight) and of the
     archive's own dtypes (``GBps_own_dtype_*``), beside the CPU decoder's load with
     ``--cpu-threads`` (default every core) on the same machine (``gpu_over_cpu``).
Exit status 2 without a CUDA device or when numba cannot compile a kernel (CudaUnavailableError,
e.g. numba-cuda 0.30.4 with numpy 2.5).
Exit status 0 only if every bit-exactness check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _layouts(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in x.split("x")) for x in s.split(",")]


def _ecsq_case(rng, rows, n, transform, classes, scales_on, dtype, layout, name="t", trellis=0):
    """A random ecsq tensor as (entry, parsed streams), written and read back through the container
    (``trellis``: a tcq tensor, spec §7.6, with that state machine)."""
    import tempfile

    from aligncodec.codec.modes import lossy
    from aligncodec.formats.layout import TensorEntry
    from aligncodec.formats.reader import ArchiveReader
    from aligncodec.formats.streams import RansStream, lane_counts, serialize_stream
    from aligncodec.formats.writer import ArchiveWriter

    q = np.round(rng.laplace(0, 3.0, size=(rows, n))).astype(np.int32)
    q[: max(1, rows // 4)] *= 3
    sc = (0.5 + rng.random(n)).astype(np.float16).astype(np.float32) if scales_on else None
    hd, m = None, 0
    if transform == lossy.TRANSFORM_HADAMARD:
        _, m = lossy.split_pow2(n)
        Q = np.linalg.qr(rng.standard_normal((m, m)))[0].astype(np.float32)
        hd = lossy.HadamardData(np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32), Q)
    base = lossy.EcsqParams(transform, float(np.float32(0.004)), 0, lossy.FLAG_COL_SCALES if scales_on else 0, m, trellis=trellis)
    params, streams = lossy.encode_symbols(q, base, sc, hd, chunk_symbols=layout[0], classes=classes, lanes=layout[1])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.acz"
        with ArchiveWriter(path) as w:
            w.add(name, dtype, (rows, n), params.mode, streams, params.pack())
        with ArchiveReader(path) as r:
            e = r.tensors[0]
            return e, r.read_streams(e)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per case (best and median reported)")
    ap.add_argument("--layouts", default="16384x1,131072x32", help="rANS layouts to time: KxW (chunk symbols x lanes)")
    ap.add_argument("--archive", action="append", default=[], help="an .acz to check tensor by tensor and to load (repeatable)")
    ap.add_argument("--json", metavar="OUT", help="write the report as JSON")
    ap.add_argument("--synth", action="append", default=[], metavar="SIZE:LAYERS[:noembed][:lossless]",
                    help="also load a stand-in lossy archive of synth_checkpoint's widths (tools/bench/synth_archive.py), "
                         "e.g. 1.5b:4, or 1.5b:2:noembed without the float-split embeddings, or 135m:30:lossless "
                         "(every tensor float-split: a lossless stand-in at SmolLM2-135M widths) (repeatable)")
    ap.add_argument("--cpu-threads", type=int, default=0, help="threads of the CPU decoder the archive loads are compared with (0: every core)")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel throughput table (archives only)")
    ap.add_argument("--vectors", type=Path, default=ROOT / "spec" / "vectors" / "lossy",
                    help="the lossy golden vectors (spec/vectors/lossy of a source checkout; needed when installed from a wheel)")
    args = ap.parse_args(argv)

    import numba
    import torch
    from numba import cuda

    import aligncodec
    from aligncodec.codec.modes import decode_entry
    from aligncodec.codec.entropy import decode_cpu, decode_cuda, rans
    from aligncodec.codec.modes import lossless, lossy, lossy_cuda
    from aligncodec.formats.layout import TensorEntry
    from aligncodec.formats.reader import ArchiveReader
    from aligncodec.formats.streams import RansStream, lane_counts, serialize_stream
    from aligncodec.formats.writer import ArchiveWriter
    from aligncodec.loader import decode_tensor

    if not torch.cuda.is_available() or not cuda.is_available():
        print("no CUDA device: nothing to do", file=sys.stderr)
        return 2
    try:
        decode_cuda.require()  # compiles and runs a probe kernel: a broken numba-cuda install stops here, named
    except decode_cuda.CudaUnavailableError as exc:
        print(f"CudaUnavailableError: {exc}", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}", flush=True)
    layouts = _layouts(args.layouts)
    checks: dict[str, bool] = {}
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)

    def check(label: str, ok) -> None:
        checks[label] = bool(ok)
        if not ok:
            print(f"  FAIL {label}", flush=True)

    def same_as_cpu(entry, streams) -> bool:
        t = decode_tensor(entry, streams, device=dev)
        cpu = np.asarray(decode_entry(entry, streams)).reshape(-1).view(np.uint8)
        return t.device.type == "cuda" and np.array_equal(t.contiguous().view(-1).view(torch.uint8).cpu().numpy(), cpu)

    # ---------------------------------------------------------------- 1. bit-exactness
    t0 = time.time()
    for P in (10, 12, 14, 16):
        f = rans.quantize_counts(rng.integers(1, 1000, 300), P)
        sym = rng.choice(300, size=200_003, p=f / f.sum()).astype(np.uint16)
        for k, w in [(1000, 1), (4096, 32), (3000, 7)]:
            s = rans.encode(sym, freqs=f, precision=P, chunk_symbols=k, lanes=w)
            got = decode_cuda.decode_symbols_device(s).copy_to_host()
            check(f"symbols P={P} {k}x{w}", np.array_equal(got, decode_cpu.decode_symbols(s)) and np.array_equal(got, sym))
            bad = RansStream(s.precision, s.chunk_symbols, s.n_symbols, s.freqs, s.chunk_lengths,
                               s.payload[:9] + bytes([s.payload[9] ^ 0x10]) + s.payload[10:], s.lanes)
            verdicts = []
            for fn in (lambda: decode_cpu.decode_symbols(bad), lambda: decode_cuda.decode_symbols_device(bad).copy_to_host()):
                try:
                    verdicts.append(("ok", fn().tobytes()))
                except Exception as exc:
                    verdicts.append((type(exc).__name__, str(exc)))
            check(f"corrupt chunk same verdict P={P} {k}x{w}", verdicts[0] == verdicts[1] and verdicts[0][0] == "CorruptStreamError")
    for dt, tdt in (("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)):
        w = (torch.randn(1000, 777, generator=g) * 0.02).to(tdt)
        raw = w.contiguous().view(torch.uint8).numpy()
        for lay in layouts:
            with rans.default_layout(*lay):
                mode, params, streams = lossless.encode(raw, dt, w.numel(), policy="float-split")  # the GPU-decoded mode
            entry = TensorEntry(f"w.{dt}", dt, tuple(w.shape), mode, len(streams), 0, 0, 0, params)
            check(f"float-split {dt} {lay[0]}x{lay[1]}", same_as_cpu(entry, streams))
    vectors = sorted(args.vectors.glob("*.acz"))
    check(f"lossy golden vectors found in {args.vectors}", len(vectors) > 0)
    for path in vectors:
        with ArchiveReader(path) as r:
            e = r.tensors[0]
            check(f"lossy vector {path.stem}", same_as_cpu(e, r.read_streams(e)))
    shapes = [(64, 512), (33, 576), (40, 1536), (17, 7), (8, 14336), (5, 3 * 8192)]  # m = 1, 9, 3, 7 (p = 1), rows > segment
    variants = [(lossy.TRANSFORM_IDENTITY, (1, 0), False), (lossy.TRANSFORM_HADAMARD, (1, 0), True),
                (lossy.TRANSFORM_HADAMARD, (4, 0), False), (lossy.TRANSFORM_HADAMARD, (3, 1), True), (lossy.TRANSFORM_IDENTITY, (2, 1), True)]
    for i, (rows, n) in enumerate(shapes):
        for j, (tr, cls, sc) in enumerate(variants):
            dt = ("F32", "F16", "BF16")[(i + j) % 3]
            e, st = _ecsq_case(rng, rows, n, tr, cls, sc, dt, layouts[(i + j) % len(layouts)])
            check(f"ecsq {rows}x{n} {lossy.TRANSFORM_NAMES[tr]} K={cls[0]} axis={cls[1]} scales={sc} {dt}", same_as_cpu(e, st))
            mid = 1 + (i + j) % len(lossy.TRELLIS_MACHINES)  # the same shape class as tcq (spec §7.6)
            e, st = _ecsq_case(rng, rows, n, tr, cls, sc, dt, layouts[(i + j + 1) % len(layouts)], trellis=mid)
            check(f"tcq machine {mid} {rows}x{n} {lossy.TRANSFORM_NAMES[tr]} K={cls[0]} axis={cls[1]} scales={sc} {dt}",
                  same_as_cpu(e, st))
    # the loader, device="cuda", on an archive with both layouts and both kinds
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "mixed.acz"
        e1, s1 = _ecsq_case(rng, 48, 96, lossy.TRANSFORM_HADAMARD, (2, 0), True, "BF16", layouts[0], "a.lossy")
        e2, s2 = _ecsq_case(rng, 48, 96, lossy.TRANSFORM_HADAMARD, (2, 1), False, "BF16", layouts[-1], "b.lossy")
        wb = (torch.randn(300, 200, generator=g) * 0.05).to(torch.bfloat16)
        rawb = wb.contiguous().view(torch.uint8).numpy()
        with ArchiveWriter(p) as w:
            for e, st in ((e1, s1), (e2, s2)):
                w.add(e.name, e.dtype, e.shape, e.mode, st, e.params)
            for lay, nm in ((layouts[0], "c.lossless"), (layouts[-1], "d.lossless")):
                with rans.default_layout(*lay):
                    mode, params, streams = lossless.encode(rawb, "BF16", wb.numel(), policy="float-split")
                w.add(nm, "BF16", tuple(wb.shape), mode, streams, params)
        cpu = aligncodec.load_state_dict(p)
        gpu = aligncodec.load_state_dict(p, device="cuda")
        check("loader device=cuda, mixed layouts", set(cpu) == set(gpu) and all(
            gpu[k].device.type == "cuda" and torch.equal(gpu[k].cpu().view(torch.int16), cpu[k].view(torch.int16)) for k in cpu))
    synth_dir = tempfile.mkdtemp(prefix="acz-synth-")
    synth = []
    for spec in args.synth:
        from aligncodec.tools.bench import synth_archive

        parts = spec.split(":")
        size, layers, rest = parts[0], (parts[1] if len(parts) > 1 else "4"), parts[2:]
        embed, ll = "noembed" not in rest, "lossless" in rest
        p = Path(synth_dir) / f"synth-{size}-l{layers}{'' if embed else '-noembed'}{'-lossless' if ll else ''}.acz"
        t1 = time.time()
        info = synth_archive.write(size, p, layers=int(layers), embeddings=embed, lossless=ll)
        print(f"stand-in archive {p.name}: {info['tensors']} tensors, {info['weights'] / 1e6:.0f} M weights, "
              f"{info['bytes'] / 2**20:.0f} MiB, written in {time.time() - t1:.0f}s", flush=True)
        synth.append(str(p))
    cpu_threads = args.cpu_threads or os.cpu_count()
    for a in args.archive + synth:
        if a not in synth:  # tensor by tensor through decode_tensor (the single-tensor path)
            ok = True
            with ArchiveReader(a) as r:
                for e in r.tensors:
                    if not e.name.startswith("acz:file/"):
                        ok = ok and same_as_cpu(e, r.read_streams(e))
            check(f"archive {Path(a).name}: every tensor", ok)
        # the whole archive through the loader's batched GPU path against the CPU decoder
        cpu = aligncodec.load_state_dict(a, threads=cpu_threads)
        gpu = aligncodec.load_state_dict(a, device="cuda")
        check(f"archive {Path(a).name}: load(device=cuda) batched", list(cpu) == list(gpu) and all(
            gpu[k].device.type == "cuda" and torch.equal(gpu[k].cpu().view(torch.uint8), cpu[k].view(torch.uint8)) for k in cpu))
        del cpu, gpu
        if a in synth:
            checks[f"archive {Path(a).name}: every tensor"] = checks[f"archive {Path(a).name}: load(device=cuda) batched"]
    print(f"{len(checks)} checks in {time.time() - t0:.1f}s: {sum(checks.values())} ok", flush=True)

    # ---------------------------------------------------------------- 2. throughput (checked cases only)
    def cuda_time(fn):
        ts = []
        for _ in range(args.repeat):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return min(ts), float(np.median(ts))

    rows_out = []

    def row(case, lay, nweights, times, extra=None):
        best, med = times
        r = {"case": case, "layout": f"{lay[0]}x{lay[1]}" if lay else "-", "weights": nweights, "best_s": best, "median_s": med,
             "GBps_best": 2 * nweights / best / 1e9, "GBps_median": 2 * nweights / med / 1e9}
        r.update(extra or {})
        rows_out.append(r)
        print(f"  {case:44s} {r['layout']:>10s} {r['GBps_median']:8.1f} GB/s (median)", flush=True)

    n = args.rows * args.cols
    wt = (torch.randn(args.rows, args.cols, generator=g) * 0.02).to(torch.bfloat16)
    bits = wt.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    kb = lossless.DEFAULT_MANTISSA_BITS["BF16"]
    fsym, rest = lossless.split_float(bits, "BF16", kb)
    packed = lossless.pack_bits(rest, 16 - 8 - kb)
    for lay in ([] if args.no_kernels else layouts):
        s = rans.encode(fsym, alphabet_size=1 << (8 + kb), chunk_symbols=lay[0], lanes=lay[1])
        out_t = torch.empty(n, dtype=torch.int16, device=dev)
        d_out = cuda.as_cuda_array(out_t).view(np.uint16)
        job = decode_cuda.FloatSplitJob(s, packed, "BF16", kb)  # compressed data staged on the device once
        job.launch(d_out)
        job.check()
        ok = np.array_equal(out_t.cpu().numpy().view(np.uint16), bits)
        check(f"timed: lossless bf16 {args.rows}x{args.cols} {lay[0]}x{lay[1]}", ok)
        if not ok:
            continue
        nch = len(s.chunk_lengths)
        states = int(lane_counts(n, lay[0], lay[1]).sum())
        extra = {"chunks": nch, "states": states, "precision": s.precision, "bits_per_weight": 8 * (len(serialize_stream(s)) + len(packed)) / n}
        row("lossless bf16 float-split, kernels only", lay, n, cuda_time(lambda: job.launch(d_out)), extra)
        job.check()
        row("lossless bf16 float-split, from host bytes", lay, n,
            cuda_time(lambda: decode_cuda.decode_float_split_device(s, packed, "BF16", kb, out=d_out)), extra)
    # ecsq at two shapes, and tcq (8 states: ecsq + the level kernel) at the first
    tcq_default = max(lossy.TRELLIS_MACHINES)  # 64 states, the encoder's default
    for rows_, cols_, trellis in (() if args.no_kernels else
                                  ((args.rows, args.cols, 0), (max(1, args.rows // 2), 3 * args.cols, 0),
                                   (args.rows, args.cols, tcq_default))):
        mname = "tcq" if trellis else "ecsq"
        for lay in layouts:
            e, st = _ecsq_case(rng, rows_, cols_, lossy.TRANSFORM_HADAMARD, (4, 0), True, "BF16", lay, "lossy", trellis)
            out_t = torch.empty(e.numel, dtype=torch.int16, device=dev)
            d_out = cuda.as_cuda_array(out_t).view(np.uint16)
            lossy_cuda.reconstruct_device(e, st, d_out)
            torch.cuda.synchronize()
            ok = np.array_equal(out_t.cpu().numpy().view(np.uint8), np.asarray(decode_entry(e, st)).view(np.uint8))
            check(f"timed: {mname} bf16 {rows_}x{cols_} {lay[0]}x{lay[1]}", ok)
            if ok:
                _, m = lossy.split_pow2(cols_)
                job = lossy_cuda.EcsqJob(e, st)  # streams and tables staged on the device once
                out_t.zero_()
                job.launch(d_out)
                job.check()
                ok = np.array_equal(out_t.cpu().numpy().view(np.uint8), np.asarray(decode_entry(e, st)).view(np.uint8))
                check(f"timed: {mname} bf16 {rows_}x{cols_} {lay[0]}x{lay[1]} kernels only", ok)
                if ok:
                    row(f"lossy {mname} bf16 {rows_}x{cols_} (m={m}), kernels only", lay, e.numel,
                        cuda_time(lambda: job.launch(d_out)), {"bytes": e.size})
                    job.check()
                row(f"lossy {mname} bf16 {rows_}x{cols_} (m={m}), host streams", lay, e.numel,
                    cuda_time(lambda: lossy_cuda.reconstruct_device(e, st, d_out)), {"bytes": e.size})
    for a in args.archive + synth:
        if not checks.get(f"archive {Path(a).name}: every tensor") or not checks.get(f"archive {Path(a).name}: load(device=cuda) batched"):
            continue
        with ArchiveReader(a) as r:
            tensors = [e for e in r.tensors if not e.name.startswith("acz:file/")]
        weights = sum(e.numel for e in tensors)
        nbytes = sum(e.nbytes for e in tensors)  # the decoded tensors in the archive's own dtypes
        times = []
        for _ in range(max(1, min(3, args.repeat))):
            torch.cuda.synchronize()
            t = time.perf_counter()
            sd = aligncodec.load_state_dict(a, device="cuda")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            del sd
        best, med = min(times), float(np.median(times))
        ctimes = []
        for _ in range(max(1, min(3, args.repeat))):
            t = time.perf_counter()
            sd = aligncodec.load_state_dict(a, threads=cpu_threads)
            ctimes.append(time.perf_counter() - t)
            del sd
        cmed = float(np.median(ctimes))
        row(f"load_state_dict(device=cuda) {Path(a).name}", None, weights, (best, med),
            {"note": "wall time, warm page cache: file read, CRC, host-side parsing and every kernel; GBps_* count 2 bytes per weight",
             "bytes_own_dtype": nbytes, "GBps_own_dtype_best": nbytes / best / 1e9, "GBps_own_dtype_median": nbytes / med / 1e9,
             "seconds_median": med, "cpu_threads": cpu_threads, "cpu_seconds_median": cmed, "gpu_over_cpu": med / cmed})
        print(f"  {'  CPU decoder, ' + str(cpu_threads) + ' threads':44s} {'':>10s} {cmed:8.3f} s (median); GPU/CPU = {med / cmed:.2f}", flush=True)
        print(f"  {'  (own dtypes: ' + format(nbytes / 2**20, '.1f') + ' MiB decoded)':44s} {'':>10s} {nbytes / med / 1e9:8.2f} GB/s (median), {med:.3f} s", flush=True)

    all_ok = all(checks.values())
    print(f"\nbit-exactness: {'all ' + str(len(checks)) + ' ok' if all_ok else 'FAILURES: ' + ', '.join(k for k, v in checks.items() if not v)}")
    report = {"device": name, "torch": torch.__version__, "numba": numba.__version__, "python": platform.python_version(),
              "shape": [args.rows, args.cols], "layouts": [f"{k}x{w}" for k, w in layouts], "all_ok": all_ok,
              "checks": checks, "rows": rows_out}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    import shutil

    shutil.rmtree(synth_dir, ignore_errors=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
