"""Hostile-archive generator (issue 15): small archives that attack the reader, each with
the named error every read path must raise.

Each case is built in memory from the container's own serialisers with valid CRCs, so
it reaches past the checksums into the validation it targets. ``CASES`` maps a case
name to a :class:`Case`; ``expect`` is the error class name (``"OK"``: a valid archive
that must decode) that ``verify``, ``inspect``, ``decompress``, ``load`` and
``load_state_dict`` must all agree on (tests/test_hostile.py runs them).

    python tests/hostile.py --out DIR          # write DIR/<case>.acz and DIR/manifest.json
    python tests/hostile.py --table [--cases a,b]   # the CLI on every case: exit code, error, peak MB

Cases of the writer side (auxiliary-file names, decompress file safety) live with
their own tests; :data:`WRITER_HOOKS` names the ones to add here once they land.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from types import SimpleNamespace  # noqa: E402

from aligncodec.formats import constants as _k, layout as _l, streams as _s, writer as _w  # noqa: E402

# the container's serialisers and constants under one name
C = SimpleNamespace(**{k: v for m in (_k, _l, _s, _w) for k, v in vars(m).items() if not k.startswith("__")})
C._serialize_entry = _w.serialize_entry
C._PREAMBLE, C._SECTION = _l.PREAMBLE, _l.SECTION

MiB = 1 << 20
GiB = 1 << 30
RANS_CHUNK_MAX = 1 << 24

# --------------------------------------------------------------------------- building blocks


@dataclass
class T:
    """One tensor as the generator writes it: any fields, any streams, CRC made valid."""

    name: str
    dtype: str
    shape: tuple
    mode: int
    streams: list  # container Stream objects, or one bytes object = the tensor's raw data
    params: bytes = b""
    stream_count: int | None = None  # default: len(streams)


def tensor_data(streams) -> bytes:
    if isinstance(streams, (bytes, bytearray)):
        return bytes(streams)
    parts = []
    for i, s in enumerate(streams):
        b = C.serialize_stream(s)
        if i + 1 < len(streams):
            b += bytes(C.align(len(b), C.STREAM_ALIGN) - len(b))
        parts.append(b)
    return b"".join(parts)


def build(metadata: dict | bytes, tensors: list[T], *, gap_byte: int = 0) -> bytes:
    """An archive of these tensors in the given order, canonical layout, valid CRCs.
    ``metadata``: a dict (written as the writer does) or the raw METADATA payload.
    ``gap_byte``: the value of the padding bytes between tensors (0 is valid)."""
    meta = metadata if isinstance(metadata, (bytes, bytearray)) else json.dumps(metadata, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    datas = [tensor_data(t.streams) for t in tensors]
    entries = []
    pos = 0
    for t, d in zip(tensors, datas):
        entries.append(C.TensorEntry(t.name, t.dtype, tuple(t.shape), t.mode, t.stream_count if t.stream_count is not None else
                                     (1 if isinstance(t.streams, (bytes, bytearray)) else len(t.streams)), pos, len(d), C.crc32(d), t.params))
        pos = C.align(pos + len(d), C.DATA_ALIGN)
    data_size = entries[-1].offset + entries[-1].size if entries else 0
    header = C.build_section(C.SECTION_METADATA, 0, bytes(meta)) + b"".join(
        C.build_section(C.SECTION_TENSOR, 0, C._serialize_entry(e)) for e in entries)
    data_offset = C.align(C.PREAMBLE_SIZE + len(header), C.DATA_ALIGN)
    out = bytearray(C.build_preamble(len(header), data_offset, data_size, len(entries), len(entries) + 1, C.crc32(header)))
    out += header
    out += bytes(data_offset - len(out))
    for e, d in zip(entries, datas):
        out += bytes([gap_byte]) * (data_offset + e.offset - len(out))
        out += d
    return bytes(out)


def zstd_rle_frame(size: int, value: int = 0) -> bytes:
    """A valid zstd frame (RFC 8878) of ``size`` copies of one byte: RLE blocks of 128 KiB,
    4 bytes each — 1 GiB in 32 KiB, the expansion a hostile archive uses."""
    out = bytearray(b"\x28\xb5\x2f\xfd")
    out += bytes([0xE0]) + struct.pack("<Q", size)  # single segment, 8-byte content size
    block = 128 << 10
    left = size
    while True:
        n = min(block, left)
        left -= n
        last = 1 if left == 0 else 0
        out += (last | (1 << 1) | (n << 3)).to_bytes(3, "little") + bytes([value])
        if last:
            return bytes(out)


def one_symbol_rans(n_symbols: int, chunk_symbols: int = RANS_CHUNK_MAX) -> C.RansStream:
    """A valid rANS stream of ``n_symbols`` zeros that costs 4 bytes per chunk: a one-symbol
    table (f = M) never renormalises, so every chunk is just the final state L."""
    n_chunks = -(-n_symbols // chunk_symbols)
    state = struct.pack("<I", C.RANS_STATE_LOWER)
    return C.RansStream(1, chunk_symbols, n_symbols, np.array([2], np.uint32), np.full(n_chunks, 4, np.uint32), state * n_chunks)


def ecsq_params(transform: int = 0, m: int = 0, step: float = 1.0) -> bytes:
    from aligncodec.codec.modes import lossy

    return lossy.EcsqParams(transform, step, 0, 0, m).pack()


def stored(name: str, raw: bytes, dtype: str = "U8", shape: tuple | None = None) -> T:
    return T(name, dtype, shape if shape is not None else (len(raw),), C.MODE_STORED, [C.RawStream(raw)])


def files_meta(files) -> dict:
    return {"acz.tool": "hostile", "acz.files": files if isinstance(files, str) else json.dumps(files)}


W = stored("w", b"\x01\x02\x03\x04", "F32", (1,))  # one small valid weight
FILES_W = {"model.safetensors": {"metadata": {}, "tensors": ["w"]}}

INDEX = "model.safetensors.index.json"
INDEX_W = {"files": ["model.safetensors"], "fields": {"metadata": {"total_size": 4}},
           "layout": {"indent": 2, "sort_keys": True, "ascii": True, "newline": True}}


def index_meta(index, files=FILES_W) -> dict:
    """Metadata with ``acz.files`` and ``acz.index`` (spec §3.1); ``index`` a dict or the raw text."""
    meta = files_meta(files) if files is not None else {"acz.tool": "hostile"}
    meta["acz.index"] = index if isinstance(index, str) else json.dumps(index)
    return meta


def _index_with(**kw) -> dict:
    return {INDEX: {**INDEX_W, **kw}}


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    build: Callable[[], bytes]
    expect: str  # error class name every read path raises, or "OK"
    finding: str  # what it attacks (issue 15 wording)
    tensors: dict = field(default_factory=dict)  # for "OK": tensor name -> expected decoded bytes


def _hadamard(rows: int, n: int, m: int) -> bytes:
    from aligncodec.codec.modes import lossy

    p = n // m
    assert p * m == n and lossy.split_pow2(n) == (p, m)
    hd = bytes((n + 7) // 8) + np.eye(m, dtype="<f4").tobytes()
    t = T("h.weight", "F32", (rows, n), C.MODE_ECSQ, [one_symbol_rans(rows * n, 1 << 14), C.RawStream(hd)], ecsq_params(1, m))
    return build({}, [t])


def _tcq(q, machine: int, classes=(1, 0)) -> T:
    """A mode 4 (tcq, spec §7.6) F32 tensor of symbols q, identity transform, step 0.5;
    ``machine`` goes into params byte 17 as it is (valid or not)."""
    from aligncodec.codec.modes import lossy

    q = np.asarray(q, np.int32)
    base = lossy.EcsqParams(lossy.TRANSFORM_IDENTITY, 0.5, 0, trellis=1)
    params, streams = lossy.encode_symbols(q, base, None, None, chunk_symbols=64, classes=classes)
    raw = bytearray(params.pack())
    raw[17] = machine
    return T("t.weight", "F32", q.shape, C.MODE_TCQ, streams, bytes(raw))


# machine 1 (VVC's 4 states) on these symbols walks to the levels [[2, -2, 4], [5, 0, -4]] (spec §7.6 by hand:
# column 0 leaves state 0 on parity 1 for state 2, whose quantiser is 1: 2·3 − 1); W = 0.5·L
TCQ_Q = [[1, -1, 2], [3, 0, -2]]
TCQ_W = np.array([1.0, -1.0, 2.0, 2.5, 0.0, -2.0], "<f4").tobytes()

CASES: dict[str, Case] = {
    # ---- only named errors: metadata JSON
    "nested_metadata": Case(lambda: build(b"[" * 100000, [W]), "HeaderError", "deeply nested metadata JSON (RecursionError)"),
    "nested_metadata_object": Case(lambda: build(b'{"a":' * 50000, [W]), "HeaderError", "deeply nested metadata JSON object"),
    "nested_acz_files": Case(lambda: build(files_meta("[" * 100000), [W]), "HeaderError", "acz.files nested 100000 deep"),
    "nested_acz_lossy": Case(lambda: build({"acz.lossy": "[" * 100000}, [W]), "HeaderError", "acz.lossy nested 100000 deep"),
    "duplicate_metadata_key": Case(lambda: build(b'{"acz.tool":"a","acz.tool":"b"}', [W]), "HeaderError", "duplicate key in the metadata JSON"),
    "metadata_lone_surrogate": Case(lambda: build(b'{"x":"\\ud800"}', [W]), "HeaderError", "a lone surrogate in a metadata string"),
    "metadata_nan": Case(lambda: build({"acz.lossy": '{"w":{"bpw":NaN}}'}, [W]), "HeaderError", "NaN in reserved metadata JSON"),
    # ---- acz.files of the wrong shape
    "acz_files_list": Case(lambda: build(files_meta("[]"), [W]), "HeaderError", "acz.files is a list (AttributeError)"),
    "acz_files_string": Case(lambda: build(files_meta('"model.safetensors"'), [W]), "HeaderError", "acz.files is a string (AttributeError)"),
    "acz_files_info_list": Case(lambda: build(files_meta({"model.safetensors": ["w"]}), [W]), "HeaderError", "acz.files value is a list"),
    "acz_files_tensor_not_string": Case(lambda: build(files_meta({"model.safetensors": {"metadata": {}, "tensors": [["w"]]}}), [W]),
                                        "HeaderError", "acz.files tensor name is not a string (TypeError)"),
    "acz_files_tensors_dict": Case(lambda: build(files_meta({"model.safetensors": {"metadata": {}, "tensors": {"w": 1}}}), [W]),
                                   "HeaderError", "acz.files tensors is an object"),
    "acz_files_metadata_not_string": Case(lambda: build(files_meta({"model.safetensors": {"metadata": {"a": 1}, "tensors": ["w"]}}), [W]),
                                          "HeaderError", "acz.files per-file metadata value is not a string"),
    "acz_files_duplicate_key": Case(lambda: build(files_meta('{"model.safetensors":{"metadata":{},"tensors":["w"]},"model.safetensors":{"metadata":{},"tensors":[]}}'), [W]),
                                    "HeaderError", "acz.files with a duplicated key (silently another file split)"),
    "acz_files_tensor_twice": Case(lambda: build(files_meta({"a.safetensors": {"metadata": {}, "tensors": ["w"]}, "b.safetensors": {"metadata": {}, "tensors": ["w"]}}), [W]),
                                   "HeaderError", "acz.files lists one tensor in two files"),
    "acz_files_unknown_tensor": Case(lambda: build(files_meta({"model.safetensors": {"metadata": {}, "tensors": ["w", "nope"]}}), [W]),
                                     "HeaderError", "acz.files lists a tensor the archive lacks (verify said OK)"),
    "acz_files_aux_as_weight": Case(lambda: build(files_meta({"model.safetensors": {"metadata": {}, "tensors": ["w", "acz:file/c.json"]}}),
                                                  [W, stored("acz:file/c.json", b"{}")]), "HeaderError", "acz.files lists an auxiliary file as a weight"),
    "acz_files_path_name": Case(lambda: build(files_meta({"../evil.safetensors": {"metadata": {}, "tensors": ["w"]}}), [W]),
                                "HeaderError", "acz.files names a path outside the output folder (verify said OK)"),
    "acz_files_nul_name": Case(lambda: build(files_meta({"a\x00.safetensors": {"metadata": {}, "tensors": ["w"]}}), [W]),
                               "HeaderError", "acz.files names a file with NUL (ValueError)"),
    "acz_files_escape_name": Case(lambda: build(files_meta({"\x1b]0;x\x07.safetensors": {"metadata": {}, "tensors": ["w"]}}), [W]),
                                  "HeaderError", "acz.files names a file with an escape sequence"),
    # ---- acz.index (issue 26): the shard index is derived, never smuggled in, never a path
    "aux_index_smuggled": Case(lambda: build(index_meta({INDEX: INDEX_W}), [W, stored("acz:file/" + INDEX, b'{"weight_map":{"w":"../x"}}')]),
                               "HeaderError", "an auxiliary file named like the shard index (it would replace the derived one)"),
    "aux_index_smuggled_case": Case(lambda: build(index_meta({INDEX: INDEX_W}), [W, stored("acz:file/Model.SafeTensors.Index.JSON", b"{}")]),
                                    "HeaderError", "an auxiliary file named like the shard index up to case"),
    "acz_index_list": Case(lambda: build(index_meta("[]"), [W]), "HeaderError", "acz.index is a list"),
    "acz_index_nested": Case(lambda: build(index_meta("[" * 100000), [W]), "HeaderError", "acz.index nested 100000 deep"),
    "acz_index_path_name": Case(lambda: build(index_meta({"../m.safetensors.index.json": INDEX_W}), [W]),
                                "HeaderError", "acz.index names a path outside the output folder"),
    "acz_index_other_name": Case(lambda: build(index_meta({"config.json": INDEX_W}), [W]),
                                 "HeaderError", "acz.index names a file that is not an index (it would replace config.json)"),
    "acz_index_case_names": Case(lambda: build(index_meta({INDEX: INDEX_W, "Model.safetensors.index.json": {**INDEX_W, "files": []}}), [W]),
                                 "HeaderError", "two index names equal up to case"),
    "acz_index_unknown_file": Case(lambda: build(index_meta(_index_with(files=["other.safetensors"])), [W]),
                                   "HeaderError", "acz.index names a shard acz.files lacks"),
    "acz_index_without_files": Case(lambda: build(index_meta({INDEX: INDEX_W}, files=None), [W]),
                                    "HeaderError", "acz.index without acz.files"),
    "acz_index_file_twice": Case(lambda: build(index_meta({INDEX: INDEX_W, "b.safetensors.index.json": INDEX_W}), [W]),
                                 "HeaderError", "one shard named by two indexes"),
    "acz_index_weight_map_field": Case(lambda: build(index_meta(_index_with(fields={"weight_map": {"w": "x.safetensors"}})), [W]),
                                       "HeaderError", "acz.index carries a weight map of its own"),
    "acz_index_total_size": Case(lambda: build(index_meta(_index_with(fields={"metadata": {"total_size": "4"}})), [W]),
                                 "HeaderError", "metadata.total_size is a string"),
    "acz_index_extra_field": Case(lambda: build(index_meta({INDEX: {**INDEX_W, "bytes": "{}"}}), [W]),
                                  "HeaderError", "an unknown field in an acz.index entry"),
    "acz_index_order": Case(lambda: build(index_meta(_index_with(layout={"indent": 2, "sort_keys": False, "ascii": True, "newline": True,
                                                                          "at": 1, "order": ["w", "w"]})), [W]),
                            "HeaderError", "a weight-map order that is not a permutation of the index's tensors"),
    "acz_index_indent": Case(lambda: build(index_meta(_index_with(layout={"indent": 1 << 30, "sort_keys": True, "ascii": True, "newline": True})), [W]),
                             "HeaderError", "an indent of 2^30 (a 2^30-byte line per member)"),
    # ---- acz.lossy of the wrong shape
    "acz_lossy_list": Case(lambda: build({"acz.lossy": '["w"]'}, [W]), "HeaderError", "acz.lossy is a list (TypeError in inspect)"),
    "acz_lossy_string": Case(lambda: build({"acz.lossy": '"w"'}, [W]), "HeaderError", "acz.lossy is a string (TypeError in inspect)"),
    "acz_lossy_entry_list": Case(lambda: build({"acz.lossy": '{"w":[1]}'}, [W]), "HeaderError", "acz.lossy entry is a list"),
    "acz_lossy_field_type": Case(lambda: build({"acz.lossy": '{"w":{"kind":"identity","act_rel_err":"x"}}'}, [W]),
                                 "HeaderError", "acz.lossy act_rel_err is a string (inspect's table crashes)"),
    "acz_lossy_summary_list": Case(lambda: build({"acz.lossy.summary": "[]"}, [W]), "HeaderError", "acz.lossy.summary is a list"),
    # ---- shapes and element counts
    "zero_dim_huge": Case(lambda: build({}, [T("z", "F32", (0, 2**64 - 1), C.MODE_STORED, [C.RawStream(b"")])]),
                          "LimitError", "shape (0, 2^64-1): verify OK, decompress/load TypeError"),
    "zero_dim_2_63": Case(lambda: build({}, [T("z", "U8", (0, 2**63), C.MODE_STORED, [C.RawStream(b"")])]),
                          "LimitError", "shape (0, 2^63): a dimension no int64 holds"),
    "zero_dim_span": Case(lambda: build({}, [T("z", "BF16", (1 << 20, 0, 1 << 20), C.MODE_STORED, [C.RawStream(b"")])]),
                          "LimitError", "zero-size tensor spanning 2 TiB"),
    # ---- one validation path
    "nonzero_tensor_padding": Case(lambda: build({}, [stored("a", b"\x01\x02\x03"), stored("b", b"\x04")], gap_byte=0xAB),
                                   "LayoutError", "non-zero padding between tensors (verify rejected, decompress/inspect accepted)"),
    "aux_not_u8": Case(lambda: build({}, [W, T("acz:file/config.json", "F32", (1,), C.MODE_STORED, [C.RawStream(b"{}{}")])]),
                       "HeaderError", "auxiliary file that is not a 1-D U8 stored tensor"),
    "stored_with_params": Case(lambda: build({}, [T("w", "F32", (1,), C.MODE_STORED, [C.RawStream(b"\0\0\0\0")], b"\x01")]),
                               "StreamError", "stored tensor with params (accepted before)"),
    "stream_count_mode": Case(lambda: build({}, [T("w", "F32", (1,), C.MODE_STORED, [C.RawStream(b"\0\0\0\0"), C.RawStream(b"")])]),
                              "StreamError", "stored tensor with 2 streams (inspect accepted)"),
    "unknown_mode": Case(lambda: build({}, [T("w", "F32", (1,), 77, [C.RawStream(b"\0\0\0\0")])]),
                         "UnsupportedError", "unknown coding mode (inspect accepted)"),
    "zstd_content_size": Case(lambda: build({}, [T("w", "U8", (100,), C.MODE_STORED, [C.ZstdStream(zstd_rle_frame(50), 100)])]),
                              "CorruptStreamError", "zstd frame's own content size differs from the declared size"),
    "ecsq_m_mismatch": Case(lambda: build({}, [T("h", "F32", (2, 12), 2, [one_symbol_rans(24), C.RawStream(bytes(2 + 4 * 25))], ecsq_params(1, 5))]),
                            "StreamError", "ecsq Hadamard m that does not divide n as spec §7.4 says"),
    "aux_name_nul": Case(lambda: build({}, [W, stored("acz:file/a\x00b.json", b"{}")]), "HeaderError", "auxiliary name with NUL (ValueError in decompress)"),
    "aux_name_newline": Case(lambda: build({}, [W, stored("acz:file/a\nb.json", b"{}")]), "HeaderError", "auxiliary name with a newline (written as given)"),
    "aux_name_path": Case(lambda: build({}, [W, stored("acz:file/../x.json", b"{}")]), "HeaderError", "auxiliary name that is a path"),
    # ---- bounded work (issue table)
    "zstd_bogus_256MiB": Case(lambda: build({}, [T("w", "U8", (256 * MiB,), C.MODE_STORED, [C.ZstdStream(b"\x28\xb5\x2f\xfd" + bytes(12), 256 * MiB)])]),
                              "LimitError", "280 bytes declaring a 256 MiB tensor (verify peaked at 968 MB)"),
    "zstd_rle_256MiB": Case(lambda: build({}, [T("w", "U8", (256 * MiB,), C.MODE_STORED, [C.ZstdStream(zstd_rle_frame(256 * MiB), 256 * MiB)])]),
                            "LimitError", "8 KB valid zstd frame of 256 MiB"),
    "zstd_rle_1GiB": Case(lambda: build({}, [T("w", "U8", (GiB,), C.MODE_STORED, [C.ZstdStream(zstd_rle_frame(GiB), GiB)])]),
                          "LimitError", "33 KB zstd frame of 1 GiB (decompress peaked at 2.3 GB)"),
    "rans_ecsq_32GiB": Case(lambda: build({}, [T("w", "F32", (1 << 16, 1 << 17), 2, [one_symbol_rans(1 << 33)], ecsq_params())]),
                            "LimitError", "a few KB declaring 32 GiB (MemoryError)"),
    "rans_float_split_64MiB": Case(lambda: build({}, [T("w", "F32", (16 * MiB,), C.MODE_FLOAT_SPLIT,
                                                        [one_symbol_rans(16 * MiB), C.ZstdStream(zstd_rle_frame(48 * MiB), 48 * MiB)], b"\x00")]),
                                   "LimitError", "2 KB float-split tensor of 64 MiB (rANS and zstd expansion)"),
    "many_tensors_expansion": Case(lambda: build({}, [T(f"t{i:03d}", "F32", (1 << 20,), C.MODE_STORED, [C.ZstdStream(zstd_rle_frame(4 * MiB), 4 * MiB)])
                                                      for i in range(64)]), "LimitError", "64 tensors of 4 MiB each from 8 KB (a per-tensor cap would allow 256 MiB)"),
    "hadamard_m_1023": Case(lambda: _hadamard(16384, 1023, 1023), "LimitError", "4 MB, Hadamard m = 1023 and 16,384 rows (verify ran 2 minutes)"),
    # ---- mode 3, bytegroup (spec §7.5): every plane's size declared before anything is decoded
    "bytegroup_rle_256MiB": Case(lambda: build({}, [T("w", "F16", (128 * MiB,), C.MODE_BYTEGROUP,
                                                      [C.ZstdStream(zstd_rle_frame(4 * MiB), 4 * MiB) for _ in range(64)], (4 * MiB).to_bytes(4, "little"))]),
                                 "LimitError", "64 RLE frames (8 KB each) declaring a 256 MiB bytegroup tensor"),
    "bytegroup_frame_larger": Case(lambda: build({}, [T("w", "BF16", (64,), C.MODE_BYTEGROUP,
                                                        [C.RawStream(bytes(64)), C.ZstdStream(zstd_rle_frame(1 << 20), 64)], (64).to_bytes(4, "little"))]),
                                   "CorruptStreamError", "a plane's zstd frame that declares 1 MiB for a 64-byte plane"),
    "bytegroup_no_content_size": Case(lambda: build({}, [T("w", "BF16", (64,), C.MODE_BYTEGROUP,
                                                           [C.RawStream(bytes(64)), C.ZstdStream(b"\x28\xb5\x2f\xfd\x00\x00" + bytes(6), 64)],
                                                           (64).to_bytes(4, "little"))]),
                                      "StreamError", "a plane's zstd frame without its content size (output unbounded until decoded)"),
    "bytegroup_streams_for_slices": Case(lambda: build({}, [T("w", "F32", (1000,), C.MODE_BYTEGROUP, [C.RawStream(bytes(1000))] * 4,
                                                              (1).to_bytes(4, "little"))]),
                                         "StreamError", "slice length 1: 1000 slices need 4000 streams, 4 given"),
    "bytegroup_ok": Case(lambda: build({}, [T("w", "BF16", (3,), C.MODE_BYTEGROUP, [C.RawStream(b"\x81\x00\x02"), C.RawStream(b"\x7f\x00\xff")],
                                              (3).to_bytes(4, "little"))]),
                         "OK", "a valid bytegroup tensor of raw planes", {"w": b"\xc0\xbf\x00\x00\x81\x7f"}),
    # ---- mode 4, tcq (spec §7.6): the state-machine id and the symbol range are checked before decoding
    "tcq_machine_unknown": Case(lambda: build({}, [_tcq(TCQ_Q, 9)]), "UnsupportedError", "tcq state-machine id 9 (params byte 17)"),
    "tcq_machine_zero": Case(lambda: build({}, [_tcq(TCQ_Q, 0)]), "UnsupportedError", "tcq with state-machine id 0 (ecsq's reserved byte)"),
    "tcq_symbol_range": Case(lambda: build({}, [_tcq([[-16384] * 3, [1, 0, -1]], 2, (2, 0))]), "StreamError",
                             "tcq class alphabet from −16384: levels would leave ±32767"),
    "tcq_ok": Case(lambda: build({}, [_tcq(TCQ_Q, 1)]), "OK", "a valid tcq tensor: the level walk down each column",
                   {"t.weight": TCQ_W}),
    # ---- valid archives the reader must still take
    "orphan_name_collision": Case(lambda: build(files_meta({"extra.safetensors": {"metadata": {}, "tensors": ["a"]}}),
                                                [stored("a", b"\x01"), stored("b", b"\x02")]),
                                  "OK", "a tensor not in acz.files while extra.safetensors exists (its tensors were silently dropped)",
                                  {"a": b"\x01", "b": b"\x02"}),
    "acz_index_ok": Case(lambda: build(index_meta({INDEX: INDEX_W}), [W]), "OK", "a valid shard index entry",
                         {"w": b"\x01\x02\x03\x04"}),
    "zero_size_ok": Case(lambda: build({}, [T("z", "BF16", (0, 1 << 20), C.MODE_STORED, [C.RawStream(b"")])]), "OK",
                         "a zero-size tensor with a large (representable) dimension", {"z": b""}),
    "zstd_rle_under_slack": Case(lambda: build({}, [T("w", "U8", (2 * MiB,), C.MODE_STORED, [C.ZstdStream(zstd_rle_frame(2 * MiB, 7), 2 * MiB)])]),
                                 "OK", "a highly compressible tensor within the expansion slack", {"w": b"\x07" * (2 * MiB)}),
}

# writer-side cases (auxiliary-file names, decompress file safety): to add here once they land on main
WRITER_HOOKS = {
    "aux_name_collision": "acz:file/model.safetensors replaces the decoded weights",
    "aux_name_escape": "acz:file/ with newlines or ANSI/OSC escapes",
}


# --------------------------------------------------------------------------- running the read paths


def run_op(op: str, path: Path, workdir: Path, limits=None) -> tuple[str, object]:
    """Run one read path on an archive: ("OK", result) or (error class name, exception).
    Unnamed errors are returned under their own class name (tests fail on them)."""
    import io

    from aligncodec import archive, loader

    kw = {} if limits is None else {"limits": limits}
    try:
        if op == "verify":
            res = archive.verify(path, **kw)
        elif op == "inspect":
            res = archive.inspect(path, **kw)
        elif op == "decompress":
            out = workdir / f"out-{path.stem}"
            res = archive.decompress(path, out, progress=False, **kw)
        elif op == "load":
            res = {n: t for n, t in loader.load(path, include_aux=True, **kw)}
        elif op == "load_stream":  # a non-seekable stream, as from a pipe
            res = loader.load_state_dict(io.BufferedReader(io.BytesIO(path.read_bytes())), **kw)
        else:
            raise ValueError(op)
        return "OK", res
    except Exception as exc:  # noqa: BLE001 - classified by the caller
        return type(exc).__name__, exc


OPS = ("verify", "inspect", "decompress", "load", "load_stream")


def write_corpus(out: Path, names=None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, case in CASES.items():
        if names and name not in names:
            continue
        data = case.build()
        (out / f"{name}.acz").write_bytes(data)
        manifest[name] = {"expect": case.expect, "finding": case.finding, "bytes": len(data)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


_CLI_WRAPPER = r"""
import resource, sys
from aligncodec.tools.cli import main
rc = main(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def cli_table(names=None, commands=("verify", "inspect", "decompress")) -> list[dict]:
    """Every case through the CLI in a fresh process: exit code, error name, peak RSS (MB),
    and the peak of the same command on a small valid archive (the baseline)."""
    import subprocess
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="acz-hostile-") as d:
        d = Path(d)
        write_corpus(d, names)
        base = d / "baseline.acz"
        base.write_bytes(build(files_meta(FILES_W), [W]))

        def run(cmd, path):
            argv = [cmd, str(path)] + (["-o", str(d / f"out-{path.stem}-{cmd}"), "-q"] if cmd == "decompress" else []) + (["-q"] if cmd == "verify" else [])
            p = subprocess.run([sys.executable, "-c", _CLI_WRAPPER, *argv], capture_output=True, text=True, timeout=600)
            peak = next((int(line.split()[1]) / 1024 for line in p.stderr.splitlines() if line.startswith("PEAK_KB")), float("nan"))
            err = next((line.split("error: ", 1)[1].split(":", 1)[0] for line in p.stderr.splitlines() if "error: " in line), "-")
            return p.returncode, err, peak

        baseline = {c: run(c, base)[2] for c in commands}
        for name in sorted(p.stem for p in d.glob("*.acz") if p.stem != "baseline"):
            for c in commands:
                rc, err, peak = run(c, d / f"{name}.acz")
                rows.append({"case": name, "command": c, "exit": rc, "error": err, "peak_mb": round(peak, 1),
                             "over_baseline_mb": round(peak - baseline[c], 1), "expect": CASES[name].expect,
                             "bytes": (d / f"{name}.acz").stat().st_size})
    return rows


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the corpus (.acz files and manifest.json) into this folder")
    ap.add_argument("--table", action="store_true", help="run the CLI on every case; print a markdown table")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--json", help="with --table: also write every row (case, command, exit, error, peak) here")
    args = ap.parse_args(argv)
    names = set(args.cases.split(",")) if args.cases else None
    if args.out:
        m = write_corpus(Path(args.out), names)
        print(f"wrote {len(m)} cases to {args.out}")
    if args.table:
        rows = cli_table(names)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        # one line per case: the three commands' exit codes and errors, the largest peak RSS
        print("| case | bytes | verify / inspect / decompress exit | error | peak MB (max) | over baseline MB |")
        print("|---|---|---|---|---|---|")
        by_case: dict[str, list] = {}
        for r in rows:
            by_case.setdefault(r["case"], []).append(r)
        for case, rs in by_case.items():
            errs = sorted({r["error"] for r in rs})
            print(f"| {case} | {rs[0]['bytes']} | {' / '.join(str(r['exit']) for r in rs)} | {', '.join(errs)} | "
                  f"{max(r['peak_mb'] for r in rs)} | {max(r['over_baseline_mb'] for r in rs)} |")
        bad = [r for r in rows if (r["error"] if r["expect"] != "OK" else ("-" if r["exit"] == 0 else r["error"])) != (r["expect"] if r["expect"] != "OK" else "-")]
        if bad:
            print(f"{len(bad)} rows differ from the expected error", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
