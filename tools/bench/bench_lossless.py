"""Lossless benchmark: aligncodec vs zstd (levels 3 and 19) and ZipNN on the same bytes, in the same run.

    aligncodec bench lossless [--model minilm,smollm2] [--dtypes bf16,fp16,fp32] [--copies 4] [--json OUT]
    python -m aligncodec.tools.bench.bench_lossless ...   (the same)

For each model's floating-point tensors, cast to each dtype (``--copies`` copies of them, as
``copy<i>.<name>``, to make a larger input of the same statistics): one safetensors file, then

* aligncodec: ``archive.compress`` of that file (the default lossless policy) and
  ``loader.load_state_dict`` of the archive (decompression to tensors in memory, file in the
  page cache), at 1 thread and at every CPU (``threads=``);
* zstd (python-zstandard) over the concatenated raw tensor bytes, compression at 1 thread and
  with zstd's own worker threads, decompression (single-threaded in zstd);
* ZipNN (``pip install aligncodec[bench]``; left out when it is not installed) over the same
  concatenated bytes with its ``bytearray_dtype``, ``threads=1`` and every CPU. ZipNN's
  compress rewrites its input buffer in place, so every run gets a fresh copy (not timed).

Every round trip is checked byte for byte (the peers' too); a mismatch raises. Bits per weight
= compressed bytes x 8 / weights (aligncodec: the whole archive file). MB/s = raw tensor bytes /
wall seconds, best of ``--repeat``; MB/CPU-s = raw bytes / this process's CPU seconds (all its
threads), the steadier figure on a shared machine. The machine's other load counts in every
number: compare the rows of one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

DTYPES = {"bf16": ("bfloat16", "bfloat16"), "fp16": ("float16", "float16"), "fp32": ("float32", "float32")}


def _best(fn, repeat: int):
    """(best (wall, cpu) seconds, last result) of ``repeat`` calls; ``fn`` returns ((wall, cpu), result)."""
    best, res = (float("inf"), float("inf")), None
    for _ in range(repeat):
        t, res = fn()
        best = min(best, t)
    return best, res


def _timed(fn, *a, **k):
    """((wall seconds, this process's CPU seconds), result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    r = fn(*a, **k)
    return (time.perf_counter() - t0, time.process_time() - c0), r


def _speeds(raw_len: int, tc, td) -> dict:
    """MB/s of raw bytes per wall second, and per CPU second (the steadier figure on a shared machine)."""
    return {"compress_MBps": raw_len / tc[0] / 1e6, "decompress_MBps": raw_len / td[0] / 1e6,
            "compress_MB_per_cpu_s": raw_len / max(tc[1], 1e-9) / 1e6, "decompress_MB_per_cpu_s": raw_len / max(td[1], 1e-9) / 1e6}


def _inputs(model: str, dtype: str, copies: int):
    """(state dict of the cast tensors, their concatenated raw bytes, number of weights)."""
    import torch
    from safetensors.torch import load_file

    from aligncodec import archive
    from aligncodec.tools.eval import models

    src = archive.find_inputs(models.resolve_model(model)).files
    sd = {}
    for f in src:
        sd.update(load_file(str(f)))
    tdt = getattr(torch, DTYPES[dtype][0])
    cast = {}
    for c in range(copies):
        for k, v in sd.items():
            if v.is_floating_point():
                cast[f"copy{c}.{k}" if copies > 1 else k] = v.to(tdt).contiguous().clone()  # (fp32: .to is no copy)
    raw = b"".join(v.reshape(-1).view(torch.uint8).numpy().tobytes() for v in cast.values())
    return cast, raw, sum(v.numel() for v in cast.values())


def _aligncodec(cast: dict, raw_len: int, n: int, threads: list[int], repeat: int, workdir: Path, mode: str = "auto") -> list[dict]:
    import torch
    from safetensors.torch import save_file

    from aligncodec import archive, loader
    from aligncodec.codec.modes import lossless

    st = workdir / "model.safetensors"
    if not st.exists():
        save_file(cast, str(st))
    rows = []
    sizes = set()

    def compress(out, T):
        with lossless.use_policy(mode):
            archive.compress(st, out, progress=False, threads=T)

    for T in threads:
        acz = workdir / f"t{T}.acz"
        compress(workdir / "warm.acz", T)  # numba / native caches, page cache
        loader.load_state_dict(workdir / "warm.acz", threads=T)
        tc, _ = _best(lambda: _timed(compress, acz, T), repeat)
        td, got = _best(lambda: _timed(loader.load_state_dict, acz, threads=T), repeat)
        for k, v in cast.items():
            if not torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)):
                raise AssertionError(f"aligncodec round trip differs in {k}")
        del got
        size = acz.stat().st_size
        sizes.add(acz.read_bytes())
        rows.append({"tool": "aligncodec" if mode == "auto" else f"aligncodec {mode}", "threads": T, "bytes": size, "bpw": size * 8 / n, **_speeds(raw_len, tc, td)})
    if len(sizes) != 1:
        raise AssertionError("aligncodec archives differ between thread counts")
    return rows


