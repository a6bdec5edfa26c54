"""Golden vectors of the lossy modes (spec/FORMAT.md §7.4, §7.6; spec/make_lossy_vectors.py)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aligncodec.codec.modes import lossy
from aligncodec.formats.reader import ArchiveReader
from aligncodec.codec.modes import decode_entry
from aligncodec.codec.torch_interop import bytes_to_tensor

ROOT = Path(__file__).resolve().parent.parent
VEC = sorted((ROOT / "spec" / "vectors" / "lossy").glob("*.acz"))


def test_there_are_lossy_vectors():
    assert len(VEC) >= 3
    modes = {json.loads(p.with_suffix(".json").read_text())["tensors"][0]["mode"] for p in VEC}
    assert modes == {"ecsq", "tcq"}


@pytest.mark.parametrize("path", VEC, ids=lambda p: p.stem)
def test_lossy_vector_decodes_to_recorded_bytes(path):
    want = json.loads(path.with_suffix(".json").read_text())["tensors"][0]
    with ArchiveReader(path) as r:
        e = r.tensors[0]
        streams = r.read_streams(e)
        raw = decode_entry(e, streams)
        assert np.array_equal(raw, decode_entry(e, streams, reference=True))
        assert hashlib.sha256(raw.tobytes()).hexdigest() == want["sha256"]
        got = bytes_to_tensor(e, raw).float().numpy()
        # independent float64 check of the normative reconstruction: W ≈ (q·d) Tᵀ
        p, sstreams, scales, hd, cm = lossy.parse(e, streams)
        from aligncodec.codec.entropy import rans

        syms = [rans.decode(s) for s in sstreams]
        q = (cm.assemble(syms, e.shape, p.class_axis) if cm is not None
             else syms[0].reshape(e.shape).astype(np.int64) + p.offset)
        if p.trellis:  # mode 4 (§7.6): the levels of the state-machine walk
            q = lossy.trellis_levels(q, p.trellis).astype(np.int64)
        d = p.step * (scales.astype(np.float64) if scales is not None else 1.0)
        W = q * d
        if hd is not None:
            W = W @ hd.matrix64().T
        tol = {"F32": 1e-5, "F16": 2e-3, "BF16": 1e-2}[e.dtype]
        assert np.allclose(got, W, rtol=tol, atol=tol * np.abs(W).max())


def test_lossy_generator_reproduces_vectors():
    res = subprocess.run([sys.executable, str(ROOT / "spec" / "make_lossy_vectors.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
