"""No numba compilation at load: every kernel the loader runs is cached (``cache=True``).

A first process with an empty ``NUMBA_CACHE_DIR`` loads an archive holding every kind of
tensor the CPU decoder handles (stored raw and zstd, float-split F16/BF16/F32/F64, ecsq and tcq
identity/hadamard with and without classes and column scales, F32/F16/BF16), compiling and
caching the kernels; a second, fresh process loads another archive of the same kinds and
must compile nothing: numba's ``numba:compile`` event (fired only for a real compilation,
not for a cache load) never fires, and the kernels it ran came from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from aligncodec import archive
from aligncodec.codec.modes import lossy
from aligncodec.formats.constants import MODE_ECSQ, MODE_FLOAT_SPLIT, MODE_STORED, MODE_TCQ
from aligncodec.formats.reader import ArchiveReader
from aligncodec.formats.writer import ArchiveWriter

pytestmark = pytest.mark.slow

_CHILD = r"""
import json, sys
import numba
from numba.core import event
compiled = []

class Listener(event.Listener):
    def on_start(self, ev):
        compiled.append(getattr(ev.data.get("dispatcher"), "__qualname__", str(ev.data.get("dispatcher"))))
    def on_end(self, ev):
        pass

event.register("numba:compile", Listener())
import aligncodec
from aligncodec.codec.entropy import decode_cpu
from aligncodec.codec.modes import lossy_cpu
sd = aligncodec.load_state_dict(sys.argv[1], threads=2)
hits = 0
for mod in (decode_cpu, lossy_cpu):
    for v in vars(mod).values():
        if isinstance(v, numba.core.registry.CPUDispatcher):
            hits += sum(v.stats.cache_hits.values())
print(json.dumps({"compiled": compiled, "cache_hits": hits, "tensors": len(sd)}))
"""


def _archive(path, seed):
    """An archive with every tensor kind the CPU loader decodes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {
        "a.bf16": (torch.randn(300, 70, generator=g) * 0.02).to(torch.bfloat16),
        "b.f16": (torch.randn(300, 70, generator=g) * 0.02).to(torch.float16),
        "c.f32": torch.randn(3000, generator=g),
        "d.f64": torch.randn(1000, generator=g, dtype=torch.float64),
        "e.ids": torch.arange(5000, dtype=torch.int64),  # stored, zstd
        "f.small": torch.randn(7, generator=g),  # stored, raw
    }
    src = path.with_suffix(".safetensors")
    save_file(sd, str(src))
    rng = np.random.default_rng(seed)
    lossy_specs = {  # name: (dtype, shape, transform, column scales, classes, trellis machine: 0 = ecsq)
        "g.id": ("F32", (20, 24), 0, False, (1, 0), 0),
        "h.had": ("BF16", (20, 96), 1, True, (3, 0), 0),
        "i.had": ("F16", (20, 64), 1, False, (4, 1), 0),
        "j.had": ("F32", (9, 40), 1, True, (1, 0), 0),
        "k.tcq": ("BF16", (20, 96), 1, True, (3, 0), 2),
        "l.tcq": ("F32", (12, 40), 0, False, (2, 1), 1),
    }

    def encode(name, dtype, shape, raw):
        from aligncodec.codec.modes import lossless

        split = dtype in lossless.FLOAT_FORMATS and name != "f.small"
        return lossless.encode(raw, dtype, int(np.prod(shape)), mode=MODE_FLOAT_SPLIT if split else MODE_STORED)

    entries = archive.compress(src, path, encode_tensor=encode, progress=False)
    # add the lossy tensors by rewriting the archive with them appended
    with ArchiveReader(path) as r, ArchiveWriter(str(path) + ".new", r.metadata) as w:
        for e in entries:
            w.add(e.name, e.dtype, e.shape, e.mode, r.read_streams(e), e.params)
        for name, (dtype, shape, tr, cs, cls, mid) in lossy_specs.items():
            rows, n = shape
            q = rng.integers(-20, 21, size=shape).astype(np.int32)
            hd = lossy.HadamardData.from_seed(n, seed) if tr else None
            m = lossy.split_pow2(n)[1] if tr else 0
            scales = (0.5 + rng.random(n)).astype(np.float16) if cs else None
            p = lossy.EcsqParams(tr, 0.01, 0, lossy.FLAG_COL_SCALES if cs else 0, m, trellis=mid)
            p, streams = lossy.encode_symbols(q, p, scales, hd, chunk_symbols=100, classes=cls)
            w.add(name, dtype, shape, p.mode, streams, p.pack())
    os.replace(str(path) + ".new", path)
    with ArchiveReader(path) as r:
        modes = {e.mode for e in r.tensors}
        dtypes = {e.dtype for e in r.tensors if e.mode == MODE_FLOAT_SPLIT}
    assert modes == {MODE_STORED, MODE_FLOAT_SPLIT, MODE_ECSQ, MODE_TCQ} and dtypes == {"F16", "BF16", "F32", "F64"}
    return path


def _run(path, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_second_process_compiles_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    a1 = _archive(tmp_path / "one.acz", 1)
    a2 = _archive(tmp_path / "two.acz", 2)
    # the package's own __pycache__ may already hold the kernels: point the first process at an
    # empty cache and show that it does compile, so the second process's silence means something
    first = _run(a1, cache)
    assert first["tensors"] == 12
    if not first["compiled"]:
        pytest.skip("the first process compiled nothing: numba found the kernels in another cache")
    second = _run(a2, cache)
    assert second["tensors"] == 12
    assert second["compiled"] == [], second["compiled"]
    assert second["cache_hits"] > 0
