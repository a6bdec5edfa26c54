"""``aligncodec demo``: the newcomer's main job on the built-in default model."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from . import archive, models
from .cmd_archive import _print_table


def cmd_demo(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir or models.cache_root() / "demo")
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[1/3] reference model {args.model!r} (fetched once into {models.model_dir(args.model)})")
    src = models.fetch(args.model, log=lambda *a: print("      ", *a))
    acz = out_dir / f"{args.model}-lossless.acz"
    print(f"[2/3] lossless compression -> {acz}")
    t0 = time.perf_counter()
    archive.compress(src, acz, progress=True)
    dt = time.perf_counter() - t0
    info = archive.inspect(acz)
    _print_table(info)
    st_bytes = sum(os.path.getsize(f) for f in archive.find_inputs(src).files)
    print(f"      {info['raw_bytes'] / 1e6:.1f} MB of tensors -> {(info['file_bytes'] - info['aux_bytes']) / 1e6:.1f} MB "
          f"in {dt:.1f} s; safetensors input {st_bytes / 1e6:.1f} MB")
    print("[3/3] verify: every checksum, every stream decoded")
    t0 = time.perf_counter()
    archive.verify(acz, progress=True)
    print(f"      OK in {time.perf_counter() - t0:.1f} s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="fetch the default model, compress it, print the per-tensor table and verify it")
    p.add_argument("--model", default=models.DEFAULT_MODEL, choices=sorted(models.MODELS), help="reference model (default: %(default)s)")
    p.add_argument("--out-dir", help="where archives go (default: <cache>/demo)")
    p.set_defaults(func=cmd_demo)
