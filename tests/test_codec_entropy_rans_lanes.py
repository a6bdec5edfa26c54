"""Interleaved-lanes rANS streams (coder 3, spec/FORMAT.md §6.6): encoder, container,
reference decoder and numba CPU decoder agree; bad streams get named errors; an archive
mixing coder 2 and coder 3 tensors loads. (The CUDA warp kernel: tests/test_codec_entropy_decode_cuda.py.)"""

import numpy as np
import pytest
from byteflip import byte_flips

from aligncodec.codec.entropy import decode_cpu, rans, rans_reference
from aligncodec.formats.constants import CODER_RANS, CODER_RANS_LANES, MODE_FLOAT_SPLIT
from aligncodec.formats.reader import ArchiveReader
from aligncodec.formats.streams import RansStream, RawStream, lane_counts, parse_streams, serialize_stream
from aligncodec.formats.writer import ArchiveWriter
from aligncodec.formats.errors import CorruptStreamError, StreamError


def _roundtrip(s):
    b = serialize_stream(s)
    (t,) = parse_streams(b, 1)
    assert serialize_stream(t) == b
    return t


@pytest.mark.parametrize("lanes", [2, 3, 7, 32])
def test_lanes_roundtrip_reference_and_cpu(lanes):
    rng = np.random.default_rng(lanes)
    for n in (1, 2, lanes - 1, lanes, lanes + 1, 257, 4000):
        if n < 1:
            continue
        P = int(rng.integers(4, 17))
        alphabet = int(rng.integers(1, 60))
        f = rans.quantize_counts(rng.integers(1, 500, alphabet), P) if (1 << P) >= alphabet else None
        if f is None:
            continue
        sym = rng.choice(alphabet, size=n, p=f / f.sum()).astype(np.uint16)
        cs = int(rng.choice([1, 5, 32, 33, 100, 5000]))
        s = _roundtrip(rans.encode(sym, freqs=f, precision=P, chunk_symbols=cs, lanes=lanes))
        assert s.lanes == lanes and s.coder == CODER_RANS_LANES
        assert np.array_equal(np.asarray(rans_reference.decode(s), np.uint16), sym), (n, cs)
        assert np.array_equal(decode_cpu.decode_symbols(s), sym), (n, cs)
        # chunk lengths: min(lanes, m_c) states + whole words
        assert np.all(s.chunk_lengths >= 4 * lane_counts(n, cs, lanes))


def test_lanes_float_split_fused_join():
    from aligncodec.codec.modes import lossless

    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**16, 20000, dtype=np.uint16)
    sym, rest = lossless.split_float(bits, "BF16", 2)
    packed = lossless.pack_bits(rest, 6)
    for cs in (100, 4096, 7000):  # pairs of full chunks, odd chunk counts, a partial last chunk
        s = _roundtrip(rans.encode(sym, alphabet_size=1 << 10, chunk_symbols=cs, lanes=32))
        assert np.array_equal(decode_cpu.decode_float_split(s, packed, "BF16", 2), bits)


def _verdict(fn):
    try:
        return ("ok", np.asarray(fn(), np.uint16).tobytes())
    except CorruptStreamError:
        return ("corrupt",)


def test_lanes_corruption_same_verdict_reference_and_cpu():
    rng = np.random.default_rng(9)
    sym = rng.integers(0, 12, 3000).astype(np.uint16)
    s = rans.encode(sym, chunk_symbols=300, lanes=8)
    kinds = set()
    for i, t in byte_flips(s, rng, 150):
        want = _verdict(lambda: rans_reference.decode(t))
        assert _verdict(lambda: decode_cpu.decode_symbols(t)) == want, i
        kinds.add(want[0])
    assert "corrupt" in kinds


def test_lanes_parse_errors():
    s = rans.encode(np.arange(100, dtype=np.uint16) % 7, chunk_symbols=40, lanes=4)
    b = bytearray(serialize_stream(s))
    for lanes in (0, 1, 33, 0xFFFF):  # coder 3 needs 2..32 lanes
        bad = bytes(b[:26]) + lanes.to_bytes(2, "little") + bytes(b[28:])
        with pytest.raises(StreamError):
            parse_streams(bad, 1)
    with pytest.raises(ValueError):
        serialize_stream(RansStream(s.precision, 40, 100, s.freqs, s.chunk_lengths, s.payload, 33))
    short = RansStream(s.precision, 40, 40, s.freqs, np.array([14], np.uint32), bytes(14), 4)  # 4 states need 16 bytes
    with pytest.raises(StreamError):
        parse_streams(serialize_stream(short), 1)
    with pytest.raises(StreamError):
        decode_cpu.decode_symbols(short)
    # a coder-2 stream keeps rejecting a non-zero u16 at aux offset 2
    s2 = serialize_stream(rans.encode(np.arange(100, dtype=np.uint16) % 7, chunk_symbols=40))
    with pytest.raises(Exception):
        parse_streams(s2[:26] + (4).to_bytes(2, "little") + s2[28:], 1)


def test_mixed_archive_loads(tmp_path):
    """Tensors in coder 2 and coder 3, lossless and lossy, in one archive: the loader reads all."""
    import torch

    import aligncodec
    from aligncodec.codec.modes import lossless, lossy
    from aligncodec.formats.constants import MODE_ECSQ

    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**16, 3000, dtype=np.uint16)
    sym, rest = lossless.split_float(bits, "BF16", 2)
    packed = RawStream(lossless.pack_bits(rest, 6))
    q = np.round(rng.laplace(0, 2, (12, 24))).astype(np.int32)
    base = lossy.EcsqParams(lossy.TRANSFORM_IDENTITY, 0.01, 0)
    params, lstreams = lossy.encode_symbols(q, base, None, None, chunk_symbols=50, classes=(3, 0))
    c1 = lstreams[1]  # class 1 re-coded in lanes, classes 0 and 2 stay in coder 2
    lstreams[1] = rans.encode(decode_cpu.decode_symbols(c1), freqs=c1.freqs, precision=c1.precision, chunk_symbols=50, lanes=16)
    path = tmp_path / "mixed.acz"
    with ArchiveWriter(path) as w:
        w.add("a.old", "BF16", (3000,), MODE_FLOAT_SPLIT, [rans.encode(sym, alphabet_size=1024, chunk_symbols=700), packed], bytes([2]))
        w.add("b.new", "BF16", (3000,), MODE_FLOAT_SPLIT, [rans.encode(sym, alphabet_size=1024, chunk_symbols=700, lanes=32), packed], bytes([2]))
        w.add("c.lossy", "F32", (12, 24), MODE_ECSQ, lstreams, params.pack())
    coders = {}
    with ArchiveReader(path) as r:
        for e in r.tensors:
            coders[e.name] = [s.coder for s in r.read_streams(e)]
    assert coders["a.old"][0] == CODER_RANS and coders["b.new"][0] == CODER_RANS_LANES
    assert CODER_RANS in coders["c.lossy"] and CODER_RANS_LANES in coders["c.lossy"]
    sd = aligncodec.load_state_dict(str(path))
    for k in ("a.old", "b.new"):  # bit patterns (random bits include NaNs)
        assert sd[k].dtype == torch.bfloat16 and np.array_equal(sd[k].view(torch.int16).numpy().view(np.uint16), bits)
    W = lossy.reconstruct_from(params, q, None, None)
    assert torch.equal(sd["c.lossy"], torch.from_numpy(W))
