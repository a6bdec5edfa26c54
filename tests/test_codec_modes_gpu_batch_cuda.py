"""Batched GPU decoding (aligncodec.codec.modes.gpu_batch, the loader's CUDA path) under numba's
CUDA simulator: bit-exact with the CPU decoder on every lossy golden vector (ecsq and tcq) and
the float-split vectors decoded together in one batch; errors in file order; the CUDA work per
tensor counted (one staging copy, one rANS launch and one status copy per batch).

The device tests run in a child process with NUMBA_ENABLE_CUDASIM=1 (tests/simulator.py);
``ACZ_TEST_REAL_GPU=1 pytest tests/test_codec_modes_gpu_batch_cuda.py -k "not under_simulator"`` runs
them on a CUDA device."""

import contextlib
import glob
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
ON_GPU = IN_SIM or os.environ.get("ACZ_TEST_REAL_GPU") == "1"
sim_only = pytest.mark.skipif(not ON_GPU, reason="runs in the NUMBA_ENABLE_CUDASIM=1 child process (or with ACZ_TEST_REAL_GPU=1)")

LOSSY = sorted(glob.glob(os.path.join(ROOT, "spec", "vectors", "lossy", "*.acz")))
FLOAT_SPLIT = [os.path.join(ROOT, "spec", "vectors", "valid", f) for f in ("mixed_layouts.acz", "rans_lanes.acz", "odd_shapes.acz")]
N_SIM_TESTS = 7  # the 6 device tests and the plain one


@pytest.mark.skipif(IN_SIM or ON_GPU, reason="the parent process runs the simulator")
def test_batch_kernels_under_simulator():
    sys.path.insert(0, HERE)
    from simulator import run_under_simulator

    run_under_simulator(__file__, N_SIM_TESTS, timeout=1800)


class SimBackend:
    """Outputs as numba device arrays, results as host bytes (what the tests compare)."""

    pool_key = "sim"

    def __init__(self, copy_stream=True):
        self.use_copy = copy_stream

    def context(self):
        return contextlib.nullcontext()

    def stream(self):
        return 0

    def copy_stream(self):
        from numba import cuda

        return cuda.stream() if self.use_copy else None

    def alloc(self, entry):
        from numba import cuda

        from aligncodec.codec.modes.gpu_batch import _OUT_NP

        a = cuda.device_array(max(1, entry.numel), _OUT_NP[8 * entry.itemsize])
        return a, lambda: a.copy_to_host()[: entry.numel].tobytes()

    def single(self, entry, streams):
        raise AssertionError("every mode here is batched")


class SimScratchBackend(SimBackend):
    """As TorchBackend: the batch's scratch (symbols, row buffer) from the backend, per batch."""

    def scratch(self, n, dtype, name):
        from numba import cuda

        a = cuda.device_array(n, dtype)
        return a, a


def _pairs(paths):
    from aligncodec.formats.reader import ArchiveReader

    out = []
    for p in paths:
        with ArchiveReader(p) as r:
            for e in r.tensors:
                if e.mode in (1, 2, 4):
                    out.append((e, r.read_streams(e)))
    return out


def _cpu(entry, streams) -> bytes:
    from aligncodec.codec.modes import decode_entry

    return decode_entry(entry, streams).tobytes()


@pytest.fixture
def gb():
    from numba import config

    assert config.ENABLE_CUDASIM or os.environ.get("ACZ_TEST_REAL_GPU") == "1", "simulator not active"
    from aligncodec.codec.entropy import decode_cuda
    from aligncodec.codec.modes import gpu_batch, lossy_cuda

    old = (lossy_cuda.THREADS_PER_BLOCK, decode_cuda.THREADS_PER_BLOCK, decode_cuda.JOIN_THREADS_PER_BLOCK)
    if IN_SIM:
        lossy_cuda.THREADS_PER_BLOCK = 8
        decode_cuda.THREADS_PER_BLOCK = 16
        decode_cuda.JOIN_THREADS_PER_BLOCK = 64
    yield gpu_batch
    lossy_cuda.THREADS_PER_BLOCK, decode_cuda.THREADS_PER_BLOCK, decode_cuda.JOIN_THREADS_PER_BLOCK = old


