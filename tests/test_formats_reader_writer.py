"""Container v1: round trip, determinism, atomic writes, corruption, truncation, hostile headers."""

import os
import struct
from pathlib import Path
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aligncodec.codec.modes import lossless
from aligncodec.formats.constants import CODER_RANS, DTYPES, DTYPE_CODES, MODE_FLOAT_SPLIT, MODE_STORED, SECTION_METADATA
from aligncodec.formats.layout import TensorEntry, align, crc32
from aligncodec.formats.streams import RawStream, parse_streams
from aligncodec.formats.reader import ArchiveReader, iter_archive, parse_preamble
from aligncodec.formats.writer import ArchiveWriter, build_header, build_preamble, build_section
from aligncodec.formats import errors as E
from aligncodec.codec.modes import decode_entry


def _write(path, tensors, meta=None):
    with ArchiveWriter(path, meta or {"m": "1"}) as w:
        for name, dtype, shape, raw in tensors:
            mode, params, streams = lossless.encode(raw, dtype, int(np.prod(shape, dtype=np.int64)))
            w.add(name, dtype, shape, mode, streams, params)


def _read_all(path):
    out = {}
    with ArchiveReader(path) as r:
        r.check_padding()
        for e in r.tensors:
            out[e.name] = (e.dtype, e.shape, decode_entry(e, r.read_streams(e)).tobytes())
    return out


def _sample_tensors(seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(3000) * 0.05).astype("<f4")
    return [
        ("b.weight", "F32", (30, 100), w.tobytes()),
        ("a.bias", "F16", (300,), (rng.standard_normal(300) * 0.1).astype("<f2").tobytes()),
        ("c.ids", "I32", (5,), np.arange(5, dtype="<i4").tobytes()),
        ("d.scalar", "F64", (), np.array(3.5, "<f8").tobytes()),
        ("e.empty", "BF16", (0, 7), b""),
    ]


def test_roundtrip_and_order_independent_bytes(tmp_path):
    ts = _sample_tensors()
    _write(tmp_path / "a.acz", ts)
    _write(tmp_path / "b.acz", list(reversed(ts)))
    assert (tmp_path / "a.acz").read_bytes() == (tmp_path / "b.acz").read_bytes()
    got = _read_all(tmp_path / "a.acz")
    for name, dtype, shape, raw in ts:
        assert got[name] == (dtype, shape, raw)


def test_random_access_reads_only_one_tensor(tmp_path):
    ts = _sample_tensors()
    _write(tmp_path / "a.acz", ts)
    with ArchiveReader(tmp_path / "a.acz") as r:
        e = r.entry("c.ids")
        assert decode_entry(e, r.read_streams(e)).tobytes() == ts[2][3]
        with pytest.raises(E.TensorNotFoundError):
            r.entry("nope")


def test_sequential_pipe_reading(tmp_path):
    ts = _sample_tensors()
    _write(tmp_path / "a.acz", ts)
    r, w = os.pipe()
    data = (tmp_path / "a.acz").read_bytes()
    import threading

    t = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    t.start()
    with os.fdopen(r, "rb", buffering=0) as f:
        names = [e.name for h, e, s in iter_archive(f) if e is not None]
    t.join()
    assert names == sorted(n for n, *_ in ts)


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "x.acz"
    with pytest.raises(RuntimeError):
        with ArchiveWriter(target, {}) as w:
            w.add("t", "U8", (3,), MODE_STORED, [RawStream(b"abc")])
            raise RuntimeError("killed")
    assert not target.exists()
    assert os.listdir(tmp_path) == []
    # an existing file is replaced only once the new one is complete
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with ArchiveWriter(target, {}) as w:
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"


def test_writer_rejects_bad_input(tmp_path):
    with ArchiveWriter(tmp_path / "x.acz", {}) as w:
        w.add("t", "U8", (1,), 0, [RawStream(b"a")])
        with pytest.raises(ValueError):
            w.add("t", "U8", (1,), 0, [RawStream(b"a")])
        with pytest.raises(ValueError):
            w.add("u", "Q7", (1,), 0, [RawStream(b"a")])
    with pytest.raises(TypeError):
        ArchiveWriter(tmp_path / "y.acz", {"k": 1})


