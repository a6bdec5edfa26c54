"""Seconds per block of the lossy encoder (aligncodec/encode/), wall and
CPU, with an optional cProfile of the blocks after the first (block 0 carries numba
compilation and setup). A benchmark, not a test: the numbers depend on the machine and its load.

    python -m aligncodec.tools.bench.stream_profile smollm2 --blocks 4 --calib-tokens 2048 [--profile 30]

Prints one JSON line (wall and CPU seconds per block, the load average) on stdout; with
``--profile N`` the N most expensive functions (cumulative and own time) on stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time


class _Stop(Exception):
    pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a model folder or a cached model name (smollm2)")
    ap.add_argument("--blocks", type=int, default=4, help="blocks to encode (then stop)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--scope", default="linear", choices=("all", "linear"))
    ap.add_argument("--calibration", default="float", choices=("float", "quantized"))
    ap.add_argument("--quantizer", default=None, choices=("ecsq", "tcq"), help="default: the encoder's")
    ap.add_argument("--trellis-states", type=int, default=None, help="tcq: default the encoder's")
    ap.add_argument("--threads", type=int, default=1, help="encoder threads (default 1; 0: every core)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the N top functions of blocks 1..")
    args = ap.parse_args(argv)
    from aligncodec import encode as S
    from aligncodec.codec.quant import registry as Q

    model = args.model
    if not os.path.exists(model):
        from aligncodec.tools.eval.models import resolve_model

        model = resolve_model(model)
    trellis = Q.trellis_id(args.quantizer or Q.DEFAULT, args.trellis_states)
    opts = S.EncodeOptions(bpw=args.bpw, scope=args.scope, calibration=args.calibration,
                           calib_tokens=args.calib_tokens, threads=args.threads, trellis=trellis)
    wall, cpu = [], []
    mark = [time.perf_counter(), time.process_time()]
    prof = cProfile.Profile()

    def on_block(i):
        now, c = time.perf_counter(), time.process_time()
        wall.append(now - mark[0])
        cpu.append(c - mark[1])
        mark[0], mark[1] = now, c
        if i == 0 and args.profile:
            prof.enable()
        if i + 1 >= args.blocks:
            prof.disable()
            raise _Stop

    with tempfile.TemporaryDirectory() as d:
        try:
            S.encode(model, os.path.join(d, "out.acz"), opts, progress=False, on_block=on_block)
        except _Stop:
            pass
    print(json.dumps({"model": str(args.model), "calib_tokens": args.calib_tokens, "threads": args.threads,
                      "quantizer": Q.label(trellis), "trellis": trellis,
                      "calibration": args.calibration, "wall_s_per_block": [round(t, 3) for t in wall],
                      "cpu_s_per_block": [round(t, 3) for t in cpu], "loadavg": os.getloadavg()}))
    if args.profile and wall[1:]:
        st = pstats.Stats(prof, stream=sys.stderr)
        st.sort_stats("cumulative").print_stats(args.profile)
        st.sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