def _zstd(raw: bytes, n: int, level: int, threads: list[int], repeat: int) -> list[dict]:
    import zstandard

    rows = []
    for T in threads:
        cctx = zstandard.ZstdCompressor(level=level, threads=0 if T == 1 else T)
        tc, z = _best(lambda: _timed(cctx.compress, raw), repeat)
        td, back = _best(lambda: _timed(zstandard.ZstdDecompressor().decompress, z), repeat)
        if back != raw:
            raise AssertionError(f"zstd {level} round trip differs")
        rows.append({"tool": f"zstd {level}", "threads": T, "bytes": len(z), "bpw": len(z) * 8 / n, **_speeds(len(raw), tc, td),
                     "note": "decompression single-threaded" if T > 1 else ""})
    return rows


def _zipnn(raw: bytes, n: int, dtype: str, threads: list[int], repeat: int) -> list[dict]:
    try:
        import zipnn
    except ImportError:
        return []
    rows = []
    for T in threads:
        z = zipnn.ZipNN(bytearray_dtype=DTYPES[dtype][1], threads=T)
        best_c = best_d = (float("inf"), float("inf"))
        for _ in range(repeat):
            fresh = bytes(bytearray(raw))  # its compress rewrites the buffer it is given
            t, c = _timed(z.compress, fresh)
            best_c = min(best_c, t)
            t, back = _timed(z.decompress, c)
            best_d = min(best_d, t)
            if bytes(back) != raw:
                raise AssertionError("ZipNN round trip differs")
        rows.append({"tool": f"zipnn {getattr(zipnn, '__version__', '')}".strip(), "threads": T, "bytes": len(c),
                     "bpw": len(c) * 8 / n, **_speeds(len(raw), best_c, best_d)})
    return rows


def run(models=("minilm", "smollm2"), dtypes=("bf16", "fp16", "fp32"), copies: int = 1, threads: list[int] | None = None,
        repeat: int = 3, zstd_levels=(3, 19), peers: bool = True, modes=("auto",)) -> list[dict]:
    from aligncodec.codec import parallel

    threads = threads or sorted({1, parallel.cpu_count()})
    out = []
    for model in models:
        for dtype in dtypes:
            cast, raw, n = _inputs(model, dtype, copies)
            base = {"model": model, "dtype": dtype, "copies": copies, "weights": n, "raw_bytes": len(raw)}
            rows = []
            with tempfile.TemporaryDirectory() as d:
                for mode in modes:
                    rows += _aligncodec(cast, len(raw), n, threads, repeat, Path(d), mode)
            del cast
            if peers:
                for lvl in zstd_levels:
                    rows += _zstd(raw, n, lvl, threads, 1 if lvl >= 10 else repeat)
                rows += _zipnn(raw, n, dtype, threads, repeat)
            for r in rows:
                out.append({**base, **r})
                print(_line(out[-1]), flush=True)
    return out


def _line(r: dict) -> str:
    return (f"| {r['model']} | {r['dtype']} | {r['tool']} | {r['threads']} | {r['bpw']:.4f} | {r['compress_MBps']:.0f} | "
            f"{r['decompress_MBps']:.0f} | {r['compress_MB_per_cpu_s']:.0f} | {r['decompress_MB_per_cpu_s']:.0f} |")


HEADER = ("| model | dtype | tool | threads | bits/weight | compress MB/s | decompress MB/s | compress MB/CPU-s | decompress MB/CPU-s |\n"
          "|---|---|---|---|---|---|---|---|---|")


def table(rows: list[dict]) -> str:
    return "\n".join([HEADER] + [_line(r) for r in rows])


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="minilm,smollm2", help="comma-separated reference models (default minilm,smollm2)")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated casts (default bf16,fp16,fp32)")
    ap.add_argument("--copies", type=int, default=1, help="copies of the tensors in the input (default 1)")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and every CPU)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs, best kept (default 3; zstd 19: 1)")
    ap.add_argument("--zstd-levels", default="3,19", help="comma-separated zstd levels (default 3,19)")
    ap.add_argument("--no-peers", action="store_true", help="aligncodec only (no zstd, no ZipNN)")
    ap.add_argument("--lossless-modes", default="auto",
                    help="comma-separated encoder policies, one aligncodec row each (default auto; e.g. auto,bytegroup)")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")


def main_args(a) -> int:
    models = [m for m in a.model.split(",") if m]
    dtypes = [d for d in a.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or a.copies < 1 or a.repeat < 1:
        raise ValueError(f"dtypes must be among {', '.join(DTYPES)}; --copies and --repeat positive")
    threads = [int(x) for x in a.threads.split(",")] if a.threads else None
    if threads and min(threads) < 1:
        raise ValueError("--threads must be positive")
    print(HEADER, flush=True)
    from aligncodec.codec.modes import lossless

    modes = tuple(lossless.check_policy(m) for m in a.lossless_modes.split(",") if m)
    rows = run(models, dtypes, a.copies, threads, a.repeat, tuple(int(x) for x in a.zstd_levels.split(",") if x), not a.no_peers,
               modes)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    raise SystemExit(main_args(ap.parse_args()))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
