"""Lossy mode 4 ``tcq`` (spec §7.6): the state machines, the integer levels, and a tensor
written, read and decoded through the container."""

from __future__ import annotations

import numpy as np
import pytest

from aligncodec.codec.modes import decode_entry, lossy
from aligncodec.formats import errors as FE
from aligncodec.formats.constants import MODE_ECSQ, MODE_TCQ
from aligncodec.formats.reader import ArchiveReader
from aligncodec.formats.writer import ArchiveWriter


def _walk(q, mid):
    """§7.6 written out scalar by scalar, from the table in the spec (not from trellis_machine)."""
    S, taps = {1: (4, 0b01), 2: (8, 0b11), 3: (16, 0b11), 4: (32, 0b11), 5: (64, 0b11)}[mid]
    b = S.bit_length() - 1
    rows, n = q.shape
    L = np.zeros((rows, n), np.int64)
    for j in range(n):
        s = 0
        for i in range(rows):
            k = int(q[i, j])
            u = (s >> (b - 1)) & 1
            L[i, j] = 2 * k if u == 0 else 2 * k - (k > 0) + (k < 0)
            f = bin(s & taps).count("1") & 1
            s = (s >> 1) | (((k & 1) ^ f) << (b - 1))
    return L


def test_machine_1_is_vvc_dependent_quantisation():
    trans, qsel = lossy.trellis_machine(1)
    # VVC: state 0 → (0, 2), 1 → (2, 0), 2 → (1, 3), 3 → (3, 1); states 0, 1 use Q0
    assert trans.tolist() == [[0, 2], [2, 0], [1, 3], [3, 1]]
    assert qsel.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("mid", sorted(lossy.TRELLIS_MACHINES))
def test_levels_follow_the_spec_walk(mid):
    rng = np.random.default_rng(mid)
    q = rng.integers(-40, 41, size=(57, 13))
    q[:, 0] = 0  # a column of zeros stays in state 0 and level 0
    L = lossy.trellis_levels(q, mid)
    assert L.dtype == np.int32
    np.testing.assert_array_equal(L, _walk(q, mid))
    assert not L[:, 0].any()
    # every level is on the union grid: quantiser 0 even, quantiser 1 odd or 0
    assert np.all((L == 2 * q) | (L == 2 * q - np.sign(q)))


def test_extreme_symbols_stay_in_range():
    q = np.array([[lossy.MAX_ABS_TCQ_SYMBOL], [-lossy.MAX_ABS_TCQ_SYMBOL]] * 8)
    L = lossy.trellis_levels(q, 2)
    assert np.abs(L).max() <= lossy.MAX_ABS_SYMBOL


def _archive(tmp_path, q, params, dtype="F32", classes=(1, 0), mode=MODE_TCQ, raw_params=None):
    params, streams = lossy.encode_symbols(q, params, None, None, chunk_symbols=64, classes=classes)
    path = tmp_path / "t.acz"
    with ArchiveWriter(path, {}) as w:
        w.add("w", dtype, q.shape, mode, streams, raw_params if raw_params is not None else params.pack())
    return path, params


@pytest.mark.parametrize("classes", [(1, 0), (3, 0), (2, 1)])
@pytest.mark.parametrize("mid", sorted(lossy.TRELLIS_MACHINES))
def test_tensor_decodes_to_levels_times_step(tmp_path, mid, classes):
    rng = np.random.default_rng(10 + mid)
    q = rng.integers(-9, 10, size=(33, 20)).astype(np.int32)
    step = float(np.float32(0.0125))
    path, params = _archive(tmp_path, q, lossy.EcsqParams(lossy.TRANSFORM_IDENTITY, step, 0, trellis=mid), classes=classes)
    assert params.mode == MODE_TCQ
    with ArchiveReader(path) as r:
        e = r.tensors[0]
        assert e.mode == MODE_TCQ
        got = np.frombuffer(decode_entry(e, r.read_streams(e)).tobytes(), np.float32).reshape(q.shape)
        ref = np.frombuffer(decode_entry(e, r.read_streams(e), reference=True).tobytes(), np.float32).reshape(q.shape)
    want = _walk(q, mid).astype(np.float32) * np.float32(step)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ref, want)


def test_unknown_state_machine_is_unsupported(tmp_path):
    q = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    good = lossy.EcsqParams(lossy.TRANSFORM_IDENTITY, 0.5, 0, trellis=1)
    raw = bytearray(lossy.encode_symbols(q, good, None, None)[0].pack())
    for bad_id in (0, 6, 254, lossy.RESERVED_TRELLIS_ID):  # 0: ecsq's byte; 6: the first unassigned id
        raw[17] = bad_id
        path, _ = _archive(tmp_path, q, good, raw_params=bytes(raw))
        with ArchiveReader(path) as r:
            e = r.tensors[0]
            with pytest.raises(FE.UnsupportedError, match="state-machine"):
                decode_entry(e, r.read_streams(e))


def test_ecsq_keeps_byte_17_reserved(tmp_path):
    q = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    p = lossy.EcsqParams(lossy.TRANSFORM_IDENTITY, 0.5, 0, trellis=2)
    path, _ = _archive(tmp_path, q, p, mode=MODE_ECSQ)
    with ArchiveReader(path) as r:
        e = r.tensors[0]
        with pytest.raises(FE.StreamError, match="reserved"):
            decode_entry(e, r.read_streams(e))


def test_symbols_past_the_tcq_range_are_rejected(tmp_path):
    q = np.zeros((4, 4), np.int32)
    q[1, 2] = lossy.MAX_ABS_TCQ_SYMBOL + 1
    path, _ = _archive(tmp_path, q, lossy.EcsqParams(lossy.TRANSFORM_IDENTITY, 0.5, 0, trellis=1))
    with ArchiveReader(path) as r:
        e = r.tensors[0]
        with pytest.raises(FE.StreamError, match="tcq"):
            decode_entry(e, r.read_streams(e))
