"""Fast numba CPU decoder: bit-exact with the spec's reference decoder on random tables,
symbols and chunk sizes; same verdict on corrupt streams; fused float-split; lossless archives."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aligncodec.codec.entropy import decode_cpu, rans, rans_reference
from aligncodec.codec.modes import lossless
from aligncodec.formats.constants import MODE_FLOAT_SPLIT, MODE_STORED
from aligncodec.formats.streams import RansStream
from aligncodec.formats.reader import ArchiveReader
from aligncodec.formats.errors import CorruptStreamError, StreamError
from aligncodec.codec.torch_interop import bytes_to_tensor


@st.composite
def table_and_symbols(draw):
    """A random integer table (not necessarily fitted to the symbols) and symbols from its support."""
    precision = draw(st.integers(1, 16))
    alphabet = draw(st.integers(1, min(1 << precision, 600)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    M = 1 << precision
    # random composition of M into `alphabet` parts, some of them zero
    used = rng.random(alphabet) < draw(st.floats(0.3, 1.0))
    used[rng.integers(alphabet)] = True
    k = int(used.sum())
    cuts = np.sort(rng.choice(np.arange(1, M), size=k - 1, replace=False)) if k > 1 else np.zeros(0, np.int64)
    parts = np.diff(np.concatenate([[0], cuts, [M]]))
    freqs = np.zeros(alphabet, dtype=np.uint32)
    freqs[used] = parts
    n = draw(st.integers(0, 5000))
    p = freqs / freqs.sum()
    # draw symbols from a distribution that may differ from the table's (mismatched model)
    q = p ** draw(st.floats(0.2, 2.0))
    q[freqs == 0] = 0
    sym = rng.choice(alphabet, size=n, p=q / q.sum()).astype(np.uint16)
    return sym, freqs, precision


@settings(max_examples=150, deadline=None)
@given(table_and_symbols(), st.sampled_from([1, 2, 3, 5, 16, 100, 257, 1024, 16384]), st.sampled_from([1, 2]))
def test_matches_reference(tsp, chunk, threads):
    sym, freqs, precision = tsp
    s = rans.encode(sym, freqs=freqs, precision=precision, chunk_symbols=chunk)
    ref = np.asarray(rans_reference.decode(s), dtype=np.uint16)
    assert np.array_equal(ref, sym)
    fast = decode_cpu.decode_symbols(s, threads=threads)
    assert fast.dtype == np.uint16 and np.array_equal(fast, sym)
    # any unsigned output array works
    out = np.full(len(sym), 7, dtype=np.uint32)
    assert np.array_equal(decode_cpu.decode_symbols(s, out=out), sym) and out.dtype == np.uint32
    # and the public entry point uses it
    assert np.array_equal(rans.decode(s), sym)


def test_group_and_tail_paths():
    """Chunk counts around the group of four, with and without a short last chunk."""
    rng = np.random.default_rng(1)
    for n_chunks in range(1, 11):
        for tail in (0, 1, 37):
            n = 64 * n_chunks - (64 - tail if tail else 0)
            if n <= 0:
                continue
            sym = rng.integers(0, 50, n).astype(np.uint16)
            s = rans.encode(sym, chunk_symbols=64)
            assert np.array_equal(decode_cpu.decode_symbols(s), sym), (n_chunks, tail)


def _variants(s, payload):
    return RansStream(s.precision, s.chunk_symbols, s.n_symbols, s.freqs, s.chunk_lengths, bytes(payload))


def _verdict(fn, t):
    try:
        return ("ok", np.asarray(fn(t), dtype=np.uint16).tobytes())
    except CorruptStreamError:
        return ("corrupt", None)


@pytest.mark.parametrize("chunk", [40, 300])
def test_corruption_verdict_equals_reference(chunk):
    """Single-byte changes (250 random positions): the fast decoder fails exactly when the
    reference fails, and otherwise decodes the same symbols (group path with chunk=40, the
    one-chunk path with 300)."""
    rng = np.random.default_rng(3)
    sym = rng.integers(0, 20, 1000).astype(np.uint16)
    s = rans.encode(sym, chunk_symbols=chunk)
    for i in rng.choice(len(s.payload), size=min(250, len(s.payload)), replace=False):
        bad = bytearray(s.payload)
        bad[i] ^= int(rng.integers(1, 256))
        t = _variants(s, bad)
        assert _verdict(decode_cpu.decode_symbols, t) == _verdict(rans_reference.decode, t), i


def test_truncated_words_and_extra_words_are_caught():
    rng = np.random.default_rng(4)
    sym = rng.integers(0, 200, 4000).astype(np.uint16)
    s = rans.encode(sym, chunk_symbols=1000)
    lengths = s.chunk_lengths.copy()
    # move two words from chunk 1 to chunk 2: chunk 1 runs out, chunk 2 has words left over
    lengths[1] -= 4
    lengths[2] += 4
    t = RansStream(s.precision, s.chunk_symbols, s.n_symbols, s.freqs, lengths, s.payload)
    with pytest.raises(CorruptStreamError, match="chunk 1"):
        decode_cpu.decode_symbols(t)
    with pytest.raises(CorruptStreamError):
        rans_reference.decode(t)


def test_bad_stream_shapes_rejected():
    sym = np.arange(100, dtype=np.uint16) % 7
    s = rans.encode(sym, chunk_symbols=30)
    odd = RansStream(s.precision, s.chunk_symbols, s.n_symbols, s.freqs, s.chunk_lengths, s.payload + b"\0")
    with pytest.raises(StreamError):
        decode_cpu.decode_symbols(odd)
    few = RansStream(s.precision, s.chunk_symbols, s.n_symbols + 100, s.freqs, s.chunk_lengths, s.payload)
    with pytest.raises(StreamError):
        decode_cpu.decode_symbols(few)
    with pytest.raises(ValueError):
        decode_cpu.decode_symbols(s, out=np.empty(100, np.int16))


def test_slot_table_layout():
    freqs = np.array([3, 0, 5], dtype=np.uint32)
    t = decode_cpu.slot_table(freqs, 3)
    assert [int(e) >> 48 for e in t] == [0, 0, 0, 2, 2, 2, 2, 2]
    assert [int(e) & 0xFFFFFFFF for e in t] == [3, 3, 3, 5, 5, 5, 5, 5]
    assert [(int(e) >> 32) & 0xFFFF for e in t] == [0, 1, 2, 0, 1, 2, 3, 4]
    # a single symbol owning every slot: freq = 2^P does not overflow its field
    t = decode_cpu.slot_table(np.array([0, 1 << 16], np.uint32), 16)
    assert int(t[0]) & 0xFFFFFFFF == 1 << 16 and int(t[-1]) >> 48 == 1


def test_compact_tables_layout():
    tab, sym, P = decode_cpu.compact_tables(np.array([3, 0, 5], dtype=np.uint32), 3)
    assert P == 3 and sym.dtype == np.uint16 and tab.dtype == np.uint32
    assert sym.tolist() == [0, 0, 0, 2, 2, 2, 2, 2]
    assert [int(e) & 0xFFFF for e in tab] == [3, 3, 3, 5, 5, 5, 5, 5]
    assert [int(e) >> 16 for e in tab] == [0, 1, 2, 0, 1, 2, 3, 4]
    assert decode_cpu.compact_tables(np.ones(512, np.uint32), 9)[1].tolist() == list(range(512))  # alphabet > 256
    # a symbol owning every slot (freq 2^16 has no 16-bit field): the identity table of precision 0
    tab, sym, P = decode_cpu.compact_tables(np.array([0, 1 << 16, 0], np.uint32), 16)
    assert (P, tab.tolist(), sym.tolist()) == (0, [1], [1])
    with pytest.raises(StreamError):
        decode_cpu.compact_tables(np.array([1, 2], np.uint32), 3)


@pytest.mark.parametrize("P", [1, 12, 16])
def test_lanes_single_symbol_owning_every_slot(P):
    """freq = 2^P (the whole table) in a larger alphabet: CPU lanes decoder == reference."""
    f = np.zeros(40, np.uint32)
    f[37] = 1 << P
    sym = np.full(70000, 37, np.uint16)
    s = rans.encode(sym, freqs=f, precision=P, chunk_symbols=4096, lanes=32)
    assert np.array_equal(np.asarray(rans_reference.decode(s), np.uint16), sym)
    assert np.array_equal(decode_cpu.decode_symbols(s, threads=2), sym)


# ----------------------------------------------------------------- float-split


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(list(lossless.FLOAT_FORMATS)),
    st.integers(0, 3),
    st.integers(0, 3000),
    st.sampled_from([1, 3, 64, 999, 16384]),
    st.integers(0, 2**32 - 1),
)
def test_float_split_fused_matches_reference_join(dtype, k, n, chunk, seed):
    width, e = lossless.FLOAT_FORMATS[dtype]
    rng = np.random.default_rng(seed)
    u = {16: np.uint16, 32: np.uint32, 64: np.uint64}[width]
    x = rng.standard_normal(n) * 0.02
    bits = x.astype({"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.float32}[dtype]).view(
        {"F16": np.uint16, "F32": np.uint32, "F64": np.uint64, "BF16": np.uint32}[dtype])
    if dtype == "BF16":
        bits = (bits >> np.uint32(16)).astype(np.uint16)
    bits = bits.astype(u)
    wild = rng.random(n) < 0.05  # some arbitrary bit patterns among the weights
    bits[wild] = rng.integers(0, np.iinfo(u).max, size=int(wild.sum()), dtype=u, endpoint=True)
    sym, rest = lossless.split_float(bits, dtype, k)
    s = rans.encode(sym, alphabet_size=1 << (e + k), chunk_symbols=chunk)
    packed = lossless.pack_bits(rest, width - e - k)
    got = decode_cpu.decode_float_split(s, packed, dtype, k)
    assert got.dtype == u and np.array_equal(got, bits)
    ref = lossless.join_float(np.asarray(rans_reference.decode(s), np.uint16), lossless.unpack_bits(packed, n, width - e - k), dtype, k)
    assert np.array_equal(got, ref)


def test_float_split_random_bit_patterns():
    """Every bit pattern (NaNs, infinities, subnormals, signs) survives the fused join."""
    rng = np.random.default_rng(5)
    for dtype, k in [("BF16", 2), ("F16", 3), ("F32", 0), ("F32", 5), ("F64", 0), ("F64", 2)]:
        width, e = lossless.FLOAT_FORMATS[dtype]
        u = {16: np.uint16, 32: np.uint32, 64: np.uint64}[width]
        bits = rng.integers(0, np.iinfo(u).max, size=5003, dtype=u, endpoint=True)
        sym, rest = lossless.split_float(bits, dtype, k)
        s = rans.encode(sym, alphabet_size=1 << (e + k), chunk_symbols=333)
        packed = lossless.pack_bits(rest, width - e - k)
        for threads in (1, 2):
            assert np.array_equal(decode_cpu.decode_float_split(s, packed, dtype, k, threads=threads), bits), dtype


def test_float_split_rejects_bad_rest():
    bits = (np.arange(1000, dtype=np.uint16) * 37) & np.uint16(0x7FFF)
    sym, rest = lossless.split_float(bits, "BF16", 2)
    s = rans.encode(sym, alphabet_size=1 << 10)
    packed = bytearray(lossless.pack_bits(rest, 6))
    with pytest.raises(StreamError):
        decode_cpu.decode_float_split(s, bytes(packed[:-1]), "BF16", 2)
    packed[-1] |= 0x80  # 1000*6 bits = 750 bytes exactly, so no padding: use an odd count instead
    sym2, rest2 = lossless.split_float(bits[:999], "BF16", 2)
    s2 = rans.encode(sym2, alphabet_size=1 << 10)
    p2 = bytearray(lossless.pack_bits(rest2, 6))
    p2[-1] |= 0x80
    with pytest.raises(CorruptStreamError):
        decode_cpu.decode_float_split(s2, bytes(p2), "BF16", 2)
    with pytest.raises(StreamError):
        decode_cpu.decode_float_split(s, bytes(packed), "I8", 0)


# ----------------------------------------------------------------- lossless archives


def _archive(tmp_path, tensors):
    from safetensors.torch import save_file

    from aligncodec import archive

    src = tmp_path / "m.safetensors"
    save_file(tensors, str(src))
    out = tmp_path / "m.acz"
    archive.compress(src, out, progress=False)
    return out


def test_lossless_archive_fast_equals_reference_and_original(tmp_path):
    import torch


    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": (torch.randn(300, 200, generator=g) * 0.05).to(torch.bfloat16),
        "b.f16": (torch.randn(1000, generator=g) * 0.1).to(torch.float16),
        "c.f32": torch.randn(64, 65, generator=g),
        "d.f64": torch.randn(500, generator=g, dtype=torch.float64),
        "e.i32": torch.arange(700, dtype=torch.int32),
        "f.small": torch.randn(5, generator=g).to(torch.bfloat16),
    }
    path = _archive(tmp_path, tensors)
    modes = set()
    with ArchiveReader(path) as r:
        for e in r.tensors:
            streams = r.read_streams(e)
            modes.add(e.mode)
            fast = lossless.decode(e, streams)
            ref = lossless.decode(e, streams, reference=True)
            assert np.array_equal(fast, ref), e.name
            t = bytes_to_tensor(e, fast)
            assert torch.equal(t.view(torch.uint8), tensors[e.name].contiguous().view(torch.uint8)), e.name
    assert MODE_FLOAT_SPLIT in modes and MODE_STORED in modes


@pytest.mark.parametrize("n", [1190, 1230, 95, 120])
def test_last_chunks_in_lock_step_same_verdicts_as_one_by_one(n):
    """Two or three chunks left after the groups of four (the last one short) are decoded in lock
    step (_decode_four_var): byte flips give the reference's verdict, and the chunk a failure names
    is the first one that fails when every chunk is decoded alone (_decode_one)."""
    rng = np.random.default_rng(n)
    sym = rng.integers(0, 30, n).astype(np.uint16)
    s = rans.encode(sym, chunk_symbols=40, lanes=1)
    assert -(-n // 40) % 4 in (2, 3)
    words, chunk_w = decode_cpu._words(s)
    tab, symt, precision = decode_cpu.compact_tables(s.freqs, s.precision)

    def first_bad_alone(t):
        w, cw = decode_cpu._words(t)
        out = np.empty(n, np.uint16)
        for c in range(len(cw) - 1):
            m = min(40, n - 40 * c)
            code = decode_cpu._decode_one(w, len(w) - 1, tab, symt, precision, cw[c], cw[c + 1], m, out, 40 * c)
            if code:
                return c, code
        return None

    assert first_bad_alone(s) is None
    for i in rng.choice(len(s.payload), size=min(200, len(s.payload)), replace=False):
        bad = bytearray(s.payload)
        bad[i] ^= int(rng.integers(1, 256))
        t = _variants(s, bad)
        for threads in (1, 2):
            assert _verdict(lambda x: decode_cpu.decode_symbols(x, threads=threads), t) == _verdict(rans_reference.decode, t), i
        alone = first_bad_alone(t)
        try:
            decode_cpu.decode_symbols(t, threads=1)
            assert alone is None, i
        except CorruptStreamError as exc:
            assert alone is not None and f"chunk {alone[0]} " in str(exc) and f"(code {alone[1]})" in str(exc), (i, exc)
