"""How the loader's GPU path batches an archive, and the host-side staging time (no GPU needed).

    python -m aligncodec.tools.bench.gpu_batches A.acz [--repeat 4]

Prints the batches :mod:`aligncodec.codec.modes.gpu_batch` forms from the archive's GPU-decodable
tensors (float-split, ecsq, tcq), the CUDA driver calls they cost by the per-batch counts the
simulator tests check (tests/test_codec_modes_gpu_batch_cuda.py: one copy in, one rANS launch, one tcq
level-pass launch, one reconstruction launch per tensor, one status copy, one wait, plus three
event calls for the copy stream and the done event) against the single-tensor path (one copy in,
one rANS launch, the level pass for tcq, the reconstruction, one status copy, one wait per tensor),
and the host staging time per tensor (validation, tables, slot tables, packing; the work the
loader does on the CPU while the GPU decodes the previous batch), best of ``--repeat``, with the
loader's checks (header entry, then the staging's own stream validation) and with the full
``check_entry`` run before staging as well (what a second validation would cost).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archive")
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args(argv)

    from aligncodec.codec.entropy import decode_cuda
    from aligncodec.codec.modes import gpu_batch, has_gpu_path
    from aligncodec.formats.reader import ArchiveReader
    from aligncodec.validation import check_entry, check_entry_header

    full = lambda e, s: check_entry(e, s, None)  # noqa: E731
    header = lambda e: check_entry_header(e, None)  # noqa: E731
    with ArchiveReader(args.archive) as r:
        pairs = [(e, r.read_streams(e)) for e in r.tensors if has_gpu_path(e)]
        n_other = len(r.tensors) - len(pairs)
    if not pairs:
        print("no GPU-decodable tensors")
        return 0

    def stage(check_header):
        batches, b = [], None
        for e, s in pairs:
            if b is None or not b.fits(e):
                b = gpu_batch.Batch(0, full, check_header)
                batches.append(b)
            b.add(e, s)
        for b in batches:
            decode_cuda.plan_prepared(b.prepared, b.st)
        return batches

    times = {"loader checks": [], "full check_entry as well": []}
    for _ in range(max(1, args.repeat)):
        for label, ch in (("loader checks", header), ("full check_entry as well", None)):
            t = time.perf_counter()
            batches = stage(ch)
            times[label].append(time.perf_counter() - t)
    errors = sum(it.error is not None for b in batches for it in b.items)
    n = len(pairs)
    tcq = sum(1 for b in batches for it in b.items if it.kind == "lossy" and it.job.params.trellis)
    calls = sum(5 + 3 + len(b.items) for b in batches)  # both counts leave out the extra launches of rows past 8192 floats
    single = sum(5 + (1 if e.mode == 4 else 0) for e, _ in pairs)
    print(f"{n} GPU-decodable tensors ({tcq} tcq), {n_other} others (CPU-decoded); staging errors: {errors}")
    print(f"batches: {len(batches)}, tensors each: {[len(b.items) for b in batches]}, "
          f"staged MiB each: {[round(b.st.nbytes / 2**20, 1) for b in batches]}")
    print(f"driver calls: batched {calls} ({calls / n:.2f}/tensor), "
          f"single-tensor path {single} ({single / n:.2f}/tensor)")
    for k, v in times.items():
        print(f"host staging, {k}: {1e3 * min(v) / n:.2f} ms/tensor (best of {len(v)}), {min(v):.3f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
