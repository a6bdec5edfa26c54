"""Long runs of the mutation fuzzer (tests/fuzz/mutate.py) with a hang watchdog and peak memory.

    python tests/fuzz/run.py -n 1000000 --seed 0 --batch 100000 --out fuzz-report.json

Inputs are processed in batches, each by a fresh worker process that reports every input
it starts; an input during which the worker is silent for more than ``--hang`` seconds
(default 10) is a hang: the worker is killed, the input recorded (and saved under
``--save``), and the batch resumes after it. Each worker measures its peak resident set
size (``ru_maxrss``) over its baseline taken after warming every read path on the seeds;
the report gives the largest increase. A hang is judged by the worker's CPU time on one
input (``--hang`` seconds), or ten times that in wall time, so a starved worker on a
shared machine is not taken for a hung one. Exit status 1 if any input raised an unnamed
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

    def done(i, cat, ops):  # one line per input: the parent keeps the counts, even if it kills us
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"D {i} {cat} {peak - base} " + ",".join(f"{k}={v}" for k, v in ops.items()), flush=True)

    res = F.fuzz(n, seed, start=start, on_case=lambda i: print(f"S {i}", flush=True), on_done=done,
                 save_dir=Path(save) if save else None)
    print("RESULT " + json.dumps({"failures": res["failures"]}), flush=True)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), or 0 where unknown."""
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run_batch(seed: int, start: int, n: int, hang: float, save: str | None, nice: int, report: dict) -> None:
    """Run inputs [start, start+n) in worker processes, adding to ``report``. An input on which
    the worker spends more than ``hang`` seconds of CPU time (not wall time: a shared machine
    may starve a niced worker) or ``10 × hang`` of wall time is a hang: the worker is killed,
    the input recorded, and the batch resumes after it."""
    pos = start
    end = start + n
    while pos < end:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--seed", str(seed), "--start", str(pos), "-n", str(end - pos)]
        if save:
            cmd += ["--save", save]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1, preexec_fn=(lambda: os.nice(nice)) if nice else None)
        current = None  # the input being run
        cpu0 = wall0 = None
        ready = False
        while True:
            r, _, _ = select.select([p.stdout], [], [], 1.0)
            if not r:
                if not ready or current is None:
                    continue
                cpu = _cpu_seconds(p.pid) - cpu0
                if cpu > hang or time.time() - wall0 > 10 * hang:
                    p.kill()
                    p.wait()
                    report["hangs"].append({"index": current, "cpu_s": round(cpu, 1), "wall_s": round(time.time() - wall0, 1)})
                    _save_input(seed, current, save, "hang")
                    pos = current + 1
                    break
                continue
            line = p.stdout.readline()
            if not line:  # the worker died
                p.wait()
                idx = current if current is not None else pos
                report["failures"].append({"index": idx, "crash": f"worker exited with {p.returncode}"})
                _save_input(seed, idx, save, "crash")
                pos = idx + 1
                break
            if line.startswith("S "):
                current = int(line.split()[1])
                cpu0, wall0 = _cpu_seconds(p.pid), time.time()
            elif line.startswith("D "):
                _, i, cat, grow_kb, ops = line.split(" ", 4)
                report["counts"][cat] = report["counts"].get(cat, 0) + 1
                report["counts"]["inputs"] = report["counts"].get("inputs", 0) + 1
                for kv in ops.strip().split(","):
                    v = kv.split("=", 1)[1]
                    report["outcomes"][v] = report["outcomes"].get(v, 0) + 1
                report["peak_over_base_mb"] = max(report["peak_over_base_mb"], int(grow_kb) / 1024)
                report["max_input_cpu_s"] = max(report.get("max_input_cpu_s", 0.0), _cpu_seconds(p.pid) - cpu0)
                current = None
                pos = int(i) + 1
            elif line.startswith("READY"):
                ready = True
            elif line.startswith("RESULT "):
                report["failures"] += json.loads(line[7:])["failures"]
                p.wait()
                pos = end
                break


def _save_input(seed: int, idx: int, save: str | None, kind: str) -> None:
    if not save:
        return
    import random

    sys.path.insert(0, str(HERE))
    import mutate as F

    rng = random.Random(f"{seed}:{idx}")
    pool = F.seeds()
    Path(save).mkdir(parents=True, exist_ok=True)
    (Path(save) / f"{kind}-{seed}-{idx}.acz").write_bytes(F.mutate(rng, pool[rng.randrange(len(pool))]))


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
              "hangs": [], "peak_over_base_mb": 0.0, "max_input_cpu_s": 0.0}
    for b in range(args.start, args.start + args.n, args.batch):
        run_batch(args.seed, b, min(args.batch, args.start + args.n - b), args.hang, args.save, args.nice, report)
        report["seconds"] = round(time.time() - t0, 1)
        print(json.dumps({"done": b + min(args.batch, args.start + args.n - b) - args.start, "seconds": report["seconds"],
                          "counts": report["counts"], "hangs": len(report["hangs"]), "peak_over_base_mb": round(report["peak_over_base_mb"], 1),
                          "max_input_cpu_s": round(report["max_input_cpu_s"], 2)}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
    bad = report["counts"].get("unnamed", 0) + report["counts"].get("disagree", 0) + len(report["hangs"]) + sum(
        1 for f in report["failures"] if "crash" in f)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
