"""The native float-split kernels (codec/entropy/_fastrans.c via codec/entropy/native.py) against
the numba kernels and the reference decoder: the same bytes out of the encoder, the same symbols
and float bits out of the decoder, the same errors on corrupt streams; archives identical for any
thread count."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from aligncodec.codec.entropy import decode_cpu, native, rans, rans_reference
from aligncodec.codec.modes import lossless
from aligncodec.formats.constants import FLOAT_FORMATS, MODE_FLOAT_SPLIT
from aligncodec.formats.errors import CorruptStreamError, StreamError
from aligncodec.formats.layout import TensorEntry
from aligncodec.formats.streams import RansStream, serialize_stream

pytestmark = pytest.mark.skipif(not native.available(), reason="native module not built (pip install -e .)")


@contextlib.contextmanager
def numba_only():
    """The numba kernels alone (native.LIB hidden)."""
    lib = native.LIB
    native.LIB = None
    try:
        yield
    finally:
        native.LIB = lib


@contextlib.contextmanager
def simd(on: bool):
    was = native.simd()
    native.set_simd(on)
    try:
        yield
    finally:
        native.set_simd(was)


def test_module_is_built_and_used():
    """setup.py builds it at pip install -e .; on this x86-64 machine the AVX2 decoder runs."""
    import platform

    assert native.available()
    if platform.machine() in ("x86_64", "AMD64"):
        assert native.simd()


def symbols(n, seed=0, top=400, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    return np.minimum(rng.geometric(0.25, size=n), top).astype(dtype)


@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 255, 1000, 131072 * 2 + 77, 1_100_003])
@pytest.mark.parametrize("layout", [(1 << 17, 32), (1 << 14, 1), (1000, 32), (999, 7), (None, None)])
def test_encoder_bytes_match_numba(n, layout):
    cs, lanes = layout
    sym = symbols(n, seed=n)
    a = rans.encode(sym, chunk_symbols=cs, lanes=lanes)
    with numba_only():
        b = rans.encode(sym, chunk_symbols=cs, lanes=lanes)
    assert serialize_stream(a) == serialize_stream(b)


@pytest.mark.parametrize("dtype,offset", [(np.uint8, 0), (np.int8, -100), (np.int16, -3000), (np.int16, 0)])
def test_encoder_small_and_signed_symbols(dtype, offset):
    sym = (symbols(200_000, seed=3, top=100).astype(np.int64) + offset).astype(dtype)
    a = rans.encode(sym, offset=offset)
    with numba_only():
        b = rans.encode(sym, offset=offset)
    assert serialize_stream(a) == serialize_stream(b)
    assert np.array_equal(decode_cpu.decode_symbols(a).astype(np.int64) + offset, sym.astype(np.int64))


def test_precision_16_and_single_symbol():
    sym = np.arange(300_000, dtype=np.uint16) % 5000  # 5000 symbols: precision 13
    a = rans.encode(sym)
    assert a.precision > 12
    with numba_only():
        assert serialize_stream(rans.encode(sym)) == serialize_stream(a)
    assert np.array_equal(decode_cpu.decode_symbols(a), sym)
    one = np.full(200_000, 9, dtype=np.uint16)  # one symbol owns every slot (decoded at precision 0)
    s = rans.encode(one, alphabet_size=10)
    with numba_only():
        assert serialize_stream(rans.encode(one, alphabet_size=10)) == serialize_stream(s)
    for on in (True, False):
        with simd(on):
            assert np.array_equal(decode_cpu.decode_symbols(s), one)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lanes", [32, 1, 5])
def test_decoder_matches_reference(lanes, threads):
    sym = symbols(131072 + 4099, seed=lanes)
    s = rans.encode(sym, chunk_symbols=8192 if lanes > 1 else 4096, lanes=lanes)
    ref = np.asarray(rans_reference.decode(s), dtype=np.uint16)
    assert np.array_equal(ref, sym)
    for on in (True, False):
        with simd(on):
            assert np.array_equal(decode_cpu.decode_symbols(s, threads=threads), ref)


def weights(dtype, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g) * 0.02
    t[:6] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30])
    tdt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    return t.to(tdt).view(torch.uint8).numpy().copy()


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("n", [256, 1001, 131072 + 9, (1 << 20) * 2 + 13])
def test_float_split_native_equals_numba(dtype, n):
    """Encoder: the same streams as the numba path (split, counts and pack in one native pass, ranges
    of 2^20 elements in parallel); decoder: the same bits with and without AVX2, at 1 and 2 threads."""
    raw = weights(dtype, n, seed=n)
    mode, params, streams = lossless.encode(raw, dtype, n, mode=MODE_FLOAT_SPLIT)
    with numba_only():
        m2, p2, s2 = lossless.encode(raw, dtype, n, mode=MODE_FLOAT_SPLIT)
    assert params == p2 and [serialize_stream(a) for a in streams] == [serialize_stream(b) for b in s2]
    e = TensorEntry("t", dtype, (n,), mode, len(streams), 0, 0, 0, params)
    for on in (True, False):
        with simd(on):
            for threads in (1, 2):
                assert lossless.decode(e, streams, threads=threads).tobytes() == raw.tobytes()
    if n <= 1001:
        assert lossless.decode(e, streams, reference=True).tobytes() == raw.tobytes()


def test_split_float_values():
    """native.split_float: the symbols, counts and packed rest of lossless.split_float + pack_bits."""
    for dtype in ("BF16", "F16", "F32"):
        width, e = FLOAT_FORMATS[dtype]
        raw = weights(dtype, (1 << 20) + 77, seed=1)
        bits = raw.view(f"<u{width // 8}")
        for k in (0, 1, 2, 3):
            if width - e - k > 25:
                continue
            sym, counts, packed = native.split_float(bits, width, e, k, threads=2)
            ref_sym, ref_rest = lossless.split_float(bits, dtype, k)
            assert np.array_equal(sym, ref_sym)
            assert np.array_equal(counts, np.bincount(ref_sym, minlength=1 << (e + k)))
            assert packed.tobytes() == lossless.pack_bits(ref_rest, width - e - k)


def _corrupt_variants(stream: RansStream, seed: int, count: int):
    rng = np.random.default_rng(seed)
    payload = bytes(stream.payload)
    for _ in range(count):
        b = bytearray(payload)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, len(b)))
            b[i] ^= 1 << int(rng.integers(0, 8))
        yield RansStream(stream.precision, stream.chunk_symbols, stream.n_symbols, stream.freqs, stream.chunk_lengths, bytes(b),
                         stream.lanes)


def test_corrupt_streams_fail_alike():
    """Flipped payload bits: the native decoder raises CorruptStreamError exactly where the numba
    decoder does (and decodes the same symbols where the damage goes unnoticed); never a crash."""
    sym = symbols(70_000, seed=9)
    s = rans.encode(sym, chunk_symbols=8192, lanes=32)
    for bad in _corrupt_variants(s, 1, 60):
        got = []
        for use_native in (True, False):
            try:
                if use_native:
                    out = decode_cpu.decode_symbols(bad, threads=1)
                else:
                    with numba_only():
                        out = decode_cpu.decode_symbols(bad, threads=1)
                got.append(out.tobytes())
            except CorruptStreamError:
                got.append("corrupt")
        assert got[0] == got[1]


def test_truncated_chunk_is_an_error():
    sym = symbols(50_000, seed=4)
    s = rans.encode(sym, chunk_symbols=50_000, lanes=32)
    short = RansStream(s.precision, s.chunk_symbols, s.n_symbols, s.freqs, np.asarray([s.chunk_lengths[0] - 2], np.uint32),
                       bytes(s.payload)[:-2], s.lanes)
    with pytest.raises((CorruptStreamError, StreamError)):
        decode_cpu.decode_symbols(short)


def test_archive_bytes_do_not_depend_on_threads(tmp_path):
    from safetensors.torch import save_file

    from aligncodec import archive, loader

    g = torch.Generator().manual_seed(2)
    sd = {"a": (torch.randn(700, 1000, generator=g) * 0.02).to(torch.bfloat16),
          "b": (torch.randn(300, 1100, generator=g) * 0.02).half(),
          "c": torch.randn(2000, 300, generator=g) * 0.02,
          "d": torch.zeros(100)}
    save_file(sd, tmp_path / "m.safetensors")
    outs = []
    for t in (1, 2, 3):
        archive.compress(tmp_path / "m.safetensors", tmp_path / f"t{t}.acz", progress=False, threads=t)
        outs.append((tmp_path / f"t{t}.acz").read_bytes())
    assert outs[0] == outs[1] == outs[2]
    for t in (1, 2):
        got = loader.load_state_dict(tmp_path / "t1.acz", threads=t)
        assert all(torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)) for k, v in sd.items())


@pytest.mark.parametrize("dtype,k", [("BF16", 0), ("BF16", 1), ("BF16", 3), ("BF16", 5), ("F16", 0), ("F16", 1), ("F16", 5),
                                     ("F32", 2), ("F32", 8)])
def test_float_split_other_mantissa_bits(dtype, k):
    """Rests of every width the decoder has a path for (one 64-bit load, byte shuffle, gather), on
    chunks that start on any bit of the rest (the merged tail chunk: 131,073 symbols)."""
    n = (1 << 20) * 2 + 13
    raw = weights(dtype, n, seed=k)
    mode, params, streams = lossless.encode(raw, dtype, n, mode=MODE_FLOAT_SPLIT, mantissa_bits=k)
    assert streams[0].chunk_symbols % 8
    with numba_only():
        assert [serialize_stream(a) for a in streams] == [serialize_stream(b) for b in
                                                          lossless.encode(raw, dtype, n, mode=MODE_FLOAT_SPLIT, mantissa_bits=k)[2]]
    e = TensorEntry("t", dtype, (n,), mode, len(streams), 0, 0, 0, params)
    for on in (True, False):
        with simd(on):
            assert lossless.decode(e, streams, threads=2).tobytes() == raw.tobytes()
