"""GPU check and benchmark of the CUDA decoder, one short script (a few minutes on an H100/H200).

    python -m aligncodec.tools.bench.bench_gpu [--json OUT] [--rows 4096 --cols 4096] [--repeat 20]

1. Bit-exactness on the GPU: rANS symbols (shared-memory and global-memory tables),
   float-split bf16 / fp16 / fp32 reconstruction, the torch path (codec.modes.decode_entry_gpu)
   and the streaming loader with device="cuda", each compared with the CPU decoder.
2. Throughput for a 4096x4096 bf16 layer, in GB/s of reconstructed bf16 (2 bytes per weight):
   - lossless float-split, kernels only (compressed data already on the device),
   - the same end to end from host bytes (host->device copies included),
   - a lossy-like stream (Gaussian weights quantised to ~3 bits, precision 12, table in shared
     memory) decoded and dequantised to bf16 with torch on the device,
   each for chunk sizes 16384 (the encoder's default), 4096 and 1024 (one thread per chunk:
   smaller chunks = more threads; the chunk table costs 8 bytes per chunk).
Exit status 0 only if every bit-exactness check passed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per case (best and median reported)")
    ap.add_argument("--chunks", default="16384,4096,1024", help="chunk sizes to time")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON")
    args = ap.parse_args(argv)

    import torch
    from numba import cuda

    from aligncodec.codec.entropy import decode_cpu, decode_cuda, rans
    from aligncodec.codec.modes import decode_entry_gpu, lossless
    from aligncodec.formats.constants import MODE_STORED
    from aligncodec.formats.layout import TensorEntry
    from aligncodec.formats.streams import RansStream

    if not torch.cuda.is_available() or not cuda.is_available():
        print("no CUDA device: nothing to do", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}", flush=True)
    checks: dict[str, bool] = {}
    rng = np.random.default_rng(0)

    # ---------------------------------------------------------------- 1. bit-exactness
    t0 = time.time()
    for P in (10, 12, 14, 16):
        f = rans.quantize_counts(rng.integers(1, 1000, 300), P)
        sym = rng.choice(300, size=200_003, p=f / f.sum()).astype(np.uint16)
        s = rans.encode(sym, freqs=f, precision=P, chunk_symbols=1000)
        got = decode_cuda.decode_symbols_device(s).copy_to_host()
        checks[f"symbols P={P}"] = bool(np.array_equal(got, decode_cpu.decode_symbols(s)) and np.array_equal(got, sym))
    bad = RansStream(s.precision, s.chunk_symbols, s.n_symbols, s.freqs, s.chunk_lengths, bytes([s.payload[0] ^ 1]) + s.payload[1:])
    try:
        decode_cuda.decode_symbols_device(bad)
        checks["corrupt chunk detected"] = False
    except Exception as exc:  # CorruptStreamError expected
        checks["corrupt chunk detected"] = type(exc).__name__ == "CorruptStreamError"
    g = torch.Generator().manual_seed(0)
    for dt, tdt in (("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)):
        w = (torch.randn(1000, 777, generator=g) * 0.02).to(tdt)
        raw = w.contiguous().view(torch.uint8).numpy()
        mode, params, streams = lossless.encode(raw, dt, w.numel())
        entry = TensorEntry(f"w.{dt}", dt, tuple(w.shape), mode, len(streams), 0, 0, 0, params)
        t = decode_entry_gpu(entry, streams, dev)
        if t is None:  # no GPU path for this mode (stored): the loader decodes it on the CPU
            ok = mode == MODE_STORED
        else:
            ok = t.dtype == tdt and t.device.type == "cuda" and torch.equal(t.cpu().view(torch.uint8), w.view(torch.uint8))
        ok = ok and np.array_equal(lossless.decode(entry, streams), raw.reshape(-1))
        checks[f"decode_tensor {dt} (mode {mode})"] = bool(ok)
    # the loader on a small archive, device="cuda"
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    import aligncodec
    from aligncodec import archive

    with tempfile.TemporaryDirectory() as d:
        sd = {"a": (torch.randn(256, 300, generator=g) * 0.05).to(torch.bfloat16), "b": torch.randn(1000, generator=g),
              "c": torch.arange(10)}
        save_file(sd, str(Path(d) / "m.safetensors"))
        archive.compress(Path(d) / "m.safetensors", Path(d) / "m.acz", progress=False)
        got = aligncodec.load_state_dict(Path(d) / "m.acz", device="cuda")
        checks["loader device=cuda"] = all(got[k].device.type == "cuda" and torch.equal(got[k].cpu(), sd[k]) for k in sd)
    print(f"checks ({time.time() - t0:.1f}s): " + ", ".join(f"{k}: {'ok' if v else 'FAIL'}" for k, v in checks.items()), flush=True)

    # ---------------------------------------------------------------- 2. throughput
    n = args.rows * args.cols
    w = (torch.randn(args.rows, args.cols, generator=g) * 0.02).to(torch.bfloat16)
    bits = w.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    k = lossless.DEFAULT_MANTISSA_BITS["BF16"]
    fsym, rest = lossless.split_float(bits, "BF16", k)
    packed = lossless.pack_bits(rest, 16 - 8 - k)
    q = np.clip(np.round(w.float().numpy().reshape(-1) / 0.02 * 1.6), -40, 40).astype(np.int32)  # ~3 bits/weight
    qsym = (q + 40).astype(np.uint16)
    rows = []

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

    for cs in [int(x) for x in args.chunks.split(",")]:
        s = rans.encode(fsym, alphabet_size=1 << (8 + k), chunk_symbols=cs)
        words, chunk_w = decode_cpu._words(s)
        tab = decode_cpu.slot_table(s.freqs, s.precision)
        d_words, d_cw, d_tab = cuda.to_device(words), cuda.to_device(chunk_w), cuda.to_device(tab)
        d_rest = cuda.to_device(np.frombuffer(packed, np.uint8))
        out_t = torch.empty(n, dtype=torch.int16, device=dev)
        d_out = cuda.as_cuda_array(out_t).view(np.uint16)
        nch = len(chunk_w) - 1
        d_status = cuda.device_array(nch, dtype=np.int32)
        kern = decode_cuda.rans_kernel_shared if s.precision <= decode_cuda.SHARED_MAX_PRECISION else decode_cuda.rans_kernel_global
        tpb = decode_cuda.THREADS_PER_BLOCK

        def kernels_only():
            kern[max(1, -(-nch // tpb)), tpb](d_words, d_cw, cs, n, d_tab, s.precision, d_out, d_status)
            decode_cuda.join_kernel[-(-n // 256), 256](d_out, d_rest, n, 8 - k, 7 - k, 16)

        kernels_only()
        torch.cuda.synchronize()
        ok = np.array_equal(out_t.cpu().numpy().view(np.uint16), bits) and not d_status.copy_to_host().any()
        checks[f"float-split 4096x4096 chunk {cs}"] = bool(ok)
        best, med = cuda_time(kernels_only)
        rows.append({"case": "lossless bf16, kernels only", "chunk": cs, "precision": s.precision, "chunks": nch,
                     "best_s": best, "median_s": med, "GBps_best": 2 * n / best / 1e9, "GBps_median": 2 * n / med / 1e9,
                     "bits_per_weight": 8 * (len(s.payload) + len(packed) + 8 * nch) / n})
        best, med = cuda_time(lambda: decode_cuda.decode_float_split_device(s, packed, "BF16", k, out=d_out))
        rows.append({"case": "lossless bf16, from host bytes", "chunk": cs, "precision": s.precision, "chunks": nch,
                     "best_s": best, "median_s": med, "GBps_best": 2 * n / best / 1e9, "GBps_median": 2 * n / med / 1e9})
        # lossy-like: ~3-bit symbols, precision 12 (shared-memory table), dequantised with torch
        s2 = rans.encode(qsym, precision=12, chunk_symbols=cs)
        words2, chunk_w2 = decode_cpu._words(s2)
        d_w2, d_cw2, d_tab2 = cuda.to_device(words2), cuda.to_device(chunk_w2), cuda.to_device(decode_cpu.slot_table(s2.freqs, 12))
        sym_t = torch.empty(n, dtype=torch.int32, device=dev)
        d_sym = cuda.as_cuda_array(sym_t)
        nch2 = len(chunk_w2) - 1
        d_st2 = cuda.device_array(nch2, dtype=np.int32)
        step = 0.02 / 1.6

        def lossy():
            decode_cuda.rans_kernel_shared[max(1, -(-nch2 // tpb)), tpb](d_w2, d_cw2, cs, n, d_tab2, 12, d_sym, d_st2)
            return ((sym_t - 40).to(torch.float32) * step).to(torch.bfloat16)

        W = lossy()
        torch.cuda.synchronize()
        checks[f"lossy-like symbols chunk {cs}"] = bool(np.array_equal(sym_t.cpu().numpy(), qsym.astype(np.int32)))
        best, med = cuda_time(lossy)
        rows.append({"case": "~3-bit symbols + dequant to bf16 (torch)", "chunk": cs, "precision": 12, "chunks": nch2,
                     "best_s": best, "median_s": med, "GBps_best": 2 * n / best / 1e9, "GBps_median": 2 * n / med / 1e9,
                     "bits_per_weight": 8 * (len(s2.payload) + 8 * nch2) / n})
        del W
        print(f"chunk {cs}: " + "; ".join(f"{r['case']}: {r['GBps_median']:.1f} GB/s" for r in rows[-3:]), flush=True)

    print(f"\n{'case':42s} {'chunk':>6s} {'chunks':>7s} {'P':>3s} {'best ms':>8s} {'median ms':>9s} {'GB/s (median)':>13s}")
    for r in rows:
        print(f"{r['case']:42s} {r['chunk']:6d} {r['chunks']:7d} {r['precision']:3d} {1e3 * r['best_s']:8.3f} {1e3 * r['median_s']:9.3f} {r['GBps_median']:13.1f}")
    all_ok = all(checks.values())
    print(f"\nbit-exactness: {'all ok' if all_ok else 'FAILURES: ' + ', '.join(k for k, v in checks.items() if not v)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "shape": [args.rows, args.cols], "checks": checks, "rows": rows}, fh, indent=1)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
