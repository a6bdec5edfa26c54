"""Long runs of the mutation fuzzer (tests/fuzz/mutate.py) with a hang watchdog and peak memory.

    python tests/fuzz/run.py -n 1000000 --seed 0 --batch 100000 --out fuzz-report.json

Inputs are processed in batches, each by a fresh worker process that reports every input
it starts; an input during which the worker is silent for more than ``--hang`` seconds
(default 10) is a hang: the worker is killed, the input recorded (and saved under
``--save``), and the batch resumes after it. Each worker measures its peak resident set
size (``ru_maxrss``) over its baseline taken after warming every read path on the seeds;
the report gives the largest increase. Exit status 1 if any input raised an unnamed
exception, the read paths disagreed, or an input hung.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(seed: int, start: int, n: int, save: str | None) -> None:
    import resource

    sys.path.insert(0, str(HERE))
    import mutate as F

    import numba

    numba.set_num_threads(1)
    wd = F.work_dir()
    for s in F.seeds():  # warm every path (imports, numba kernels, safetensors) before the baseline
        F.run_input(s, wd / "warm.acz", decompress=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("READY", flush=True)
    res = F.fuzz(n, seed, start=start, on_case=lambda i: print(i, flush=True), save_dir=Path(save) if save else None)
    res["base_kb"] = base
    res["peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT " + json.dumps(res), flush=True)


def run_batch(seed: int, start: int, n: int, hang: float, save: str | None, nice: int) -> tuple[dict, list[int]]:
    """Run inputs [start, start+n) in workers, restarting after a hang. Returns (merged result, hung indices)."""
    merged = {"counts": {}, "outcomes": {}, "failures": [], "peak_over_base_mb": 0.0}
    hung = []
    pos = start
    end = start + n
    while pos < end:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--seed", str(seed), "--start", str(pos), "-n", str(end - pos)]
        if save:
            cmd += ["--save", save]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1, preexec_fn=(lambda: os.nice(nice)) if nice else None)
        last = None
        ready = False
        buf = ""
        result = None
        while True:
            r, _, _ = select.select([p.stdout], [], [], hang if ready else 600)
            if not r:  # silent for too long: the current input hangs
                p.kill()
                p.wait()
                idx = pos if last is None else last
                hung.append(idx)
                if save:
                    import random

                    sys.path.insert(0, str(HERE))
                    import mutate as F

                    rng = random.Random(f"{seed}:{idx}")
                    pool = F.seeds()
                    Path(save).mkdir(parents=True, exist_ok=True)
                    (Path(save) / f"hang-{seed}-{idx}.acz").write_bytes(F.mutate(rng, pool[rng.randrange(len(pool))]))
                pos = idx + 1
                break
            line = p.stdout.readline()
            if not line:  # worker died
                p.wait()
                idx = pos if last is None else last
                merged["failures"].append({"index": idx, "crash": f"worker exited with {p.returncode}"})
                pos = idx + 1
                break
            if line.startswith("READY"):
                ready = True
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
            else:
                last = int(line)
                continue
            if result is not None:
                p.wait()
                for k, v in result["counts"].items():
                    merged["counts"][k] = merged["counts"].get(k, 0) + v
                for k, v in result["outcomes"].items():
                    merged["outcomes"][k] = merged["outcomes"].get(k, 0) + v
                merged["failures"] += result["failures"]
                merged["peak_over_base_mb"] = max(merged["peak_over_base_mb"], (result["peak_kb"] - result["base_kb"]) / 1024)
                merged.setdefault("base_mb", result["base_kb"] / 1024)
                pos = end
                break
    return merged, hung


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20000, help="inputs (default 20000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first input index")
    ap.add_argument("--batch", type=int, default=100000, help="inputs per worker process")
    ap.add_argument("--hang", type=float, default=10.0, help="seconds without progress that count as a hang")
    ap.add_argument("--save", help="folder for failing and hanging inputs")
    ap.add_argument("--out", help="write the report (JSON) here")
    ap.add_argument("--nice", type=int, default=10, help="niceness of the workers (default 10)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.seed, args.start, args.n, args.save)
        return 0
    t0 = time.time()
    report = {"inputs_requested": args.n, "seed": args.seed, "start": args.start, "counts": {}, "outcomes": {}, "failures": [],
              "hangs": [], "peak_over_base_mb": 0.0}
    for b in range(args.start, args.start + args.n, args.batch):
        m, hung = run_batch(args.seed, b, min(args.batch, args.start + args.n - b), args.hang, args.save, args.nice)
        for k, v in m["counts"].items():
            report["counts"][k] = report["counts"].get(k, 0) + v
        for k, v in m["outcomes"].items():
            report["outcomes"][k] = report["outcomes"].get(k, 0) + v
        report["failures"] += m["failures"]
        report["hangs"] += hung
        report["peak_over_base_mb"] = max(report["peak_over_base_mb"], m["peak_over_base_mb"])
        report.setdefault("base_mb", m.get("base_mb"))
        report["seconds"] = round(time.time() - t0, 1)
        print(json.dumps({"done": b + min(args.batch, args.start + args.n - b) - args.start, "seconds": report["seconds"],
                          "counts": report["counts"], "hangs": len(report["hangs"]), "peak_over_base_mb": round(report["peak_over_base_mb"], 1)}),
              flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
    bad = report["counts"].get("unnamed", 0) + report["counts"].get("disagree", 0) + len(report["hangs"]) + sum(
        1 for f in report["failures"] if "crash" in f)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
