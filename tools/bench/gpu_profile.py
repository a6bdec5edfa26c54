"""Profile ``load_state_dict(device="cuda")`` of archives: wall times and CUDA driver calls.

    python -m aligncodec.tools.bench.gpu_profile A.acz [B.acz ...] [--top 30]

For each archive: a first GPU load (kernel compilation), a CPU load, a second GPU load (warm),
then a cProfile of a third GPU load: the number of CUDA driver API calls numba made
(``safe_cuda_api_call``), per tensor, and the functions with the most cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archive", nargs="+")
    ap.add_argument("--top", type=int, default=30, help="functions listed by cumulative time")
    args = ap.parse_args(argv)

    import torch

    import aligncodec

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    for a in args.archive:
        name = a.split("/")[-1]
        for dev in ("cuda", "cpu", "cuda"):
            t = time.perf_counter()
            sd = aligncodec.load_state_dict(a, device=dev)
            torch.cuda.synchronize()
            n = sum(v.numel() for v in sd.values())
            print(f"{name} {dev}: {time.perf_counter() - t:.3f}s, {len(sd)} tensors, {n / 1e6:.1f}M weights", flush=True)
            del sd
        pr = cProfile.Profile()
        t = time.perf_counter()
        pr.enable()
        sd = aligncodec.load_state_dict(a, device="cuda")
        torch.cuda.synchronize()
        pr.disable()
        wall = time.perf_counter() - t
        st = pstats.Stats(pr)
        driver_calls = sum(v[1] for k, v in st.stats.items() if k[2] == "safe_cuda_api_call")
        print(f"{name} cuda (profiled): {wall:.3f}s, {driver_calls} CUDA driver calls for {len(sd)} tensors "
              f"({driver_calls / max(1, len(sd)):.1f} per tensor)", flush=True)
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(args.top)
        print(s.getvalue()[-12000:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
