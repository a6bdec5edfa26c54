"""Lossless benchmark: aligncodec vs zstd on the same bytes, in the same run.

    python -m aligncodec.tools.bench.bench_lossless [--model minilm] [--json OUT]

For the model's weights as shipped (fp32) and cast to bf16 and fp16: archive
size (all-in: header, tables, every byte), ratio against the raw tensor bytes,
bits per weight, compress and decompress throughput (MB/s of raw tensor bytes,
single process), and the same for zstd (levels 3 and 19) over the
concatenated raw tensor bytes. Decompression is timed to tensors in memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import zstandard
from safetensors.torch import load_file, save_file

from aligncodec.formats.reader import ArchiveReader
from aligncodec import archive
from aligncodec.tools.eval import models
from aligncodec.codec.modes import decode_entry


def _decode_all(path: Path) -> int:
    n = 0
    with ArchiveReader(path) as r:
        for e in r.tensors:
            n += decode_entry(e, r.read_streams(e)).size
    return n


def run(model: str) -> list[dict]:
    src = archive.find_inputs(models.resolve_model(model)).files
    sd = {}
    for f in src:
        sd.update(load_file(str(f)))
    rows = []
    for label, dt in [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        cast = {k: (v.to(dt) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
        n = sum(v.numel() for v in cast.values())
        raw = b"".join(v.reshape(-1).view(torch.uint8).numpy().tobytes() for v in cast.values())
        with tempfile.TemporaryDirectory() as d:
            st = Path(d) / "model.safetensors"
            save_file(cast, st)
            acz = Path(d) / "m.acz"
            _decode_all  # warm the numba kernels outside the timings
            archive.compress(st, Path(d) / "warm.acz", progress=False)
            _decode_all(Path(d) / "warm.acz")
            t0 = time.perf_counter()
            archive.compress(st, acz, progress=False)
            t_c = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = _decode_all(acz)
            t_d = time.perf_counter() - t0
            assert got == len(raw)
            size = acz.stat().st_size
        row = {"dtype": label, "weights": n, "raw_bytes": len(raw), "aligncodec_bytes": size,
               "aligncodec_ratio": len(raw) / size, "aligncodec_bpw": size * 8 / n,
               "aligncodec_compress_MBps": len(raw) / t_c / 1e6, "aligncodec_decompress_MBps": len(raw) / t_d / 1e6}
        for lvl in (3, 19):
            t0 = time.perf_counter()
            z = zstandard.ZstdCompressor(level=lvl).compress(raw)
            tc = time.perf_counter() - t0
            t0 = time.perf_counter()
            zstandard.ZstdDecompressor().decompress(z)
            td = time.perf_counter() - t0
            row.update({f"zstd{lvl}_ratio": len(raw) / len(z), f"zstd{lvl}_bpw": len(z) * 8 / n,
                        f"zstd{lvl}_compress_MBps": len(raw) / tc / 1e6, f"zstd{lvl}_decompress_MBps": len(raw) / td / 1e6})
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| weights | coder | ratio | bits/weight | compress MB/s | decompress MB/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['dtype']} | aligncodec | {r['aligncodec_ratio']:.3f} | {r['aligncodec_bpw']:.3f} | {r['aligncodec_compress_MBps']:.0f} | {r['aligncodec_decompress_MBps']:.0f} |")
        for lvl in (3, 19):
            out.append(f"| {r['dtype']} | zstd -{lvl} | {r[f'zstd{lvl}_ratio']:.3f} | {r[f'zstd{lvl}_bpw']:.3f} | {r[f'zstd{lvl}_compress_MBps']:.0f} | {r[f'zstd{lvl}_decompress_MBps']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = run(a.model)
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