@sim_only
def test_one_batch_every_vector_bit_exact(gb):
    """Every lossy golden vector (ecsq, tcq with each state machine, both rANS layouts) and the
    float-split vectors (BF16, F16, F32, chunked and lanes) decoded as ONE batch: each tensor
    equals the CPU decoder's bytes."""
    pairs = _pairs(LOSSY + FLOAT_SPLIT)
    assert {e.mode for e, _ in pairs} == {1, 2, 4} and len(pairs) >= 14
    got = gb.decode_all(pairs, SimBackend())
    assert len(got) == len(pairs)
    for (e, st), g in zip(pairs, got):
        assert g == _cpu(e, st), e.name


@sim_only
def test_many_batches_both_slots(gb, monkeypatch):
    """Small batch limits: the tensors spread over several batches (both slots alternate, each
    batch queued before the previous one is waited for), no copy stream, the scratch arrays from
    the backend (as torch's allocator gives them on a GPU); same bytes."""
    monkeypatch.setattr(gb, "BATCH_TENSORS", 3)
    pairs = _pairs(LOSSY + FLOAT_SPLIT[:1])
    be = SimScratchBackend(copy_stream=False)
    got = gb.decode_all(pairs, be)
    assert [g for g in got] == [_cpu(e, st) for e, st in pairs]


