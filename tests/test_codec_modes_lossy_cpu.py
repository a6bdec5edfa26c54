"""The numba ecsq decoder (codec/modes/lossy_cpu.py) is bit-identical to the numpy
reconstruction of spec §7.4 (lossy.decode_numpy) on every shape class, and its
float32 -> binary16 / bfloat16 casts are torch's round-to-nearest-even."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

from aligncodec.codec.modes import lossy, lossy_cpu
from aligncodec.formats.constants import MODE_ECSQ
from aligncodec.formats.layout import TensorEntry, align, crc32
from aligncodec.formats.reader import ArchiveReader
from aligncodec.formats.streams import parse_streams, serialize_stream

VECTORS = os.path.join(os.path.dirname(__file__), "..", "spec", "vectors", "lossy")


def _entry(name, dtype, shape, params, streams):
    data = b""
    for i, s in enumerate(streams):
        b = serialize_stream(s)
        if i + 1 < len(streams):
            b += bytes(align(len(b), 8) - len(b))
        data += b
    parsed = parse_streams(data, len(streams))
    return TensorEntry(name, dtype, shape, MODE_ECSQ, len(parsed), 0, len(data), crc32(data), params.pack()), parsed


def _make(rows, n, *, dtype="F32", transform=1, colscale=False, classes=(1, 0), spread=40, step=0.01, seed=0, chunk=1 << 14):
    rng = np.random.default_rng(seed)
    # heavy-tailed symbols with a row-dependent scale, so classes differ
    scale = (1 + rng.integers(0, spread, size=(rows, 1))).astype(np.float64)
    q = np.clip(np.round(rng.standard_t(3, size=(rows, n)) * scale), -lossy.MAX_ABS_SYMBOL, lossy.MAX_ABS_SYMBOL).astype(np.int32)
    hd = lossy.HadamardData.from_seed(n, seed) if transform == 1 else None
    m = lossy.split_pow2(n)[1] if transform == 1 else 0
    flags = lossy.FLAG_COL_SCALES if colscale else 0
    scales = (0.5 + rng.random(n)).astype(np.float16) if colscale else None
    params = lossy.EcsqParams(transform, float(np.float32(step)), 0, flags, m)
    params, streams = lossy.encode_symbols(q, params, scales, hd, chunk_symbols=chunk, classes=classes)
    return _entry("t.weight", dtype, (rows, n), params, streams)


SHAPES = [(1, 1), (3, 7), (5, 8), (16, 24), (9, 96), (33, 64), (12, 576), (7, 1536), (40, 45), (64, 1)]


@pytest.mark.parametrize("rows,n", SHAPES)
@pytest.mark.parametrize("transform", [0, 1])
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_numba_equals_numpy(rows, n, transform, dtype):
    for colscale in (False, True):
        for classes in ((1, 0), (3, 0), (4, 1)):
            e, s = _make(rows, n, dtype=dtype, transform=transform, colscale=colscale, classes=classes,
                         seed=rows * 1000 + n, chunk=64)
            want = lossy.decode_numpy(e, s)
            got = lossy_cpu.decode(e, s)
            assert got.dtype == np.uint8 and got.shape == (e.nbytes,)
            assert np.array_equal(got, want), (rows, n, transform, dtype, colscale, classes)


def test_threads_and_task_split_do_not_change_bits(monkeypatch):
    e, s = _make(300, 96, dtype="BF16", colscale=True, classes=(5, 1), chunk=256, seed=3)
    want = lossy.decode_numpy(e, s)
    monkeypatch.setattr(lossy_cpu, "MIN_TASK_WEIGHTS", 96)  # many small row ranges
    for threads in (1, 2, 3):
        assert np.array_equal(lossy_cpu.decode(e, s, threads=threads), want), threads


def test_default_decode_path_is_numba_and_matches_golden_vectors():
    files = sorted(glob.glob(os.path.join(VECTORS, "*.acz")))
    assert files
    n = 0
    for f in files:
        with ArchiveReader(f) as r:
            for e in r.tensors:
                if e.mode != MODE_ECSQ:
                    continue
                s = r.read_streams(e)
                assert np.array_equal(lossy.decode(e, s), lossy.decode_numpy(e, s, reference=True))
                n += 1
    assert n >= 3


def _torch_cast(bits32: np.ndarray, dtype) -> np.ndarray:
    t = torch.from_numpy(bits32.view(np.float32)).to(dtype)
    return t.view(torch.int16).numpy().view(np.uint16)


def _interesting_bits() -> np.ndarray:
    """Every exponent with many mantissas (ties and neighbours of both targets' rounding points)."""
    rng = np.random.default_rng(0)
    exps = np.arange(0, 255, dtype=np.uint32) << np.uint32(23)
    mants = np.concatenate([
        np.arange(0, 1 << 14, dtype=np.uint32),  # low mantissas, all f16-subnormal shift points
        (np.arange(0, 1 << 10, dtype=np.uint32) << np.uint32(13)) + np.uint32(0x1000),  # f16 ties
        (np.arange(0, 1 << 10, dtype=np.uint32) << np.uint32(13)) + np.uint32(0x0FFF),
        (np.arange(0, 1 << 10, dtype=np.uint32) << np.uint32(13)) + np.uint32(0x1001),
        (np.arange(0, 1 << 7, dtype=np.uint32) << np.uint32(16)) + np.uint32(0x8000),  # bf16 ties
        (np.arange(0, 1 << 7, dtype=np.uint32) << np.uint32(16)) + np.uint32(0x7FFF),
        np.uint32(0x7FFFFF) - np.arange(0, 4096, dtype=np.uint32),
        rng.integers(0, 1 << 23, 4096, dtype=np.uint32),
    ])
    b = (exps[:, None] | mants[None, :]).reshape(-1)
    return np.concatenate([b, b | np.uint32(0x80000000), np.array([0x7F800000, 0xFF800000], np.uint32)])


@pytest.mark.parametrize("dtype,kind", [(torch.float16, lossy_cpu.KIND_F16), (torch.bfloat16, lossy_cpu.KIND_BF16)])
def test_casts_are_torch_round_to_nearest_even(dtype, kind):
    bits = _interesting_bits()
    out = np.empty(bits.size, np.uint16)
    lossy_cpu.cast_bits(bits, kind, out)
    want = _torch_cast(bits, dtype)
    bad = np.flatnonzero(out != want)
    assert bad.size == 0, [(hex(bits[i]), hex(out[i]), hex(want[i])) for i in bad[:5]]


def test_overflowing_step_is_rejected_by_both_decoders():
    # a huge step would overflow the butterflies (inf - inf = NaN, whose bits CPUs and GPUs do not
    # agree on): spec §7.4's finiteness bound rejects the archive before anything is decoded
    from aligncodec.formats.errors import StreamError

    e, s = _make(4, 8, dtype="BF16", step=3e38, spread=1, seed=1)
    with pytest.raises(StreamError, match="overflow"):
        lossy.decode_numpy(e, s)
    with pytest.raises(StreamError, match="overflow"):
        lossy_cpu.decode(e, s)
