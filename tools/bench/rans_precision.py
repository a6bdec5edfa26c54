"""What capping the rANS precision P costs in rate and gains in CPU decode speed (encoder only:
the format allows P = 1..16 and every decoder reads any P).

    python -m aligncodec.tools.bench.rans_precision [--archive A.acz] [--cap 12] [--rows 4096 --cols 4096] [--json OUT]

rate (``--archive``): every rANS stream of the archive is decoded and its symbols' own counts
costed (payload + table bits, :func:`rans.cost_bits`) with the table the encoder wrote and with
the best table of precision <= cap (:func:`rans.choose_table`); reported in bits per weight of the
archive's non-auxiliary tensors. The payload estimate is the entropy coder's ideal cost, so
the difference is the table's, not the chunk layout's.

speed: the decode benchmark's lossy matrix (tools/bench/bench.py ``lossy_entry``: bf16, hadamard,
column scales, 4 row classes) encoded with the encoder's choice of P and with P <= cap, decoded
by the numba CPU decoder in one thread (bit-exact with the numpy reference first): thread CPU
nanoseconds per weight of the rANS stage and of the whole decode, and bf16 GB per CPU-second,
best of ``--repeat`` (CPU time, so other processes on the machine affect it little).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager

import numpy as np


def rate_cost(streams_of_tensors, cap: int = 12) -> dict:
    """``streams_of_tensors``: iterable of (numel, parsed streams). Returns the rANS bits as written
    and with tables of precision <= cap, and the difference in bits per weight."""
    from aligncodec.codec.entropy import decode_cpu, rans
    from aligncodec.formats.streams import RansStream

    choices = tuple(p for p in rans.PRECISION_CHOICES if p <= cap)
    bits_now = bits_cap = 0.0
    weights = symbols = 0
    precisions: dict[int, int] = {}
    for numel, streams in streams_of_tensors:
        weights += numel
        for s in streams:
            if not isinstance(s, RansStream) or s.n_symbols == 0:
                continue
            sym = decode_cpu.decode_symbols(s, threads=1)
            counts = np.bincount(sym, minlength=len(s.freqs)).astype(np.int64)
            bits_now += rans.cost_bits(counts, np.asarray(s.freqs, np.int64), s.precision)
            p, f = rans.choose_table(counts, precisions=choices)
            bits_cap += rans.cost_bits(counts, f, p)
            symbols += s.n_symbols
            precisions[s.precision] = precisions.get(s.precision, 0) + 1
    return {"cap": cap, "weights": weights, "rans_symbols": symbols, "precisions_written": dict(sorted(precisions.items())),
            "rans_MB_written": bits_now / 8e6, "rans_MB_capped": bits_cap / 8e6,
            "delta_bpw": (bits_cap - bits_now) / weights if weights else 0.0,
            "delta_percent_of_rans": 100 * (bits_cap - bits_now) / bits_now if bits_now else 0.0}


def archive_rate_cost(path: str, cap: int = 12) -> dict:
    from aligncodec.auxfiles import is_aux
    from aligncodec.formats.reader import ArchiveReader
    from aligncodec.formats.streams import parse_streams

    with ArchiveReader(path) as r:
        res = rate_cost(((e.numel, parse_streams(r.read_data(e), e.stream_count)) for e in r.tensors if not is_aux(e.name)), cap)
    res["archive"] = path
    return res


@contextmanager
def _capped(cap: int):
    """Inside: the rANS encoder chooses its tables among precisions <= cap."""
    from aligncodec.codec.entropy import rans

    orig = rans.choose_table

    def choose(counts, precisions=rans.PRECISION_CHOICES):
        return orig(counts, tuple(p for p in precisions if p <= cap))

    rans.choose_table = choose
    try:
        yield
    finally:
        rans.choose_table = orig


def _best_thread_cpu(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best


def decode_speed(rows: int = 4096, cols: int = 4096, caps=(16, 12), repeat: int = 5) -> list[dict]:
    from aligncodec.codec import parallel
    from aligncodec.codec.entropy import decode_cpu
    from aligncodec.codec.modes import lossy, lossy_cpu
    from aligncodec.tools.bench.bench import lossy_entry

    out_rows = []
    for cap in caps:
        with _capped(cap):
            e, st = lossy_entry(rows, cols)
        n = e.numel
        _, sstreams, *_ = lossy.parse(e, st)
        out = np.empty(e.nbytes, np.uint8)
        if lossy_cpu.decode(e, st, threads=1, out=out).tobytes() != lossy.decode_numpy(e, st).tobytes():
            raise AssertionError("numba ecsq decoder mismatch")
        U = [np.empty(s.n_symbols, np.uint16) for s in sstreams]
        t_sym = _best_thread_cpu(lambda: [parallel.run(decode_cpu.plan_decode(s, u), 1) for s, u in zip(sstreams, U)], repeat)
        t_all = _best_thread_cpu(lambda: lossy_cpu.decode(e, st, threads=1, out=out), repeat)
        out_rows.append({"cap": cap, "bits_per_weight": 8 * e.size / n, "precisions": sorted({s.precision for s in sstreams}),
                         "rans_ns_per_weight": t_sym / n * 1e9, "decode_ns_per_weight": t_all / n * 1e9,
                         "GB_per_cpu_s_bf16": 2 * n / t_all / 1e9})
    return out_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aligncodec.tools.bench.rans_precision", description=__doc__.split("\n")[0])
    ap.add_argument("--archive", help="archive whose rANS streams are costed with capped tables")
    ap.add_argument("--cap", type=int, default=12, help="highest precision allowed (default 12)")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-speed", action="store_true", help="only the rate cost")
    ap.add_argument("--json", help="write the result as JSON here")
    a = ap.parse_args(argv)
    import os

    res: dict = {"loadavg": os.getloadavg()}
    if a.archive:
        r = res["rate"] = archive_rate_cost(a.archive, a.cap)
        print(f"{a.archive}: rANS streams {r['rans_MB_written']:.3f} MB as written (precisions {r['precisions_written']}), "
              f"{r['rans_MB_capped']:.3f} MB with P <= {a.cap}: {r['delta_bpw']:+.5f} bpw ({r['delta_percent_of_rans']:+.3f} % of the rANS bits)")
    if not a.no_speed:
        res["speed"] = decode_speed(a.rows, a.cols, (16, a.cap), a.repeat)
        for r in res["speed"]:
            print(f"lossy {a.rows}x{a.cols} bf16, P <= {r['cap']} (used {r['precisions']}), {r['bits_per_weight']:.4f} bpw: "
                  f"rANS {r['rans_ns_per_weight']:.2f} ns/weight, whole decode {r['decode_ns_per_weight']:.2f} ns/weight = "
                  f"{r['GB_per_cpu_s_bf16']:.3f} GB of bf16 per CPU-second (1 thread, thread CPU time, best of {a.repeat})")
    res["loadavg_after"] = os.getloadavg()
    if a.json:
        from aligncodec.tools.bench.bench import write_json

        write_json(res, a.json)
    print(f"load average {res['loadavg'][0]:.1f} -> {res['loadavg_after'][0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
