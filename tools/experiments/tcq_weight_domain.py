"""Fixed-step harness for the tcq encoder in the weight domain (Σ = I): every lossy tensor of a
model coded with the product's ``encoder.code_candidate`` (identity candidate, real bytes: rANS
streams, tables, class maps, header entries) at a few global steps (multiples of the weights'
RMS), SQNR over all of them, bpw at 20 dB interpolated between the two steps that bracket it.
Quicker than ``aligncodec rd --weight-domain`` (no step search) for comparing encoder settings.

    python -m aligncodec.tools.experiments.tcq_weight_domain --states 8 --lam 0.25,0.35 --passes 0,1,2
    python -m aligncodec.tools.experiments.tcq_weight_domain --states 64
    python -m aligncodec.tools.experiments.tcq_weight_domain --states 128 --extra-machines --taps 0b101   # not in the format

The format's machines (spec §7.6: 4, 8, 16, 32, 64 states) are used as they are.
``--extra-machines`` makes the ``--states`` machine an experimental one with taps ``--taps``
(any S up to 128), registered in this process only under an id the format never assigns, to
measure what other machines would buy; archives with them are not valid.
Results: docs/results/2026-11-30-tcq.md ("Weight-domain tuning").
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time

import numpy as np

from aligncodec import lossy_compress as LC
from aligncodec.codec import encoder as E
from aligncodec.codec.modes import lossy
from aligncodec.formats.streams import RansStream, serialize_stream

EXPERIMENT_ID = 254  # unassigned in spec §7.6 (255 is the reserved one)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--names", default=None, help="regex: only these tensors")
    ap.add_argument("--steps", default="0.20,0.215", help="global steps as multiples of the weights' RMS")
    ap.add_argument("--states", type=int, default=8)
    ap.add_argument("--lam", default="0.35", help="comma-separated λ factors c (λ = c·Δ²)")
    ap.add_argument("--passes", default="1", help="comma-separated extra search passes")
    ap.add_argument("--refine", type=int, default=1, help="1: refined class maps (lossy.refine_classes)")
    ap.add_argument("--extra-machines", action="store_true",
                    help="code with an experimental --states machine of taps --taps (not in the format)")
    ap.add_argument("--taps", type=lambda x: int(x, 0), default=0b11, help="taps of the experimental machine (≤ 8 bits)")
    ap.add_argument("--breakdown", action="store_true", help="bpw of payload, rANS headers/tables, raw streams, entries")
    a = ap.parse_args(argv)
    if a.extra_machines:
        lossy.TRELLIS_MACHINES[EXPERIMENT_ID] = (a.states, a.taps)
    jobs = LC.build_jobs(LC.resolve_input(a.model), None)
    if a.names:
        jobs = [j for j in jobs if re.search(a.names, j.name)]
    mid = EXPERIMENT_ID if a.extra_machines else E.trellis_id("tcq", a.states)
    cache: dict = {}
    for j in jobs:
        j.trellis = mid
        E.build_candidates(j, ("identity",), cache=cache)
    n = sum(j.numel for j in jobs)
    sig = sum(float((j.W.double() ** 2).sum()) for j in jobs)
    rms = math.sqrt(sig / n)
    steps = [float(x) * rms for x in a.steps.split(",")]
    for lam in (float(x) for x in a.lam.split(",")):
        for passes in (int(x) for x in a.passes.split(",")):
            t0 = time.perf_counter()
            pts = []
            for st in steps:
                total, noise = 0, 0.0
                br = dict.fromkeys(("payload", "rans_headers_tables", "raw", "entries"), 0)
                for j in jobs:
                    j.tcq_lambda, j.tcq_passes, j.refine_classes = lam, passes, bool(a.refine)
                    c = E.code_candidate(j, j.cands[0], st, keep_w_hat=False)
                    total += c.bytes_all_in
                    noise += c.noise
                    streams = 0
                    for s in c.streams:
                        size = len(serialize_stream(s))
                        streams += size
                        if isinstance(s, RansStream):
                            br["payload"] += len(s.payload)
                            br["rans_headers_tables"] += size - len(s.payload)
                        else:
                            br["raw"] += size
                    br["entries"] += c.bytes_all_in - streams
                bpw, sqnr = 8 * total / n, 10 * math.log10(sig / noise)
                pts.append((sqnr, bpw))
                if a.breakdown:
                    print(f"  step {st / rms:.4g}·RMS: {bpw:.4f} bpw, {sqnr:.3f} dB; "
                          + ", ".join(f"{k} {8 * v / n:.4f}" for k, v in br.items()))
            pts.sort()
            s_, b_ = [p[0] for p in pts], [p[1] for p in pts]
            at = float(np.interp(20.0, s_, b_)) if s_[0] <= 20.0 <= s_[-1] else math.nan
            print(f"S={a.states} λ={lam} passes={passes} refine={a.refine}: "
                  + "  ".join(f"{b:.4f} bpw/{s:.3f} dB" for s, b in pts)
                  + f"  -> {at:.4f} bpw at 20 dB ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
