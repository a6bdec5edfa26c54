"""Golden vectors (spec/FORMAT.md §10): valid archives decode to the recorded tensors, invalid ones
raise their recorded error, and the generator reproduces every file byte for byte."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from aligncodec.formats.reader import ArchiveReader
from aligncodec.formats import errors as E
from aligncodec import archive
from aligncodec.codec.modes import decode_entry

VEC = Path(__file__).resolve().parent.parent / "spec" / "vectors"
VALID = sorted((VEC / "valid").glob("*.acz"))
INVALID = sorted((VEC / "invalid").glob("*.acz"))


def test_vector_counts():
    assert len(VALID) >= 10 and len(INVALID) >= 25


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_vector(path):
    expect = json.loads(path.with_suffix(".json").read_text())["tensors"]
    got = []
    with ArchiveReader(path) as r:
        r.check_padding()
        for e in r.tensors:
            raw = decode_entry(e, r.read_streams(e)).tobytes()
            ref = decode_entry(e, r.read_streams(e), reference=True).tobytes()
            assert raw == ref
            got.append({"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "mode": e.mode_name, "sha256": hashlib.sha256(raw).hexdigest()})
    assert got == expect


@pytest.mark.parametrize("path", [p for p in VALID if "files" in json.loads(p.with_suffix(".json").read_text())],
                         ids=lambda p: p.stem)
def test_valid_vector_rebuilds_its_files(path, tmp_path):
    """A vector whose .json names files (the shard index, spec §3.1.1): decompress writes each,
    byte for byte, beside the shards of acz.files."""
    files = json.loads(path.with_suffix(".json").read_text())["files"]
    written = archive.decompress(path, tmp_path / "out", progress=False)
    for name, want in files.items():
        data = (tmp_path / "out" / name).read_bytes()
        assert data.decode() == want["text"] and hashlib.sha256(data).hexdigest() == want["sha256"]
    index = json.loads(files["model.safetensors.index.json"]["text"])
    assert sorted(p.name for p in written) == sorted([*files, *set(index["weight_map"].values())])


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_vector(path):
    err = json.loads(path.with_suffix(".json").read_text())["error"]
    with pytest.raises(E.AczError) as ei:
        archive.verify(path)
    assert type(ei.value).__name__ == err


def test_generator_reproduces_vectors_byte_for_byte():
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, str(root / "spec" / "make_vectors.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