@sim_only
def test_errors_in_file_order(gb):
    """A corrupt chunk in the third tensor of a batch: the two before it decode, its turn raises
    the CPU decoder's error (same class and message), nothing after it is returned. A tensor
    whose streams fail validation at staging time behaves the same way."""
    from aligncodec.formats.errors import CorruptStreamError
    from aligncodec.formats.reader import ArchiveReader
    from aligncodec.formats.streams import parse_streams

    pairs = _pairs(LOSSY[:4])
    # damage a data word of the third tensor's first rANS stream (header intact)
    path = LOSSY[2]
    with ArchiveReader(path) as r:
        e = r.tensors[0]
        data = bytearray(r.read_data(e))
    cpu_err = None
    for pos in range(len(data) - 1, len(data) // 2, -1):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        try:
            st = parse_streams(bytes(bad), e.stream_count)
            _cpu(e, st)
        except CorruptStreamError as exc:
            cpu_err = exc
            break
        except Exception:  # noqa: BLE001 - another verdict: try another byte
            continue
    assert cpu_err is not None
    pairs[2] = (e, st)
    b = gb.Batch(0)
    for en, s in pairs:
        b.add(en, s)
    be = SimBackend()
    b.submit(be)
    b.finish(be)
    assert b.take(0, be) == _cpu(*pairs[0]) and b.take(1, be) == _cpu(*pairs[1])
    with pytest.raises(CorruptStreamError) as ei:
        b.take(2, be)
    assert str(ei.value) == str(cpu_err)
    with pytest.raises(RuntimeError, match="earlier tensor"):
        b.take(3, be)

    # a staging-time error (params the CPU rejects too) is raised in its turn
    from dataclasses import replace

    e1, s1 = pairs[1]
    broken = replace(e1, params=e1.params[:3])
    with pytest.raises(Exception) as cpu_ei:
        _cpu(broken, s1)
    b = gb.Batch(1)
    for en, s in [pairs[0], (broken, s1), pairs[3]]:
        b.add(en, s)
    b.submit(be)
    b.finish(be)
    assert b.take(0, be) == _cpu(*pairs[0])
    with pytest.raises(type(cpu_ei.value)):
        b.take(1, be)


@sim_only
def test_batch_failure_raised_in_its_turn(gb, monkeypatch):
    """A batch that cannot get its device buffers (out of GPU memory while the previous batch is
    in flight): the previous batch's tensors are still returned, the failing batch's first
    tensor raises DeviceOutOfMemoryError naming it, the rest of that batch is not returned."""
    from aligncodec.codec.entropy import decode_cuda

    pairs = _pairs(LOSSY[:4])
    decode_cuda.release_pools()  # cold pools: the second batch must allocate its slot's buffers
    be = SimBackend(copy_stream=False)
    b0, b1 = gb.Batch(0), gb.Batch(1)
    for e, s in pairs[:2]:
        b0.add(e, s)
    for e, s in pairs[2:]:
        b1.add(e, s)
    b0.submit(be)

    def full(n, dtype, stream_obj):
        raise MemoryError("CUDA_ERROR_OUT_OF_MEMORY")

    monkeypatch.setattr(decode_cuda, "_raw_device_array", full)
    b1.submit(be)  # queued before b0 is waited for; fails as a whole
    b0.finish(be)
    assert [b0.take(0, be), b0.take(1, be)] == [_cpu(*pairs[0]), _cpu(*pairs[1])]
    b1.finish(be)
    with pytest.raises(decode_cuda.DeviceOutOfMemoryError, match=pairs[2][0].name):
        b1.take(0, be)
    with pytest.raises(RuntimeError, match="earlier tensor"):
        b1.take(1, be)


@sim_only
def test_driver_calls_per_batch(gb, monkeypatch):
    """Once the slots' pools are warm, a batch of N tensors costs one host-to-device copy, one
    rANS launch, one tcq level-pass launch, one reconstruction launch per tensor, one status copy
    back and one wait, against per tensor one copy in, one rANS launch, the level pass (tcq),
    the reconstruction, one copy back and one wait on the single-tensor path."""
    sys.path.insert(0, HERE)
    from cuda_calls import count_calls

    from aligncodec.codec.entropy import decode_cuda
    from aligncodec.codec.modes import lossy_cuda

    pairs = _pairs(LOSSY[3:6] + FLOAT_SPLIT[:1])  # ecsq, tcq, float-split (both layouts)
    n = len(pairs)
    n_tcq = sum(e.mode == 4 for e, _ in pairs)
    be = SimBackend(copy_stream=False)
    calls = count_calls(monkeypatch)
    waits = {"n": 0}
    real_sync = decode_cuda._sync

    def sync(s):
        waits["n"] += 1
        real_sync(s)

    monkeypatch.setattr(decode_cuda, "_sync", sync)
    gb.decode_all(pairs, be)  # warms both slots' pools
    calls.clear()
    assert gb.decode_all(pairs, be) == [_cpu(e, s) for e, s in pairs]
    batched = dict(calls)
    assert n_tcq >= 2
    assert batched == {"h2d": 1, "launch": 1 + 1 + n, "d2h": 1}, batched

    # the single-tensor path (decode_tensor's), same tensors, for the report's before/after
    from numba import cuda

    def single(e, s):
        out = cuda.device_array(max(1, e.numel), gb._OUT_NP[8 * e.itemsize])
        if e.mode == 1:
            decode_cuda.decode_float_split_device(s[0], _rest(e, s), e.dtype, e.params[0], out=out[: e.numel])
        else:
            lossy_cuda.reconstruct_device(e, s, out[: e.numel])

    for e, s in pairs:
        single(e, s)  # warm
    calls.clear()
    waits["n"] = 0
    for e, s in pairs:
        single(e, s)
    per_tensor = dict(calls)
    assert per_tensor == {"h2d": n, "launch": n + n + n_tcq, "d2h": n}, per_tensor
    assert waits["n"] == n
    print(f"\ndriver calls for {n} tensors ({n_tcq} tcq): single-tensor path {sum(per_tensor.values()) + n} "
          f"({(sum(per_tensor.values()) + n) / n:.2f}/tensor), batched {sum(batched.values()) + 1} "
          f"({(sum(batched.values()) + 1) / n:.2f}/tensor), waits included")


def _rest(e, s):
    from aligncodec.codec.modes import lossless
    from aligncodec.formats.constants import FLOAT_FORMATS

    width, ex = FLOAT_FORMATS[e.dtype]
    return lossless._bytes_from(s[1], lossless.packed_size(e.numel, width - ex - e.params[0]), e.name)


@sim_only
def test_loader_streams_batches_in_file_order(gb, monkeypatch, tmp_path):
    """load(device="cuda") through the batch pipeline (simulator backend): an archive of lossy
    and float-split tensors with stored and bytegroup tensors between them (decoded on the CPU
    pool, as a model's norms are), small batches so that several are in flight: every tensor in
    file order, each equal to the CPU load; the reader's in-flight count stays bounded. Then the
    same archive with a corrupt chunk in a later tensor: every tensor before it is yielded, its
    turn raises the CPU decoder's error."""
    import torch

    import aligncodec
    from aligncodec import loader
    from aligncodec.formats.errors import CorruptStreamError
    from aligncodec.formats.reader import ArchiveReader
    from aligncodec.formats.writer import ArchiveWriter

    monkeypatch.setattr(gb, "BATCH_TENSORS", 3)
    cpu_side = os.path.join(ROOT, "spec", "vectors", "valid", "bytegroup.acz")
    stored = os.path.join(ROOT, "spec", "vectors", "valid", "every_dtype.acz")

    def write(path, damage=None):
        names = []
        with ArchiveWriter(path) as w:
            for k, p in enumerate(LOSSY[::2] + FLOAT_SPLIT[:1]):
                extra = (cpu_side, 0) if k % 2 else (stored, 0)
                for src, idx in ((p, None), extra):
                    with ArchiveReader(src) as r:
                        for j, e in enumerate(r.tensors):
                            if idx is not None and j != idx:
                                continue
                            nm = f"{len(names):02d}.{e.name}"
                            data = bytearray(r.read_data(e))
                            if damage is not None and damage[0] == len(names):
                                data[damage[1]] ^= 0x5A
                            from aligncodec.formats.streams import parse_streams

                            names.append(nm)
                            w.add(nm, e.dtype, e.shape, e.mode, parse_streams(bytes(data), e.stream_count), e.params)
        return names

    class TorchSim(SimBackend):
        def __init__(self, device):
            super().__init__()

        def alloc(self, entry):
            from aligncodec.codec.torch_interop import torch_dtype

            a, _ = super().alloc(entry)
            return a, lambda: torch.frombuffer(bytearray(a.copy_to_host()[: entry.numel].tobytes()),
                                               dtype=torch_dtype(entry.dtype)).reshape(entry.shape)

    monkeypatch.setattr(gb, "TorchBackend", TorchSim)
    monkeypatch.setattr(loader, "_gpu_device_ok", lambda dev: True)
    monkeypatch.setattr(loader, "_to_device", lambda t, dev: t)  # CPU-decoded tensors stay on the host here
    path = tmp_path / "mix.acz"
    names = write(path)
    stats = loader.LoadStats()
    got = list(loader.load(path, device="cuda", stats=stats))
    want = list(aligncodec.load(path, device="cpu"))
    assert [n for n, _ in got] == [n for n, _ in want] == names
    assert {e.mode for e in ArchiveReader(path).tensors} >= {0, 1, 2, 3, 4}
    for (n, g), (_, c) in zip(got, want):
        assert g.dtype == c.dtype and g.shape == c.shape and torch.equal(g.reshape(-1).view(torch.uint8), c.reshape(-1).view(torch.uint8)), n
    assert stats.max_in_flight <= 1 + 1 + 2 * gb.BATCH_TENSORS

    # a corrupt chunk in the lossy tensor at position 6 (its CRC rewritten by the writer)
    with ArchiveReader(path) as r:
        e6 = r.tensors[6]
        assert e6.mode in (2, 4)
        pos = _corrupting_byte(e6, bytes(r.read_data(e6)))
    bad = tmp_path / "bad.acz"
    write(bad, damage=(6, pos))
    with pytest.raises(CorruptStreamError) as cpu_ei:
        list(aligncodec.load(bad, device="cpu"))
    seen = []
    with pytest.raises(CorruptStreamError) as gpu_ei:
        for n, t in loader.load(bad, device="cuda"):
            seen.append(n)
    assert seen == names[:6] and str(gpu_ei.value) == str(cpu_ei.value)


def _corrupting_byte(e, data: bytes) -> int:
    """A byte of a tensor's data whose change (xor 0x5A) the CPU decoder reports as a corrupt
    chunk (CorruptStreamError), the streams still parsing."""
    from aligncodec.formats.errors import CorruptStreamError
    from aligncodec.formats.streams import parse_streams

    for pos in range(len(data) - 1, 0, -1):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        try:
            _cpu(e, parse_streams(bytes(bad), e.stream_count))
        except CorruptStreamError:
            return pos
        except Exception:  # noqa: BLE001 - another verdict: try another byte
            continue
    raise AssertionError(f"no byte of {e.name!r} gives a corrupt chunk")


def test_reader_bounded_by_bytes():
    """The reader of the GPU path holds at most max_bytes of compressed tensors (plus one) that
    the consumer has not released, whatever its tensor capacity."""
    import threading
    import time

    from aligncodec.loader import LoadStats, _Prefetcher

    class E:
        def __init__(self, i):
            self.name, self.size = f"t{i}", 10

    def it():
        yield "header", None, None
        for i in range(50):
            yield None, E(i), []

    st = LoadStats()
    held = {"max": 0, "now": 0}
    lock = threading.Lock()

    def start(entry, streams):
        with lock:
            held["now"] += 1
            held["max"] = max(held["max"], held["now"])
        return object()

    pf = _Prefetcher(it(), 100, st, start, max_bytes=35)
    assert pf.get()[0] == "header"
    n = 0
    while True:
        kind, item = pf.get()
        if kind == "end":
            break
        time.sleep(0.002)  # a slow consumer: the reader runs ahead as far as it may
        with lock:
            held["now"] -= 1
        pf.release(item[0].size)
        n += 1
    pf.close(join=True)
    assert n == 50 and held["max"] <= 4, held  # 35 bytes of 10-byte tensors: 4 at most


@pytest.mark.skipif(IN_SIM, reason="compiles for a real GPU target (the parent process)")
def test_batch_kernels_compile_to_ptx(monkeypatch):
    """The batch's kernels (float-split join from the shared symbol buffer, the level pass of
    every tcq tensor, and the per-tensor level kernel built on the same device function) compile
    for sm_90 with numba's real CUDA target: the simulator does not type-check them. Needs
    libNVVM (a CUDA toolkit), not a GPU; skipped where it is missing."""
    from numba import cuda
    from numba import types as T

    try:
        cuda.compile_ptx(lambda a: None, "void(float32[:])", cc=(9, 0))
    except Exception as exc:  # no NVVM / toolkit here
        pytest.skip(f"no NVVM: {type(exc).__name__}")
    import numba.cuda.dispatcher as d

    class Dev:
        compute_capability = (9, 0)

    monkeypatch.setattr(d, "get_current_device", lambda: Dev(), raising=False)
    from aligncodec.codec.entropy import decode_cuda as DC
    from aligncodec.codec.modes import lossy_cuda as LC

    A = lambda t: t[::1]  # noqa: E731
    cases = [
        (DC.join_from_kernel, (A(T.uint16), A(T.uint16), T.int64, A(T.uint8), T.int64, T.int64, T.int64, T.int64, T.int64)),
        (DC.join_from_kernel, (A(T.uint32), A(T.uint16), T.int64, A(T.uint8), T.int64, T.int64, T.int64, T.int64, T.int64)),
        (LC.levels_multi_kernel, (A(T.uint16), A(T.int64), T.int64, T.int64)),
        (LC.levels_kernel, (A(T.uint16), A(T.int64)) + (T.int64,) * 9),
    ]
    for k, sig in cases:
        ptx, _ = cuda.compile_ptx(k.py_func, T.void(*sig), cc=(9, 0))
        assert ".entry" in ptx, k.py_func.__name__