def _small_archive(tmp_path):
    """~1 KB archive with a float-split tensor in 3 rANS chunks, a zstd/raw stored tensor and ints."""
    from aligncodec.codec.entropy import rans

    rng = np.random.default_rng(1)
    w = (rng.standard_normal(300) * 0.05).astype("<f4").view("<u4") >> 16
    w = w.astype("<u2")
    sym, rest = lossless.split_float(w, "BF16", 2)
    split = [rans.encode(sym, chunk_symbols=100), RawStream(lossless.pack_bits(rest, 6))]
    ts = [
        ("w", "BF16", (10, 30), w.tobytes()),
        ("b", "F16", (40,), (rng.standard_normal(40) * 0.1).astype("<f2").tobytes()),
        ("n", "I32", (5,), np.arange(5, dtype="<i4").tobytes()),
    ]
    with ArchiveWriter(tmp_path / "s.acz", {"m": "1"}) as wr:
        wr.add("w", "BF16", (10, 30), MODE_FLOAT_SPLIT, split, bytes([2]))
        for name, dtype, shape, raw in ts[1:]:
            mode, params, streams = lossless.encode(raw, dtype, int(np.prod(shape)))
            wr.add(name, dtype, shape, mode, streams, params)
    return (tmp_path / "s.acz").read_bytes(), ts


def test_every_single_byte_flip_is_detected(tmp_path):
    """Flipping any byte of an archive gives a named error, never a crash, never wrong weights."""
    data, ts = _small_archive(tmp_path)
    expected = {n: (d, s, r) for n, d, s, r in ts}
    p = tmp_path / "c.acz"
    counts = {}
    modes = _read_modes(tmp_path / "s.acz")
    assert "float-split" in modes and "stored" in modes
    for i in range(len(data)):
        for flip in (0x01, 0xA4):
            b = bytearray(data)
            b[i] ^= flip
            p.write_bytes(b)
            try:
                got = _read_all(p)
            except E.AczError as exc:
                counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
                continue
            pytest.fail(f"flip at byte {i} went undetected (decoded equal: {got == expected})")
    assert sum(counts.values()) == 2 * len(data)
    assert counts.get("ChecksumError", 0) > 0


def _read_modes(path):
    with ArchiveReader(path) as r:
        return {e.mode_name for e in r.tensors}


def test_truncation_at_every_byte_gives_named_error(tmp_path):
    data, _ = _small_archive(tmp_path)
    p = tmp_path / "t.acz"
    for n in range(len(data)):
        p.write_bytes(data[:n])
        with pytest.raises((E.TruncatedError, E.BadMagicError)):
            _read_all(p)


def test_truncation_at_section_boundaries_named(tmp_path):
    data, _ = _small_archive(tmp_path)
    _, hsize, doff, dsize, *_ = parse_preamble(data)
    boundaries = [0, 8, 63, 64, 64 + hsize // 2, 64 + hsize, doff, doff + 1, doff + dsize - 1]
    p = tmp_path / "t.acz"
    for n in boundaries:
        p.write_bytes(data[:n])
        with pytest.raises(E.FormatError) as ei:
            _read_all(p)
        assert type(ei.value).__name__ in ("TruncatedError", "BadMagicError")


def _hostile(preamble_fields: dict, header: bytes = b"") -> bytes:
    f = dict(header_size=len(header), data_offset=align(64 + len(header), 64), data_size=0, n_tensors=0, n_sections=0, header_crc=crc32(header))
    f.update(preamble_fields)
    return build_preamble(**f) + header


@pytest.mark.parametrize(
    "fields,header,err",
    [
        ({"header_size": 0xFFFFFFFF}, b"", E.LimitError),
        ({"n_tensors": 0xFFFFFFFF, "n_sections": 1}, b"", E.HeaderError),
        ({"data_size": 1 << 62}, b"", E.LayoutError),
        ({"data_offset": 1 << 63}, b"", E.LayoutError),
    ],
)
def test_hostile_preamble_fails_fast_without_allocating(tmp_path, fields, header, err):
    p = tmp_path / "h.acz"
    meta = build_section(SECTION_METADATA, 0, b"{}")
    p.write_bytes(_hostile({"n_sections": 1, **fields}, header or meta))
    tracemalloc.start()
    with pytest.raises(E.AczError) as ei:
        _read_all(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(ei.value, (err, E.TruncatedError, E.LayoutError, E.HeaderError, E.LimitError))
    assert peak < 8 << 20


def test_hostile_stream_counts_fail_without_allocating(tmp_path):
    """A rANS stream header claiming 2^32 chunks / a huge alphabet is rejected before allocation."""
    aux = struct.pack("<BBHIIIII", 12, 0, 0, 1 << 16, 1, 0xFFFFFFFF, 1 << 17, 0)
    stream = struct.pack("<BBHIQQ", CODER_RANS, 0, 0, len(aux), 1 << 40, 0) + aux
    tracemalloc.start()
    with pytest.raises(E.StreamError):
        parse_streams(stream, 1)
    assert tracemalloc.get_traced_memory()[1] < 8 << 20
    tracemalloc.stop()


def test_unknown_optional_extension_is_skipped(tmp_path):
    meta = build_section(SECTION_METADATA, 0, b'{"a":"b"}')
    ext = build_section(0x0200, 0, b"later")
    header = meta + ext
    p = tmp_path / "e.acz"
    p.write_bytes(_hostile({"n_sections": 2}, header) + bytes(align(64 + len(header), 64) - 64 - len(header)))
    with ArchiveReader(p) as r:
        assert r.metadata == {"a": "b"} and r.tensors == []
        assert r.header.extensions == [(0x0200, 0, b"later")]


def test_crc_check_value():
    assert crc32(b"123456789") == 0xCBF43926


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20),
            st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "I64", "BOOL"]),
            st.lists(st.integers(0, 40), max_size=3),
        ),
        max_size=6,
        unique_by=lambda t: t[0],
    ),
    st.integers(0, 2**31),
)
def test_container_roundtrip_property(tmp_path_factory, specs, seed):
    rng = np.random.default_rng(seed)
    tensors = []
    for name, dtype, shape in specs:
        n = int(np.prod(shape, dtype=np.int64))
        raw = rng.integers(0, 256, n * DTYPES[DTYPE_CODES[dtype]][1], dtype=np.uint8).tobytes()
        tensors.append((name, dtype, tuple(shape), raw))
    p = tmp_path_factory.mktemp("rt") / "r.acz"
    _write(p, tensors, {"seed": str(seed)})
    got = _read_all(p)
    assert got == {n: (d, s, r) for n, d, s, r in tensors}


