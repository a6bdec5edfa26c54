"""The lossy CPU decoder's symbol buffers (codec/modes/lossy_cpu.py: ``_borrow`` / ``_give_back``):
a buffer reused from an earlier tensor, whatever it holds, changes no decoded bit (ecsq and tcq,
every trellis machine, odd m and powers of two, one class and several, with and without column
scales); the pool keeps at most SCRATCH_KEEP_BYTES; a failed decode gives its buffer back; the
loader empties the pool when a load ends. Also the bit-reversed trellis walk of ``_levels``
against the spec's state machine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from aligncodec.codec import parallel
from aligncodec.codec.modes import lossy, lossy_cpu
from aligncodec.formats.errors import CorruptStreamError
from test_codec_modes_lossy_cpu import _make
from test_codec_modes_tcq_cpu import make_tcq


@pytest.fixture(autouse=True)
def _empty_pool():
    lossy_cpu.release_scratch()
    yield
    lossy_cpu.release_scratch()


def _poison(n: int, value: int = 0xFFFF) -> None:
    """Put a buffer of ``n`` symbols full of ``value`` in the pool (what a previous tensor might leave)."""
    b = np.full(n, value, dtype=np.uint16)
    lossy_cpu._give_back(b)


def _cases():
    # (maker, kwargs): ecsq and tcq machines 1/2/3; m odd (n = 96 = 32·3, 45, 576 = 64·9) and 1
    # (n = 64, 1); K = 1 and K > 1 (row and column classes); column scales or not
    yield _make, dict(rows=33, n=96, dtype="BF16", colscale=True, classes=(3, 0), seed=1, chunk=64)
    yield _make, dict(rows=17, n=45, dtype="F16", colscale=False, classes=(4, 1), seed=2, chunk=64)
    yield _make, dict(rows=9, n=64, dtype="F32", colscale=True, classes=(1, 0), seed=3, chunk=64)
    for mid in sorted(lossy.TRELLIS_MACHINES):
        yield make_tcq, dict(rows=31, n=576, mid=mid, dtype="BF16", colscale=bool(mid % 2), classes=(1, 0), seed=10 + mid)
        yield make_tcq, dict(rows=21, n=45, mid=mid, dtype="F32", colscale=not mid % 2, classes=(3, 1), seed=20 + mid,
                             extreme=True)
        yield make_tcq, dict(rows=40, n=1, mid=mid, dtype="F16", transform=0, classes=(2, 0), seed=30 + mid)


def _build(maker, kw):
    kw = dict(kw)
    rows, n = kw.pop("rows"), kw.pop("n")
    if maker is make_tcq:
        return maker(rows, n, kw.pop("mid"), **kw)
    return maker(rows, n, **kw)


@pytest.mark.parametrize("value", [0, 0xFFFF, 0x7FFF])
def test_reused_buffer_changes_no_bit(value):
    cases = [_build(mk, kw) for mk, kw in _cases()]
    want = [lossy.decode_numpy(e, s) for e, s in cases]
    for threads in (1, 2):
        for (e, s), w in zip(cases, want):
            _poison(e.numel + 1000, value)  # a larger stale buffer: the pool hands it out
            got = lossy_cpu.decode(e, s, threads=threads)
            assert np.array_equal(got, w), (e.shape, e.mode, threads, value)
        # and the buffers the decodes themselves gave back, in every order
        for (e, s), w in list(zip(cases, want))[::-1]:
            assert np.array_equal(lossy_cpu.decode(e, s, threads=threads), w), (e.shape, e.mode, threads)


def test_concurrent_plans_get_distinct_buffers():
    cases = [_build(mk, kw) for mk, kw in _cases()]
    want = [lossy.decode_numpy(e, s) for e, s in cases]
    outs = [np.empty(e.nbytes, np.uint8) for e, _ in cases]
    futs = [parallel.submit(lossy_cpu.plan_ecsq(e, s, o, threads=2), 2) for (e, s), o in zip(cases, outs)]
    for f, o, w in zip(futs, outs, want):
        assert f.result() is o
        assert np.array_equal(o, w)


def test_pool_keeps_at_most_the_cap(monkeypatch):
    monkeypatch.setattr(lossy_cpu, "SCRATCH_KEEP_BYTES", 1000)
    lossy_cpu._give_back(np.empty(600, np.uint16))  # 1200 bytes: over the cap, dropped
    assert lossy_cpu._scratch == []
    for n in (100, 200, 300):
        lossy_cpu._give_back(np.empty(n, np.uint16))
    sizes = sorted(b.size for b in lossy_cpu._scratch)
    assert sum(sizes) * 2 <= 1000 and sizes == [200, 300]  # the smallest made room
    b = lossy_cpu._borrow(150)  # the smallest that fits
    assert b.size == 200 and sorted(x.size for x in lossy_cpu._scratch) == [300]
    assert lossy_cpu._borrow(400).size == 400  # none fits: a new one
    lossy_cpu.release_scratch()
    assert lossy_cpu._scratch == []


def test_failed_decode_gives_its_buffer_back():
    e, s = make_tcq(40, 96, 2, dtype="BF16", classes=(1, 0), seed=4, chunk=256)
    payload = bytearray(s[0].payload)
    payload[len(payload) // 2] ^= 0x40  # a damaged word inside the symbol stream
    bad = [dataclasses.replace(s[0], payload=bytes(payload))] + list(s[1:])
    with pytest.raises(CorruptStreamError):
        lossy_cpu.decode(e, bad, threads=1)
    assert any(b.size >= e.numel for b in lossy_cpu._scratch)
    assert np.array_equal(lossy_cpu.decode(e, s, threads=1), lossy.decode_numpy(e, s))


def test_loader_empties_the_pool(tmp_path):
    import aligncodec
    from aligncodec.formats.constants import MODE_TCQ
    from aligncodec.formats.writer import ArchiveWriter

    e, s = make_tcq(64, 96, 1, dtype="F32", classes=(2, 0), seed=6)
    path = tmp_path / "t.acz"
    with ArchiveWriter(path, {"k": "v"}) as w:
        w.add("t.weight", e.dtype, e.shape, MODE_TCQ, s, e.params)
    _poison(10)
    sd = aligncodec.load_state_dict(path, threads=2)
    assert lossy_cpu._scratch == []
    assert np.array_equal(sd["t.weight"].numpy().reshape(-1).view(np.uint8), lossy.decode_numpy(e, s))


def _walk_spec(par: list[int], mid: int) -> list[int]:
    trans, qsel = lossy.trellis_machine(mid)
    s, out = 0, []
    for p in par:
        out.append(int(qsel[s]))
        s = int(trans[s, p])
    return out


@pytest.mark.parametrize("mid", sorted(lossy.TRELLIS_MACHINES))
def test_reversed_machine_walks_the_spec_states(mid):
    # the quantiser bit of the reversed state (bit 0) equals the spec machine's qsel along any path
    smask, rtaps = lossy_cpu._reversed_machine(mid)
    rng = np.random.default_rng(mid)
    par = rng.integers(0, 2, size=500).tolist()
    r, got = 0, []
    for p in par:
        got.append(r & 1)
        f = r & rtaps  # as lossy_cpu._levels: the parity of the tapped bits, folded over 8 bits
        f ^= f >> 4
        f ^= f >> 2
        f ^= f >> 1
        r = ((r << 1) | ((p ^ f) & 1)) & smask
    assert got == _walk_spec(par, mid)
