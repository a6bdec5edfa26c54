"""Rate cost of rANS stream layouts against decode parallelism, measured on a real archive.

    python -m aligncodec.tools.bench.layout_rate ARCHIVE.acz [--layouts 16384x1,65536x32,...] [--json OUT]

Every rANS stream of the archive is decoded and re-encoded with each layout
``K x W`` (K symbols per chunk, W interleaved lanes: W = 1 is coder 2 of spec §6,
W > 1 coder 3 of §6.6); the same symbols and the same tables, so the difference is the
layout alone. Reported per layout: the tensor bytes of the re-encoded archive (streams,
their headers, chunk tables and the 8-byte stream padding; the 64-byte tensor alignment
too), the change in bits per weight against the archive as it is (all weights of the
tensors that have rANS streams), and the parallelism a decoder gets: independent rANS
states (one GPU thread each) and chunks (one GPU warp each for W > 1), in total and for
the smallest and largest tensor.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

DEFAULT_LAYOUTS = "16384x1,4096x1,2048x1,32768x32,65536x32,131072x32,65536x16"


def _tensor_bytes(streams) -> int:
    from aligncodec.formats.constants import DATA_ALIGN, STREAM_ALIGN
    from aligncodec.formats.layout import align
    from aligncodec.formats.reader import ArchiveReader
    from aligncodec.formats.streams import RansStream, lane_counts, serialize_stream

    sizes = [len(serialize_stream(s)) for s in streams]
    return align(sum(align(s, STREAM_ALIGN) for s in sizes[:-1]) + sizes[-1], DATA_ALIGN)


def measure(path: str, layouts: list[tuple[int, int]]) -> dict:
    from aligncodec.codec.entropy import decode_cpu, rans
    from aligncodec.formats.constants import DATA_ALIGN, STREAM_ALIGN
    from aligncodec.formats.layout import align
    from aligncodec.formats.reader import ArchiveReader
    from aligncodec.formats.streams import RansStream, lane_counts, serialize_stream

    res = {f"{k}x{w}": {"chunk_symbols": k, "lanes": w, "bytes": 0, "states": 0, "chunks": 0, "states_per_tensor": []} for k, w in layouts}
    base_bytes = 0
    weights = 0
    n_tensors = 0
    with ArchiveReader(path) as r:
        for e in r.tensors:
            streams = r.read_streams(e)
            if not any(isinstance(s, RansStream) for s in streams):
                continue
            n_tensors += 1
            weights += e.numel
            base_bytes += _tensor_bytes(streams)
            syms = [decode_cpu.decode_symbols(s) if isinstance(s, RansStream) else None for s in streams]
            for (k, w) in layouts:
                new = []
                states = chunks = 0
                for s, sy in zip(streams, syms):
                    if sy is None:
                        new.append(s)
                        continue
                    t = rans.encode(sy, freqs=s.freqs, precision=s.precision, chunk_symbols=k, lanes=w)
                    new.append(t)
                    nc = len(t.chunk_lengths)
                    chunks += nc
                    states += int(lane_counts(t.n_symbols, k, w).sum()) if nc else 0
                d = res[f"{k}x{w}"]
                d["bytes"] += _tensor_bytes(new)
                d["states"] += states
                d["chunks"] += chunks
                d["states_per_tensor"].append(states)
    for d in res.values():
        spt = d.pop("states_per_tensor")
        d["delta_bpw"] = 8 * (d["bytes"] - base_bytes) / weights
        d["weights_per_state"] = weights / max(1, d["states"])
        d["states_min_tensor"] = min(spt) if spt else 0
        d["states_max_tensor"] = max(spt) if spt else 0
    return {"archive": path, "tensors": n_tensors, "weights": weights, "archive_tensor_bytes": base_bytes,
            "bpw_as_is": 8 * base_bytes / weights, "layouts": res}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archive")
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="comma-separated KxW (chunk symbols x lanes)")
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args(argv)
    layouts = [tuple(int(v) for v in x.split("x")) for x in a.layouts.split(",")]
    t0 = time.time()
    out = measure(a.archive, layouts)
    out["seconds"] = round(time.time() - t0, 1)
    print(f"{out['archive']}: {out['tensors']} rANS tensors, {out['weights']:,} weights, {out['bpw_as_is']:.4f} bpw as written")
    print(f"{'layout':>12} {'Δ bpw':>9} {'states':>10} {'weights/state':>14} {'chunks':>8} {'states, smallest tensor':>24}")
    for name, d in out["layouts"].items():
        print(f"{name:>12} {d['delta_bpw']:+9.5f} {d['states']:>10,} {d['weights_per_state']:>14,.0f} {d['chunks']:>8,} {d['states_min_tensor']:>24,}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