def test_hostile_sizes_on_a_pipe_do_not_allocate(tmp_path):
    """Sequential reading (no file size to check against): a tensor entry claiming an
    enormous data size fails as truncated without allocating that size."""
    import io

    e = TensorEntry("t", "U8", (4,), MODE_STORED, 1, 0, 1 << 40, 0)
    header = build_header({}, [e])
    data = build_preamble(len(header), align(64 + len(header), 64), 1 << 40, 1, 2, crc32(header))
    data += header + bytes(align(64 + len(header), 64) - 64 - len(header)) + bytes(1000)
    tracemalloc.start()
    with pytest.raises(E.TruncatedError):
        for _ in iter_archive(io.BufferedReader(io.BytesIO(data))):
            pass
    assert tracemalloc.get_traced_memory()[1] < 64 << 20
    tracemalloc.stop()


def _refresh_crcs(b: bytearray) -> bytes:
    """Recompute header and preamble CRCs after a mutation (a hostile writer would)."""
    hsize = struct.unpack_from("<I", b, 12)[0]
    if 64 + hsize <= len(b):
        struct.pack_into("<I", b, 40, crc32(bytes(b[64 : 64 + hsize])))
    struct.pack_into("<I", b, 60, crc32(bytes(b[:60])))
    return bytes(b)


_LOSSY_VECTORS = sorted((Path(__file__).resolve().parent.parent / "spec" / "vectors" / "lossy").glob("*.acz"))


@pytest.mark.parametrize("source", ["lossless"] + [p.stem for p in _LOSSY_VECTORS])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_mutated_archives_with_valid_checksums_never_crash(tmp_path_factory, source, data):
    """Fuzz the validation itself: mutate header fields or stream bytes, then make every
    checksum valid again. The reader must raise a named AczError or decode; nothing else."""
    d = tmp_path_factory.mktemp("fz")
    if source == "lossless":
        raw, _ = _small_archive(d)
    else:
        raw = next(p for p in _LOSSY_VECTORS if p.stem == source).read_bytes()
        (d / "s.acz").write_bytes(raw)
    b = bytearray(raw)
    _, hsize, doff, dsize, *_ = parse_preamble(raw)
    n = data.draw(st.integers(1, 6))
    in_data = data.draw(st.booleans())
    for _ in range(n):
        lo, hi = (doff, doff + dsize) if in_data else (8, 64 + hsize)
        i = data.draw(st.integers(lo, hi - 1))
        b[i] = data.draw(st.integers(0, 255))
    if in_data:  # re-sign every tensor's data through a rebuilt header
        with ArchiveReader(d / "s.acz") as r:
            entries = r.tensors
            meta = r.metadata
        for e in entries:
            e.crc = crc32(bytes(b[doff + e.offset : doff + e.offset + e.size]))
        header = build_header(meta, entries)
        b[64 : 64 + len(header)] = header
    p = d / "m.acz"
    p.write_bytes(_refresh_crcs(b))
    try:
        _read_all(p)
    except E.AczError:
        pass
