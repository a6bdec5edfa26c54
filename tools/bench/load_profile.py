"""Where a lossless archive's CPU load time goes, step by step, in this process, one thread:
reading + CRC-32 + stream parsing, output allocation with its first touch, and each mode's
decode (bytegroup split into zstd and the plane join; per byte plane, the fraction of its
bytes the archive stores and its zstd seconds: what storing a plane raw would cost and save).

    python -m aligncodec.tools.bench.load_profile ARCHIVE.acz

Warm page cache (run it twice); the first numba kernel of the process is timed inside
``float-split``. Proportions matter more than the seconds on a busy machine.
"""

from __future__ import annotations

import sys
import time


def profile(path: str) -> dict:
    import numpy as np
    import torch

    from aligncodec.codec import parallel
    from aligncodec.codec.modes import lossless
    from aligncodec.formats.constants import FLOAT_FORMATS, MODE_BYTEGROUP, MODE_NAMES
    from aligncodec.formats.reader import ArchiveReader
    from aligncodec.formats.streams import parse_streams

    T: dict[str, float] = {"read_crc_parse": 0.0, "alloc_touch": 0.0, "bytegroup_zstd": 0.0, "bytegroup_join": 0.0}
    planes_info: dict[int, list] = {}
    t_all = time.perf_counter()
    with ArchiveReader(path) as r:
        for e in r.tensors:
            t0 = time.perf_counter()
            data = r.read_data(e)  # read, CRC-32 checked
            streams = parse_streams(data, e.stream_count)
            t1 = time.perf_counter()
            out = torch.empty(e.nbytes, dtype=torch.uint8).numpy()
            out[::4096] = 0
            t2 = time.perf_counter()
            T["read_crc_parse"] += t1 - t0
            T["alloc_touch"] += t2 - t1
            if e.mode == MODE_BYTEGROUP:
                B = FLOAT_FORMATS[e.dtype][0] // 8
                bits = out.view(f"u{B}")
                for g, a, m in lossless._bytegroup_slices(e):
                    planes = []
                    for p in range(B):
                        z0 = time.perf_counter()
                        planes.append(np.frombuffer(lossless._bytes_from(streams[g * B + p], m, e.name, content_size=True), np.uint8))
                        dz = time.perf_counter() - z0
                        T["bytegroup_zstd"] += dz
                        pl = planes_info.setdefault(p, [0, 0, 0.0])  # bytes, bytes stored, zstd seconds
                        pl[0] += m
                        pl[1] += len(streams[g * B + p].data)
                        pl[2] += dz
                    z1 = time.perf_counter()
                    lossless.join_planes(planes, bits[a:a + m])
                    T["bytegroup_join"] += time.perf_counter() - z1
            else:
                d0 = time.perf_counter()
                parallel.run(lossless.plan_decode(e, streams, out, threads=1), 1)
                k = MODE_NAMES[e.mode]
                T[k] = T.get(k, 0.0) + time.perf_counter() - d0
    T["total"] = time.perf_counter() - t_all
    for p, (raw, stored, secs) in sorted(planes_info.items()):  # byte plane p of the bytegroup tensors
        T[f"plane{p}_stored_fraction"] = stored / raw
        T[f"plane{p}_zstd"] = secs
    return T


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    import os

    T = profile(argv[0])
    print(argv[0], "  ".join(f"{k} {v:.3f}" + ("" if k.endswith("fraction") else " s") for k, v in T.items()),
          f"(load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
