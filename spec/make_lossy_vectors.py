"""Golden vectors of the lossy modes 2 `ecsq` (spec/FORMAT.md §7.4) and 4 `tcq` (§7.6).

Writes spec/vectors/lossy/*.acz and *.json (the decoded tensor's SHA-256, and its first
values as float32). Inputs are fixed integers and fixed float32 constants (no QR, no
encoder search), so the files are the same on every machine. ``--check`` regenerates in
a temporary folder and compares byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from aligncodec.codec.modes import lossy
from aligncodec.codec.modes import decode_entry
from aligncodec.codec.torch_interop import bytes_to_tensor
from aligncodec.formats.constants import MODE_NAMES
from aligncodec.formats.reader import ArchiveReader
from aligncodec.formats.writer import ArchiveWriter

OUT = Path(__file__).resolve().parent / "vectors" / "lossy"
# a fixed 3 × 3 float32 matrix (need not be orthogonal for decoding; this one nearly is)
Q3 = np.array([[0.6, -0.8, 0.0], [0.48, 0.36, -0.8], [0.64, 0.48, 0.6]], dtype=np.float32)


def _q(shape, seed, spread):
    rng = np.random.Generator(np.random.PCG64(seed))
    return np.round(rng.laplace(0.0, spread, size=shape)).astype(np.int32)


def cases():
    # 1. identity, one class, F32
    q = _q((6, 10), 1, 2.0)
    yield "lossy_identity", "w", "F32", q, lossy.EcsqParams(lossy.TRANSFORM_IDENTITY, 0.0125, 0), None, None, (1, 0)
    # 2. hadamard (n = 24 = 8·3), column scales, 3 column classes, BF16
    q = _q((12, 24), 2, 3.0)
    q[:, :4] *= 5  # wide columns
    hd = lossy.HadamardData(np.where(np.arange(24) % 5 == 1, -1.0, 1.0).astype(np.float32), Q3)
    sc = (1.0 + (np.arange(24) % 4) / 4).astype(np.float16).astype(np.float32)
    yield ("lossy_hadamard_colscale_classes", "layer.weight", "BF16", q,
           lossy.EcsqParams(lossy.TRANSFORM_HADAMARD, 0.03, 0, lossy.FLAG_COL_SCALES, 3), sc, hd, (3, 1))
    # 3. identity, 4 row classes, F16, odd column count
    q = _q((16, 7), 3, 1.5)
    q[::3] *= 4
    yield "lossy_row_classes", "x.weight", "F16", q, lossy.EcsqParams(lossy.TRANSFORM_IDENTITY, 0.5, 0), None, None, (4, 0)
    # 4. hadamard (n = 40 = 8·5), 2 row classes, BF16, symbols in interleaved lanes (coder 3, §6.6)
    q = _q((9, 40), 4, 2.5)
    Q5 = np.array([[0.6, -0.8, 0, 0, 0], [0.8, 0.6, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0.28, 0.96], [0, 0, 0, -0.96, 0.28]], dtype=np.float32)
    hd = lossy.HadamardData(np.where(np.arange(40) % 3 == 0, -1.0, 1.0).astype(np.float32), Q5)
    yield ("lossy_lanes", "h.weight", "BF16", q, lossy.EcsqParams(lossy.TRANSFORM_HADAMARD, 0.02, 0, 0, 5), None, hd, (2, 0), 7)
    # mode 4, tcq (spec §7.6): every state machine; the symbols are levels' halves, so spreads are smaller
    # 5. machine 1 (4 states), identity, one class, F32
    q = _q((10, 6), 5, 1.5)
    yield "lossy_tcq_m1", "t.weight", "F32", q, lossy.EcsqParams(lossy.TRANSFORM_IDENTITY, 0.0078125, 0, trellis=1), None, None, (1, 0)
    # 6. machine 2 (8 states), hadamard (n = 24 = 8·3), column scales, 3 column classes, BF16
    q = _q((12, 24), 6, 1.5)
    q[:, :4] *= 5
    hd = lossy.HadamardData(np.where(np.arange(24) % 5 == 1, -1.0, 1.0).astype(np.float32), Q3)
    sc = (1.0 + (np.arange(24) % 4) / 4).astype(np.float16).astype(np.float32)
    yield ("lossy_tcq_m2_hadamard_colscale_classes", "layer.weight", "BF16", q,
           lossy.EcsqParams(lossy.TRANSFORM_HADAMARD, 0.015, 0, lossy.FLAG_COL_SCALES, 3, trellis=2), sc, hd, (3, 1))
    # 7. machine 3 (16 states), hadamard (n = 40 = 8·5), 4 row classes, F16, interleaved lanes (coder 3)
    q = _q((17, 40), 7, 1.2)
    q[::4] *= 3
    hd = lossy.HadamardData(np.where(np.arange(40) % 3 == 0, -1.0, 1.0).astype(np.float32), Q5)
    yield ("lossy_tcq_m3_lanes", "h.weight", "F16", q, lossy.EcsqParams(lossy.TRANSFORM_HADAMARD, 0.01, 0, 0, 5, trellis=3),
           None, hd, (4, 0), 7)
    # 8. machine 4 (32 states), identity, 2 column classes, F32; 26 rows: the 5-bit register fills
    # and its tapped (oldest) bits feed back for 20 rows of every column
    q = _q((26, 9), 8, 1.5)
    q[:, ::4] *= 3
    yield "lossy_tcq_m4_colclasses", "c.weight", "F32", q, lossy.EcsqParams(lossy.TRANSFORM_IDENTITY, 0.03125, 0, trellis=4), None, None, (2, 1)
    # 9. machine 5 (64 states), hadamard (n = 24 = 8·3), column scales, 3 row classes, BF16, 33 rows
    q = _q((33, 24), 9, 1.5)
    q[::5] *= 4
    hd = lossy.HadamardData(np.where(np.arange(24) % 7 == 2, -1.0, 1.0).astype(np.float32), Q3)
    sc = (1.0 + (np.arange(24) % 3) / 8).astype(np.float16).astype(np.float32)
    yield ("lossy_tcq_m5_hadamard_colscale_rowclasses", "m.weight", "BF16", q,
           lossy.EcsqParams(lossy.TRANSFORM_HADAMARD, 0.0125, 0, lossy.FLAG_COL_SCALES, 3, trellis=5), sc, hd, (3, 0))


def write(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    for stem, name, dtype, q, base, sc, hd, cls, *lanes in cases():
        params, streams = lossy.encode_symbols(q, base, sc, hd, chunk_symbols=64, classes=cls, lanes=lanes[0] if lanes else 1)
        path = outdir / f"{stem}.acz"
        with ArchiveWriter(path, {"acz.tool": "spec/make_lossy_vectors.py"}) as w:
            w.add(name, dtype, q.shape, params.mode, streams, params.pack())
        with ArchiveReader(path) as r:
            e = r.tensors[0]
            raw = decode_entry(e, r.read_streams(e))
            vals = bytes_to_tensor(e, raw).float().reshape(-1)[:8].tolist()
        (outdir / f"{stem}.json").write_text(json.dumps({"tensors": [{
            "name": name, "dtype": dtype, "shape": list(q.shape), "mode": MODE_NAMES[params.mode],
            "sha256": hashlib.sha256(raw.tobytes()).hexdigest(), "first_values_f32": vals}]}, indent=1) + "\n")


def main(argv) -> int:
    if "--check" in argv:
        with tempfile.TemporaryDirectory() as d:
            write(Path(d))
            bad = [p.name for p in sorted(Path(d).iterdir()) if not (OUT / p.name).is_file() or (OUT / p.name).read_bytes() != p.read_bytes()]
        if bad:
            print("differ:", ", ".join(bad))
            return 1
        print("lossy vectors reproduce byte for byte")
        return 0
    write(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
