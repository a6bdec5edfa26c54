"""The numba tcq decoder (codec/modes/lossy_cpu.py: a level pass over the symbol buffer, then
the ecsq kernels) is bit-identical to the numpy reference of spec §7.6 (lossy.trellis_levels +
lossy.reconstruct_from after the symbols) on every machine, shape class,
transform, class layout, coder and dtype."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from aligncodec.codec.entropy import rans
from aligncodec.codec.modes import decode_entry, lossy, lossy_cpu
from aligncodec.formats.constants import MODE_TCQ
from test_codec_modes_lossy_cpu import _entry as _ecsq_entry

MACHINES = sorted(lossy.TRELLIS_MACHINES)


def _entry(name, dtype, shape, params, streams):
    e, parsed = _ecsq_entry(name, dtype, shape, params, streams)  # serialised and parsed back as ecsq's tests do
    return dataclasses.replace(e, mode=params.mode), parsed


def make_tcq(rows, n, mid, *, dtype="F32", transform=1, colscale=False, classes=(1, 0), spread=40, step=0.01, seed=0,
             chunk=64, lanes=None, extreme=False):
    """A tcq tensor entry + parsed streams with heavy-tailed symbols (row-dependent scale, so
    classes differ); ``extreme`` puts ±16383 (the end of the tcq range) in."""
    rng = np.random.default_rng(seed)
    scale = (1 + rng.integers(0, spread, size=(rows, 1))).astype(np.float64)
    lim = lossy.MAX_ABS_TCQ_SYMBOL
    q = np.clip(np.round(rng.standard_t(3, size=(rows, n)) * scale), -lim, lim).astype(np.int32)
    if extreme:
        q.reshape(-1)[rng.integers(0, q.size, size=max(1, q.size // 7))] = lim
        q.reshape(-1)[rng.integers(0, q.size, size=max(1, q.size // 7))] = -lim
    hd = lossy.HadamardData.from_seed(n, seed) if transform == 1 else None
    m = lossy.split_pow2(n)[1] if transform == 1 else 0
    flags = lossy.FLAG_COL_SCALES if colscale else 0
    scales = (0.5 + rng.random(n)).astype(np.float16) if colscale else None
    params = lossy.EcsqParams(transform, float(np.float32(step)), 0, flags, m, trellis=mid)
    params, streams = lossy.encode_symbols(q, params, scales, hd, chunk_symbols=chunk, classes=classes, lanes=lanes)
    return _entry("t.weight", dtype, (rows, n), params, streams)


SHAPES = [(1, 1), (3, 7), (5, 8), (16, 24), (9, 96), (33, 64), (12, 576), (40, 45), (64, 1), (130, 3)]


@pytest.mark.parametrize("rows,n", SHAPES)
@pytest.mark.parametrize("transform", [0, 1])
@pytest.mark.parametrize("mid", MACHINES)
def test_numba_equals_reference(rows, n, transform, mid):
    k = 0
    for colscale in (False, True):
        for classes in ((1, 0), (3, 0), (4, 1)):
            for dtype in (("F32", "F16", "BF16")[(k + mid) % 3], ("F32", "F16", "BF16")[(k + mid + 1) % 3]):
                k += 1
                e, s = make_tcq(rows, n, mid, dtype=dtype, transform=transform, colscale=colscale, classes=classes,
                                seed=rows * 1000 + n + k, extreme=(k % 4 == 0))
                want = lossy.decode_numpy(e, s)
                got = lossy_cpu.decode(e, s)
                assert got.dtype == np.uint8 and got.shape == (e.nbytes,)
                assert np.array_equal(got, want), (rows, n, transform, mid, dtype, colscale, classes)
                assert np.array_equal(decode_entry(e, s), want)  # the registry's default path is the same


@pytest.mark.parametrize("mid", MACHINES)
@pytest.mark.parametrize("lanes", [None, 8, 32])
def test_coders_and_many_chunks(mid, lanes):
    # chunked coder (lanes None, 1 chunk of 256 symbols) and interleaved lanes (coder 3)
    for classes in ((1, 0), (5, 1), (2, 0)):
        e, s = make_tcq(70, 40, mid, dtype="BF16", colscale=True, classes=classes, chunk=256, lanes=lanes, seed=mid)
        assert np.array_equal(lossy_cpu.decode(e, s), lossy.decode_numpy(e, s)), (lanes, classes)


def test_levels_follow_the_reference_walk_exactly():
    # identity transform and step 1: the F32 output IS f32(L), so this pins the level pass alone
    for mid in MACHINES:
        for classes in ((1, 0), (3, 0), (3, 1)):
            e, s = make_tcq(50, 33, mid, transform=0, step=1.0, classes=classes, seed=7 + mid, extreme=True)
            p, ss, _sc, _hd, cm = lossy.parse(e, s)
            syms = [rans.decode(x) for x in ss]
            q = (syms[0].reshape(50, 33).astype(np.int32) + p.offset) if cm is None else cm.assemble(syms, (50, 33), p.class_axis, "t")
            L = lossy.trellis_levels(q, mid)
            got = np.frombuffer(lossy_cpu.decode(e, s).tobytes(), np.float32).reshape(50, 33)
            np.testing.assert_array_equal(got, L.astype(np.float32))


def test_threads_and_task_split_do_not_change_bits(monkeypatch):
    e, s = make_tcq(300, 1000, 2, dtype="BF16", colscale=True, classes=(5, 1), chunk=256, seed=3)
    want = lossy.decode_numpy(e, s)
    monkeypatch.setattr(lossy_cpu, "MIN_TASK_WEIGHTS", 96)  # many small row and column ranges
    for threads in (1, 2, 3):
        assert np.array_equal(lossy_cpu.decode(e, s, threads=threads), want), threads


def test_loader_plan_decodes_tcq_with_the_numba_kernels(monkeypatch):
    from aligncodec import loader

    e, s = make_tcq(20, 24, 3, dtype="F16", classes=(2, 0), seed=5)
    calls = []
    real = lossy_cpu._levels

    def spy(*a):
        calls.append(a[-2:])
        return real(*a)

    monkeypatch.setattr(lossy_cpu, "_levels", spy)
    out = np.empty(e.nbytes, np.uint8)
    from aligncodec.codec import parallel

    parallel.run(loader._plan_bytes(e, s, out, 1), 1)
    assert calls  # the level pass ran (not the numpy fallback)
    assert np.array_equal(out, lossy.decode_numpy(e, s))


def test_symbol_stream_byte_flips_same_verdict_as_reference():
    """The byte-flip corpus on a tcq tensor's symbol stream (tests/byteflip.py): the numba decoder
    and the reference (reference rANS decoder + numpy levels) agree on every damaged stream —
    the same CorruptStreamError, or the same bytes."""
    from byteflip import byte_flips

    from aligncodec.formats.errors import CorruptStreamError

    rng = np.random.default_rng(41)
    kinds = set()
    for mid, lanes in ((1, None), (2, 4), (3, None)):
        e, s = make_tcq(12, 20, mid, dtype="BF16", classes=(1, 0), chunk=40, lanes=lanes, seed=mid)
        for i, t in byte_flips(s[0], rng, 25):
            st = [t] + list(s[1:])
            verdicts = []
            for fn in (lambda: lossy_cpu.decode(e, st), lambda: lossy.decode_numpy(e, st, reference=True)):
                try:
                    verdicts.append(("ok", fn().tobytes()))
                except CorruptStreamError:  # (the two decoders word their messages differently)
                    verdicts.append(("corrupt",))
            assert verdicts[0] == verdicts[1], (mid, i)
            kinds.add(verdicts[0][0])
    assert "corrupt" in kinds


def test_every_byte_flip_of_a_tcq_archive_is_detected(tmp_path):
    """Any single damaged byte of an archive holding tcq tensors gives a named error, never
    wrong weights (the data CRC, then the header and stream checks)."""
    from aligncodec.formats import errors as FE
    from aligncodec.formats.reader import ArchiveReader
    from aligncodec.formats.writer import ArchiveWriter

    path = tmp_path / "t.acz"
    with ArchiveWriter(path, {"k": "v"}) as w:
        for mid, transform, classes in ((1, 0, (1, 0)), (3, 1, (2, 1))):
            e, s = make_tcq(4, 12, mid, dtype="BF16", transform=transform, colscale=transform == 1, classes=classes,
                            chunk=24, seed=mid)
            w.add(f"t{mid}", e.dtype, e.shape, MODE_TCQ, s, e.params)
    data = path.read_bytes()
    bad = tmp_path / "b.acz"
    counts: dict = {}
    for i in range(len(data)):
        b = bytearray(data)
        b[i] ^= 0x5A
        bad.write_bytes(b)
        try:
            with ArchiveReader(bad) as r:
                r.check_padding()
                for e in r.tensors:
                    decode_entry(e, r.read_streams(e))
        except FE.AczError as exc:
            counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
            continue
        pytest.fail(f"flip at byte {i} went undetected")
    assert sum(counts.values()) == len(data) and counts.get("ChecksumError", 0) > 0


def test_nan_fallback_rebuilds_from_the_streams(monkeypatch):
    """The kernels' NaN flag (only non-finite arithmetic sets it) sends the tensor to the numpy
    path; for tcq the symbol buffer then holds levels, so that path decodes the streams again."""
    real = lossy_cpu._rows_identity

    def flagged(*a):
        real(*a)
        return 1

    monkeypatch.setattr(lossy_cpu, "_rows_identity", flagged)
    e, s = make_tcq(9, 14, 2, dtype="BF16", transform=0, classes=(3, 1), seed=9)
    assert np.array_equal(lossy_cpu.decode(e, s), lossy.decode_numpy(e, s, reference=True))
