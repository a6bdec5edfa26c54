"""Write the golden test vectors of spec/FORMAT.md §10 (deterministic).

    python spec/make_vectors.py            # (re)write spec/vectors/
    python spec/make_vectors.py --check    # exit 1 if the files on disk differ

Valid vectors are produced by the real writer and coders with fixed inputs;
invalid ones are assembled from the same building blocks with one defect each,
every checksum recomputed so that the defect itself is what a reader meets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

from aligncodec.codec.modes import lossless
from aligncodec.codec.entropy import rans
from aligncodec.formats.constants import DTYPES, FLOAT_FORMATS, MODE_BYTEGROUP, MODE_FLOAT_SPLIT, MODE_NAMES, MODE_STORED, MODE_TCQ, SECTION_FLAG_REQUIRED, SECTION_METADATA, SECTION_TENSOR
from aligncodec.formats.layout import TensorEntry, align, crc32
from aligncodec.formats.streams import RansStream, RawStream, ZstdStream, serialize_stream
from aligncodec.formats.reader import parse_preamble
from aligncodec.formats.writer import ArchiveWriter, build_header, build_preamble, build_section, serialize_entry

HERE = Path(__file__).resolve().parent / "vectors"


# ----------------------------------------------------------------- inputs


def _bits(dtype: str, values: np.ndarray) -> np.ndarray:
    """Little-endian bytes of ``values`` in ``dtype`` (BF16 by truncating F32 with round-to-nearest-even)."""
    if dtype == "BF16":
        u = np.asarray(values, dtype="<f4").view("<u4").astype(np.uint64)
        rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
        return rounded.view(np.uint8)
    np_dt = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8", "U8": "u1",
             "BOOL": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "F8_E4M3": "u1", "F8_E5M2": "u1"}[dtype]
    return np.ascontiguousarray(np.asarray(values).astype(np_dt)).view(np.uint8).reshape(-1)


def _weights(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n) * 0.02


def valid_cases() -> dict[str, list[tuple]]:
    """name -> list of (tensor name, dtype, shape, bytes, mode/streams override or None)."""
    rng = np.random.default_rng(1234)
    cases: dict[str, list[tuple]] = {}
    cases["empty_archive"] = []
    cases["scalar"] = [("scale", "F32", (), _bits("F32", np.array([0.125])), None)]
    cases["empty_tensor"] = [("nothing", "BF16", (0, 4), b"", None)]
    cases["odd_shapes"] = [
        ("w.odd", "BF16", (17, 31), _bits("BF16", _weights(17 * 31, 1)), None),
        ("w.cube", "F16", (3, 5, 7), _bits("F16", _weights(105, 2)), None),
        ("w.vec", "F32", (1001,), _bits("F32", _weights(1001, 3)), None),
    ]
    # one chunk: 4000 BF16 weights, default chunk size (float-split wins at this size)
    cases["one_chunk"] = [("w", "BF16", (40, 100), _bits("BF16", _weights(4000, 4)), None)]
    # many chunks: same weights, 64 symbols per chunk -> 16 chunks
    w = _bits("BF16", _weights(1000, 4))
    sym, rest = lossless.split_float(w.view("<u2"), "BF16", 2)
    many = [rans.encode(sym, chunk_symbols=64), RawStream(lossless.pack_bits(rest, 6))]
    cases["many_chunks"] = [("w", "BF16", (10, 100), w, (MODE_FLOAT_SPLIT, bytes([2]), many))]
    every = []
    for i, (code, (dt, size)) in enumerate(sorted(DTYPES.items())):
        if dt.startswith("F") and not dt.startswith("F8"):
            vals = _weights(300, 10 + i)
        elif dt == "BOOL":
            vals = rng.integers(0, 2, 300)
        elif dt.startswith("F8"):
            vals = rng.integers(0, 256, 300)
        else:
            hi = 127 if dt == "I8" else 255 if dt == "U8" else 30000
            lo = 0 if dt.startswith("U") else -hi
            vals = rng.integers(lo, hi, 300)
        every.append((f"t.{dt.lower()}", dt, (20, 15), _bits(dt, vals), None))
    cases["every_dtype"] = every
    cases["stored_zstd"] = [("ids", "I64", (512,), _bits("I64", np.arange(512) % 7), None)]
    cases["unicode_names"] = [
        ("模型.层.0.权重", "F32", (2, 2), _bits("F32", np.array([1.0, 2.0, 3.0, 4.0])), None),
        ("ü/ß.bias", "F64", (3,), _bits("F64", np.array([-1.5, 0.0, 2.25])), None),
    ]
    # interleaved lanes (coder 3, spec §6.6): 32 lanes over 4 chunks (the last partial),
    # 5 lanes, and a stream whose only chunk has fewer symbols than lanes
    lw = _bits("BF16", _weights(1000, 5))
    lsym, lrest = lossless.split_float(lw.view("<u2"), "BF16", 2)
    lanes32 = [rans.encode(lsym, chunk_symbols=256, lanes=32), RawStream(lossless.pack_bits(lrest, 6))]
    fw = _bits("F16", _weights(300, 6))
    fsym, frest = lossless.split_float(fw.view("<u2"), "F16", 3)
    lanes5 = [rans.encode(fsym, chunk_symbols=64, lanes=5), RawStream(lossless.pack_bits(frest, 8))]
    sw = _bits("BF16", _weights(20, 7))
    ssym, srest = lossless.split_float(sw.view("<u2"), "BF16", 2)
    few = [rans.encode(ssym, chunk_symbols=64, lanes=32), RawStream(lossless.pack_bits(srest, 6))]
    cases["rans_lanes"] = [
        ("w.lanes32", "BF16", (10, 100), lw, (MODE_FLOAT_SPLIT, bytes([2]), lanes32)),
        ("w.lanes5", "F16", (300,), fw, (MODE_FLOAT_SPLIT, bytes([3]), lanes5)),
        ("w.few", "BF16", (20,), sw, (MODE_FLOAT_SPLIT, bytes([2]), few)),
    ]
    # a mixed archive: one tensor in chunked rANS (coder 2), one in interleaved lanes (coder 3)
    old = [rans.encode(lsym, chunk_symbols=256), RawStream(lossless.pack_bits(lrest, 6))]
    cases["mixed_layouts"] = [
        ("a.chunked", "BF16", (10, 100), lw, (MODE_FLOAT_SPLIT, bytes([2]), old)),
        ("b.lanes", "BF16", (10, 100), lw, (MODE_FLOAT_SPLIT, bytes([2]), lanes32)),
    ]
    cases["aux_file"] = [
        ("w", "F32", (4,), _bits("F32", np.array([1.0, -2.0, 0.5, 0.0])), None),
        ("acz:file/config.json", "U8", (16,), b'{"hidden": 576}\n', None),
    ]
    cases["bytegroup"] = bytegroup_case()
    cases["sharded_index"] = [
        ("a.weight", "F32", (2, 3), _bits("F32", np.arange(6) * 0.25), None),
        ("b.bias", "F32", (1,), _bits("F32", np.array([-1.0])), None),
        ("b.weight", "F32", (2, 3), _bits("F32", np.arange(6) * -0.5), None),
    ]
    return cases


# metadata of the valid vectors that carry reserved keys (the others: _BASE_META only)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
SHARDED_FILES = {SHARDS[0]: {"metadata": {"format": "pt"}, "tensors": ["a.weight"]},
                 SHARDS[1]: {"metadata": {"format": "pt"}, "tensors": ["b.bias", "b.weight"]}}
SHARDED_INDEX = {"model.safetensors.index.json": {
    "files": list(SHARDS),
    "fields": {"metadata": {"total_size": 52, "total_parameters": 13}},
    # huggingface_hub's layout: unsorted, weight map in the writer's order, no final newline
    "layout": {"indent": 2, "sort_keys": False, "ascii": True, "newline": False, "at": 0,
               "order": ["b.bias", "a.weight", "b.weight"]}}}
VALID_META = {"sharded_index": {"acz.files": json.dumps(SHARDED_FILES, sort_keys=True),
                                "acz.index": json.dumps(SHARDED_INDEX, separators=(",", ":"))}}
# the index file a tool that rebuilds the source files writes (spec §3.1.1), spelled out by hand
SHARDED_INDEX_TEXT = """{
  "weight_map": {
    "b.bias": "model-00002-of-00002.safetensors",
    "a.weight": "model-00001-of-00002.safetensors",
    "b.weight": "model-00002-of-00002.safetensors"
  },
  "metadata": {
    "total_size": 52,
    "total_parameters": 13
  }
}"""
VALID_FILES = {"sharded_index": {"model.safetensors.index.json": SHARDED_INDEX_TEXT}}


def _special(dtype: str, n: int, seed: int) -> bytes:
    """``n`` weights of ``dtype`` led by the values whose bits a decoder must not alter: ±0, ±inf,
    a NaN with payload, the smallest subnormal, the largest finite value."""
    width, _ = FLOAT_FORMATS[dtype]
    u = np.dtype(f"<u{width // 8}")
    b = np.frombuffer(_bits(dtype, _weights(n, seed)), dtype=u).copy()
    top = 1 << (width - 1)
    e = FLOAT_FORMATS[dtype][1]
    inf = ((1 << e) - 1) << (width - 1 - e)
    b[:8] = [0, top, inf, top | inf, inf | 1 | (1 << (width - 3 - e)), 1, inf - 1, top | 5]
    return b.tobytes()


def bytegroup_case() -> list[tuple]:
    """Mode 3 (spec §7.5): every float dtype, slices that divide numel and one that does not, planes
    stored raw and as zstd frames (with their content size), special values first."""
    out = []
    for name, dtype, shape, slice_elems, seed in [("w.f16", "F16", (300,), 128, 20), ("w.bf16", "BF16", (17, 31), 200, 21),
                                                  ("w.f32", "F32", (1001,), 1001, 22), ("w.f64", "F64", (3, 5, 7), 64, 23)]:
        n = int(np.prod(shape))
        data = _special(dtype, n, seed)
        width, _ = FLOAT_FORMATS[dtype]
        params, streams = lossless.encode_bytegroup(np.frombuffer(data, dtype=f"<u{width // 8}"), dtype, slice_elems=slice_elems)
        out.append((name, dtype, shape, data, (MODE_BYTEGROUP, params, streams)))
    return out


def _write_valid(path: Path, tensors: list[tuple], extensions=(), metadata=None) -> list[dict]:
    expect = []
    with ArchiveWriter(path, {"acz.tool": "spec/make_vectors.py", "purpose": "golden vector", **(metadata or {})}) as w:
        for name, dtype, shape, data, override in tensors:
            data = bytes(data)
            numel = int(np.prod(shape, dtype=np.int64))
            mode, params, streams = override or lossless.encode(data, dtype, numel)
            w.add(name, dtype, shape, mode, streams, params)
            expect.append({"name": name, "dtype": dtype, "shape": list(shape), "mode": MODE_NAMES[mode],
                           "sha256": hashlib.sha256(data).hexdigest()})
    if extensions:  # re-assemble with extra optional sections
        raw = path.read_bytes()
        _, hsize, doff, dsize, ntens, nsec, _ = parse_preamble(raw)
        header = raw[64 : 64 + hsize] + b"".join(build_section(k, f, p) for k, f, p in extensions)
        path.write_bytes(_assemble(header, raw[doff:], ntens, nsec + len(extensions)))
    return sorted(expect, key=lambda e: e["name"])


def _assemble(header: bytes, data: bytes, ntens: int, nsec: int, **pre) -> bytes:
    doff = align(64 + len(header), 64)
    fields = dict(header_size=len(header), data_offset=doff, data_size=len(data), n_tensors=ntens, n_sections=nsec, header_crc=crc32(header))
    fields.update(pre)
    p = build_preamble(**fields)
    return p + header + bytes(doff - 64 - len(header)) + data


# ----------------------------------------------------------------- invalid vectors


def _entry(name, dtype, shape, mode, streams, params=b"", offset=0):
    parts = []
    for i, s in enumerate(streams):
        b = serialize_stream(s)
        if i + 1 < len(streams):
            b += bytes(align(len(b), 8) - len(b))
        parts.append(b)
    data = b"".join(parts)
    e = TensorEntry(name, dtype, tuple(shape), mode, len(streams), offset, len(data), crc32(data), params)
    return e, data


def _archive(entries_data, metadata=None, sections=None, **pre) -> bytes:
    entries = [e for e, _ in entries_data]
    data = b""
    for e, d in entries_data:
        data += bytes(e.offset - len(data)) + d
    header = sections if sections is not None else build_header(metadata or {"k": "v"}, entries)
    nsec = pre.pop("n_sections", len(entries) + 1)
    return _assemble(header, data, len(entries), nsec, **pre)


def invalid_cases() -> dict[str, tuple[bytes, str]]:
    out: dict[str, tuple[bytes, str]] = {}
    w = _bits("BF16", _weights(4000, 4))
    mode, params, streams = lossless.encode(bytes(w), "BF16", 4000)
    assert mode == MODE_FLOAT_SPLIT
    good_e, good_d = _entry("w", "BF16", (40, 100), mode, streams, params)
    good = _archive([(good_e, good_d)])

    out["bad_magic"] = (b"PK\x03\x04" + good[4:], "BadMagicError")
    out["empty_file"] = (b"", "BadMagicError")
    out["truncated_preamble"] = (good[:40], "TruncatedError")
    b = bytearray(good); b[13] ^= 0x01
    out["preamble_crc"] = (bytes(b), "ChecksumError")
    hdr = build_header({"k": "v"}, [good_e])
    out["unsupported_version"] = (_assemble(hdr, good_d, 1, 2, version=2), "UnsupportedError")
    p = bytearray(good[:60]); p[50] = 1
    out["reserved_nonzero"] = (bytes(p) + struct.pack("<I", crc32(bytes(p))) + good[64:], "HeaderError")
    b = bytearray(good); b[64 + 10] ^= 0x20
    out["header_crc"] = (bytes(b), "ChecksumError")
    cut = align(64 + len(hdr), 64)
    out["truncated_header"] = (good[: 64 + len(hdr) // 2], "TruncatedError")
    out["truncated_data"] = (good[: cut + len(good_d) // 2], "TruncatedError")
    out["trailing_bytes"] = (good + b"\0", "LayoutError")
    b = bytearray(good); b[cut + 100] ^= 0x01
    out["data_crc"] = (bytes(b), "ChecksumError")
    # header-level defects
    ext_req = build_header({"k": "v"}, [good_e], [(0x0123, SECTION_FLAG_REQUIRED, b"future")])
    out["required_extension"] = (_assemble(ext_req, good_d, 1, 3), "UnsupportedError")
    meta_second = build_section(SECTION_TENSOR, 0, serialize_entry(good_e)) + build_section(SECTION_METADATA, 0, b"{}")
    out["metadata_not_first"] = (_assemble(meta_second, good_d, 1, 2), "HeaderError")
    bad_json = build_section(SECTION_METADATA, 0, b"{not json") + build_section(SECTION_TENSOR, 0, serialize_entry(good_e))
    out["bad_metadata_json"] = (_assemble(bad_json, good_d, 1, 2), "HeaderError")
    reserved_kind = build_header({"k": "v"}, [good_e], [(0x0042, 0, b"x")])
    out["reserved_section_kind"] = (_assemble(reserved_kind, good_d, 1, 3), "HeaderError")
    e2, d2 = _entry("w", "F32", (4,), MODE_STORED, [RawStream(bytes(16))], offset=align(len(good_d), 64))
    out["duplicate_name"] = (_archive([(good_e, good_d), (e2, d2)]), "HeaderError")
    e3, d3 = _entry("v", "F32", (4,), MODE_STORED, [RawStream(bytes(16))], offset=align(len(good_d), 64) + 64)
    out["noncanonical_offset"] = (_archive([(good_e, good_d), (e3, d3)]), "LayoutError")
    e4, d4 = _entry("v", "F32", (4,), MODE_STORED, [RawStream(bytes(16))], offset=0)
    out["overlapping_tensors"] = (_archive([(good_e, good_d)], sections=build_header({"k": "v"}, [good_e, e4]), n_sections=3, n_tensors=2), "LayoutError")
    huge = TensorEntry("big", "F32", (1 << 40, 1 << 20), MODE_STORED, 1, 0, 24, crc32(serialize_stream(RawStream(b""))))
    out["huge_shape"] = (_archive([(huge, serialize_stream(RawStream(b"")))]), "LimitError")
    out["huge_counts"] = (_archive([(good_e, good_d)], n_tensors=0xFFFFFFF, n_sections=0xFFFFFFF), "HeaderError")
    # stream-level defects (checksums valid)
    rs = streams[0]
    bad_sum = RansStream(rs.precision, rs.chunk_symbols, rs.n_symbols, rs.freqs.copy(), rs.chunk_lengths, rs.payload)
    bad_sum.freqs[int(np.argmax(bad_sum.freqs))] += 1
    e5, d5 = _entry("w", "BF16", (40, 100), mode, [bad_sum, streams[1]], params)
    out["freq_sum"] = (_archive([(e5, d5)]), "StreamError")
    corrupt = RansStream(rs.precision, rs.chunk_symbols, rs.n_symbols, rs.freqs, rs.chunk_lengths, bytes([rs.payload[0] ^ 0x5A]) + rs.payload[1:])
    e6, d6 = _entry("w", "BF16", (40, 100), mode, [corrupt, streams[1]], params)
    out["rans_state_corrupt"] = (_archive([(e6, d6)]), "CorruptStreamError")
    short = RansStream(rs.precision, rs.chunk_symbols, rs.n_symbols - 1, rs.freqs, rs.chunk_lengths, rs.payload)
    e7, d7 = _entry("w", "BF16", (40, 100), mode, [short, streams[1]], params)
    out["symbol_count_mismatch"] = (_archive([(e7, d7)]), "StreamError")
    raw = serialize_stream(RawStream(bytes(16)))
    e8, d8 = _entry("w", "F32", (4,), MODE_STORED, [RawStream(bytes(16))])
    d8 = bytes([7]) + d8[1:]
    e8.crc = crc32(d8)
    out["unknown_coder"] = (_archive([(e8, d8)]), "UnsupportedError")
    e9, d9 = _entry("w", "F32", (4,), 0x7777, [RawStream(bytes(16))])
    out["unknown_mode"] = (_archive([(e9, d9)]), "UnsupportedError")
    import zstandard

    z = zstandard.ZstdCompressor().compress(bytes(16))
    e10, d10 = _entry("w", "F32", (8,), MODE_STORED, [ZstdStream(z, 32)])
    out["zstd_size_mismatch"] = (_archive([(e10, d10)]), "CorruptStreamError")
    e11, d11 = _entry("w", "F32", (8,), MODE_STORED, [RawStream(bytes(16))])
    out["raw_size_mismatch"] = (_archive([(e11, d11)]), "StreamError")
    # interleaved lanes (coder 3)
    lsym, lrest = lossless.split_float(w.view("<u2"), "BF16", 2)
    ls = rans.encode(lsym, chunk_symbols=1024, lanes=32)
    lrest_s = RawStream(lossless.pack_bits(lrest, 6))
    e12, d12 = _entry("w", "BF16", (40, 100), mode, [ls, lrest_s], params)
    d12 = d12[:26] + struct.pack("<H", 33) + d12[28:]  # aux offset 2: lanes 33 > 32
    e12.crc = crc32(d12)
    out["lanes_count"] = (_archive([(e12, d12)]), "StreamError")
    tiny = RansStream(ls.precision, 64, 40, ls.freqs, np.array([100], np.uint32), bytes(100), 32)
    e13, d13 = _entry("w", "BF16", (40,), mode, [tiny, RawStream(bytes(30))], params)
    out["lanes_chunk_short"] = (_archive([(e13, d13)]), "StreamError")
    lcor = RansStream(ls.precision, ls.chunk_symbols, ls.n_symbols, ls.freqs, ls.chunk_lengths, ls.payload[:4 * 7] + bytes([ls.payload[28] ^ 0x21]) + ls.payload[29:], 32)
    e14, d14 = _entry("w", "BF16", (40, 100), mode, [lcor, lrest_s], params)
    out["lanes_state_corrupt"] = (_archive([(e14, d14)]), "CorruptStreamError")
    out.update(index_invalid(good_e, good_d))
    out.update(bytegroup_invalid())
    out.update(tcq_invalid())
    b = bytearray(good); pad_at = 64 + len(hdr)
    if pad_at < cut:
        b[pad_at] = 1
        b[40:44] = struct.pack("<I", crc32(bytes(b[64 : 64 + len(hdr)])))
        b[60:64] = struct.pack("<I", crc32(bytes(b[:60])))
        out["nonzero_header_padding"] = (bytes(b), "LayoutError")
    del raw
    return out


def index_invalid(good_e, good_d) -> dict[str, tuple[bytes, str]]:
    """acz.index (spec §3.1.1) defects on an archive of one weight "w"."""
    files = json.dumps({"model.safetensors": {"metadata": {}, "tensors": ["w"]}})
    lay = {"indent": 2, "sort_keys": True, "ascii": True, "newline": True}
    ok = {"files": ["model.safetensors"], "fields": {"metadata": {"total_size": 8000}}, "layout": lay}

    def arch(index: dict, with_files: bool = True) -> bytes:
        meta = {"acz.index": json.dumps(index, separators=(",", ":"))}
        if with_files:
            meta["acz.files"] = files
        return _archive([(good_e, good_d)], metadata=meta)

    return {
        "index_unknown_shard": (arch({"model.safetensors.index.json": {**ok, "files": ["other.safetensors"]}}), "HeaderError"),
        "index_without_files": (arch({"model.safetensors.index.json": ok}, with_files=False), "HeaderError"),
        "index_name_path": (arch({"../model.safetensors.index.json": ok}), "HeaderError"),
        "index_name_not_index": (arch({"config.json": ok}), "HeaderError"),
        "index_weight_map_stored": (arch({"model.safetensors.index.json": {**ok, "fields": {"weight_map": {"w": "x.safetensors"}}}}), "HeaderError"),
        "index_order_not_permutation": (arch({"model.safetensors.index.json": {**ok, "layout": {**lay, "sort_keys": False, "at": 0, "order": ["w", "w"]}}}),
                                        "HeaderError"),
    }


def bytegroup_invalid() -> dict[str, tuple[bytes, str]]:
    """Mode 3 (spec §7.5) defects, checksums valid."""
    import zstandard

    out: dict[str, tuple[bytes, str]] = {}
    w = np.frombuffer(_bits("BF16", _weights(300, 30)), dtype="<u2")
    params, streams = lossless.encode_bytegroup(w, "BF16", slice_elems=100)  # 3 slices x 2 planes
    assert isinstance(streams[1], ZstdStream) and len(streams) == 6

    def arch(dtype, sts, prm=params, shape=(300,)):
        e, d = _entry("w", dtype, shape, MODE_BYTEGROUP, sts, prm)
        return _archive([(e, d)])

    out["bytegroup_stream_count"] = (arch("BF16", streams[:4]), "StreamError")
    out["bytegroup_slice_zero"] = (arch("BF16", streams, bytes(4)), "StreamError")
    out["bytegroup_params_length"] = (arch("BF16", streams, params + bytes(1)), "StreamError")
    out["bytegroup_dtype"] = (arch("I16", streams), "StreamError")
    plane = lossless.bytegroup_planes(w, 16)[1, :100].tobytes()
    bare = zstandard.ZstdCompressor(level=1, write_content_size=False, write_checksum=False).compress(plane)
    out["bytegroup_no_content_size"] = (arch("BF16", [streams[0], ZstdStream(bare, 100)] + streams[2:]), "StreamError")
    longer = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=False).compress(plane + plane[:1])
    out["bytegroup_content_size"] = (arch("BF16", [streams[0], ZstdStream(longer, 100)] + streams[2:]), "CorruptStreamError")
    z = bytearray(streams[1].data)
    z[len(z) // 2] ^= 0x5A  # inside the compressed block: zstd rejects the frame when it decodes it
    out["bytegroup_zstd_corrupt"] = (arch("BF16", [streams[0], ZstdStream(bytes(z), 100)] + streams[2:]), "CorruptStreamError")
    return out


def tcq_invalid() -> dict[str, tuple[bytes, str]]:
    """Mode 4 (spec §7.6) defects, checksums valid: an unknown state-machine id (params byte 17)
    and a class alphabet reaching past the tcq symbol range ±16383."""
    from aligncodec.codec.modes import lossy

    out: dict[str, tuple[bytes, str]] = {}
    q = (np.arange(48, dtype=np.int32).reshape(6, 8) % 7) - 3
    base = lossy.EcsqParams(lossy.TRANSFORM_IDENTITY, 0.25, 0, trellis=1)
    params, streams = lossy.encode_symbols(q, base, None, None, chunk_symbols=64)

    def arch(prm, sts):
        e, d = _entry("w", "F32", q.shape, MODE_TCQ, sts, prm)
        return _archive([(e, d)])

    for mid in (0, lossy.RESERVED_TRELLIS_ID):  # 0: ecsq's reserved byte; 255: reserved, never assigned (§7.6)
        raw = bytearray(params.pack())
        raw[17] = mid
        out[f"tcq_machine_{mid}"] = (arch(bytes(raw), streams), "UnsupportedError")
    wide = q.copy()
    wide[:3] = -lossy.MAX_ABS_TCQ_SYMBOL - 1  # valid ecsq symbols past tcq's range: a class of its own (offset
    wparams, wstreams = lossy.encode_symbols(wide, base, None, None, chunk_symbols=64, classes=(2, 0))  # −16384, one symbol)
    assert wparams.n_classes == 2 and min(lossy.ClassMap.from_bytes(wstreams[2].data, 2, 6).offsets) == -lossy.MAX_ABS_TCQ_SYMBOL - 1
    out["tcq_symbol_range"] = (arch(wparams.pack(), wstreams), "StreamError")
    return out


# ----------------------------------------------------------------- main


def generate(root: Path) -> None:
    # the vectors were written with the chunked layout of 16384 symbols (coder 2); pin it, whatever
    # the encoder's default, so that they stay byte for byte
    # likewise the lossless tensors without an override were coded by the encoder's choice between
    # stored and float-split: pin that policy (the bytegroup vectors name their mode explicitly)
    with rans.default_layout(16384, 1), lossless.use_policy("float-split"):
        _generate(root)


def _generate(root: Path) -> None:
    (root / "valid").mkdir(parents=True, exist_ok=True)
    (root / "invalid").mkdir(parents=True, exist_ok=True)
    for name, tensors in valid_cases().items():
        exts = [(0x0100, 0, b"an optional extension a reader skips")] if name == "aux_file" else ()
        expect = {"tensors": _write_valid(root / "valid" / f"{name}.acz", tensors, exts, VALID_META.get(name))}
        if name in VALID_FILES:  # files a tool that rebuilds the source folder writes besides the shards
            expect["files"] = {f: {"sha256": hashlib.sha256(t.encode()).hexdigest(), "text": t} for f, t in VALID_FILES[name].items()}
        (root / "valid" / f"{name}.json").write_text(json.dumps(expect, indent=1) + "\n")
    for name, (data, err) in invalid_cases().items():
        (root / "invalid" / f"{name}.acz").write_bytes(data)
        (root / "invalid" / f"{name}.json").write_text(json.dumps({"error": err}) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the files in spec/vectors instead of writing")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    if not args.check:
        generate(args.out)
        print(f"wrote vectors to {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as d:
        generate(Path(d))
        fresh = {p.relative_to(d): p.read_bytes() for p in Path(d).rglob("*") if p.is_file()}
        disk = {p.relative_to(HERE): p.read_bytes() for sub in ("valid", "invalid") for p in (HERE / sub).rglob("*") if p.is_file()}
        if fresh != disk:
            diff = sorted(str(k) for k in set(fresh) | set(disk) if fresh.get(k) != disk.get(k))
            print("vectors differ: " + ", ".join(diff))
            return 1
    print("vectors match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
