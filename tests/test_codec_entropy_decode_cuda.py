"""CUDA kernels of codec/entropy/decode_cuda.py under numba's CUDA simulator, bit-exact with the CPU decoder.

The simulator must be switched on before numba is imported, so the kernel tests run in a
child pytest process with NUMBA_ENABLE_CUDASIM=1 (``test_kernels_under_simulator``); in the
parent process they are skipped. Run them directly with

    NUMBA_ENABLE_CUDASIM=1 pytest tests/test_codec_entropy_decode_cuda.py
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from byteflip import byte_flips

IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
# ACZ_TEST_REAL_GPU=1 runs the device tests on a real CUDA device instead (no simulator):
#   ACZ_TEST_REAL_GPU=1 pytest tests/test_codec_modes_lossy_cuda.py tests/test_codec_entropy_decode_cuda.py -k "not under_simulator"
ON_GPU = IN_SIM or os.environ.get("ACZ_TEST_REAL_GPU") == "1"
sim_only = pytest.mark.skipif(not ON_GPU, reason="runs in the NUMBA_ENABLE_CUDASIM=1 child process (or with ACZ_TEST_REAL_GPU=1)")
N_SIM_TESTS = 7 + 6 + 3  # kernel tests below (chunked incl. both stagings, interleaved lanes, host path), checked by the driver


def test_kernels_under_simulator():
    """Driver: run this module's kernel tests in a child process with the simulator on."""
    if IN_SIM:
        pytest.skip("already in the simulator")
    from simulator import run_under_simulator

    run_under_simulator(__file__, N_SIM_TESTS, timeout=1200)


# ----------------------------------------------------------------- kernel tests (child process)


@pytest.fixture
def dc():
    from numba import config

    assert config.ENABLE_CUDASIM or os.environ.get("ACZ_TEST_REAL_GPU") == "1", "simulator not active"
    from aligncodec.codec.entropy import decode_cuda

    old = decode_cuda.THREADS_PER_BLOCK, decode_cuda.JOIN_THREADS_PER_BLOCK, decode_cuda.WARPS_PER_BLOCK
    decode_cuda.THREADS_PER_BLOCK = 16  # several blocks even for small inputs; few simulated threads
    decode_cuda.JOIN_THREADS_PER_BLOCK = 64
    decode_cuda.WARPS_PER_BLOCK = 2  # lanes kernel: two chunks (warps) per block
    yield decode_cuda
    decode_cuda.THREADS_PER_BLOCK, decode_cuda.JOIN_THREADS_PER_BLOCK, decode_cuda.WARPS_PER_BLOCK = old


def _random_table(rng, precision, alphabet):
    M = 1 << precision
    k = min(alphabet, M)
    cuts = np.sort(rng.choice(np.arange(1, M), size=k - 1, replace=False)) if k > 1 else np.zeros(0, np.int64)
    f = np.zeros(alphabet, np.uint32)
    f[rng.choice(alphabet, size=k, replace=False)] = np.diff(np.concatenate([[0], cuts, [M]]))
    return f


@sim_only
@pytest.mark.parametrize("precision", [4, 12, 13, 16])  # shared-memory table up to 12, global above
def test_rans_kernel_matches_cpu(dc, precision):
    from numba import cuda

    from aligncodec.codec.entropy import decode_cpu, rans

    rng = np.random.default_rng(precision)
    for trial in range(3):
        f = _random_table(rng, precision, int(rng.integers(1, 40)))
        n = int(rng.integers(1, 400))
        p = f / f.sum()
        sym = rng.choice(len(f), size=n, p=p).astype(np.uint16)
        chunk = int(rng.choice([1, 7, 10, 64]))
        s = rans.encode(sym, freqs=f, precision=precision, chunk_symbols=chunk)
        want = decode_cpu.decode_symbols(s)
        got = dc.decode_symbols_device(s).copy_to_host()
        assert np.array_equal(got, want) and np.array_equal(got, sym), (precision, trial)
        # int32 output (what the torch path hands to lossy reconstruction)
        out = cuda.to_device(np.full(n, -1, np.int32))
        assert np.array_equal(dc.decode_symbols_device(s, out).copy_to_host(), sym.astype(np.int32))


@sim_only
def test_rans_kernel_corruption_verdict_matches_cpu(dc):
    from aligncodec.codec.entropy import decode_cpu, rans
    from aligncodec.formats.errors import CorruptStreamError

    rng = np.random.default_rng(9)
    sym = rng.integers(0, 12, 300).astype(np.uint16)
    s = rans.encode(sym, chunk_symbols=20)
    for i, t in byte_flips(s, rng, 40):
        try:
            want = ("ok", decode_cpu.decode_symbols(t).tobytes())
        except CorruptStreamError as exc:
            want = ("corrupt", str(exc))
        try:
            got = ("ok", dc.decode_symbols_device(t).copy_to_host().tobytes())
        except CorruptStreamError as exc:
            got = ("corrupt", str(exc))
        assert got == want, i


@sim_only
@pytest.mark.parametrize("staging", ["pooled", "one-off"])  # one-off: pageable staging of calls above KEEP_BYTES
def test_float_split_on_device_matches_cpu(dc, staging, monkeypatch):
    if staging == "one-off":
        monkeypatch.setattr(dc, "KEEP_BYTES", 0)
    from aligncodec.codec.entropy import decode_cpu, rans
    from aligncodec.codec.modes import lossless

    rng = np.random.default_rng(2)
    for dtype, k in [("BF16", 2), ("F16", 3), ("F32", 0), ("F32", 3), ("F64", 1)]:
        width, e = lossless.FLOAT_FORMATS[dtype]
        u = {16: np.uint16, 32: np.uint32, 64: np.uint64}[width]
        n = int(rng.integers(50, 300))
        bits = rng.integers(0, np.iinfo(u).max, size=n, dtype=u, endpoint=True)
        sym, rest = lossless.split_float(bits, dtype, k)
        s = rans.encode(sym, alphabet_size=1 << (e + k), chunk_symbols=int(rng.choice([5, 32, 1000])))
        packed = lossless.pack_bits(rest, width - e - k)
        want = decode_cpu.decode_float_split(s, packed, dtype, k)
        got = dc.decode_float_split_device(s, packed, dtype, k).copy_to_host()
        assert got.dtype == u and np.array_equal(got, want) and np.array_equal(got, bits), dtype


# ----------------------------------------------------------------- interleaved lanes (coder 3): one warp per chunk


@sim_only
@pytest.mark.parametrize("precision", [4, 12, 13, 16])  # shared-memory table up to 12, global above
def test_lanes_kernel_matches_cpu(dc, precision):
    from numba import cuda

    from aligncodec.codec.entropy import decode_cpu, rans

    rng = np.random.default_rng(100 + precision)
    for trial in range(2):
        f = _random_table(rng, precision, int(rng.integers(1, 40)))
        n = int(rng.integers(1, 130))
        sym = rng.choice(len(f), size=n, p=f / f.sum()).astype(np.uint16)
        lanes = int(rng.choice([2, 5, 32]))
        chunk = int(rng.choice([7, 40, 64]))  # chunks shorter than the lanes too
        s = rans.encode(sym, freqs=f, precision=precision, chunk_symbols=chunk, lanes=lanes)
        want = decode_cpu.decode_symbols(s)
        got = dc.decode_symbols_device(s).copy_to_host()
        assert np.array_equal(got, want) and np.array_equal(got, sym), (precision, trial, lanes, chunk)
        out = cuda.to_device(np.full(n, -1, np.int32))
        assert np.array_equal(dc.decode_symbols_device(s, out).copy_to_host(), sym.astype(np.int32))


@sim_only
def test_lanes_corruption_verdict_matches_cpu(dc):
    from aligncodec.codec.entropy import decode_cpu, rans
    from aligncodec.formats.errors import CorruptStreamError

    rng = np.random.default_rng(19)
    sym = rng.integers(0, 12, 160).astype(np.uint16)
    s = rans.encode(sym, chunk_symbols=40, lanes=8)
    seen = set()
    for i, t in byte_flips(s, rng, 20):
        try:
            want = ("ok", decode_cpu.decode_symbols(t).tobytes())
        except CorruptStreamError as exc:
            want = ("corrupt", str(exc))
        try:
            got = ("ok", dc.decode_symbols_device(t).copy_to_host().tobytes())
        except CorruptStreamError as exc:
            got = ("corrupt", str(exc))
        assert got == want, i
        seen.add(want[0])
    assert "corrupt" in seen


@sim_only
def test_lanes_float_split_on_device_matches_cpu(dc):
    from aligncodec.codec.entropy import decode_cpu, rans
    from aligncodec.codec.modes import lossless

    rng = np.random.default_rng(4)
    bits = rng.integers(0, 2**16, 200, dtype=np.uint16)
    sym, rest = lossless.split_float(bits, "BF16", 2)
    s = rans.encode(sym, alphabet_size=1 << 10, chunk_symbols=48, lanes=32)
    packed = lossless.pack_bits(rest, 6)
    got = dc.decode_float_split_device(s, packed, "BF16", 2).copy_to_host()
    assert np.array_equal(got, decode_cpu.decode_float_split(s, packed, "BF16", 2)) and np.array_equal(got, bits)


@sim_only
def test_lanes_long_chunks_word_window(dc):
    """Chunks long enough that the warp's register window of words shifts many times (high-entropy
    symbols, every lane count up to 32, the last chunk short), and corrupt bytes deep inside them:
    the same symbols and the same verdicts as the CPU decoder."""
    from aligncodec.codec.entropy import decode_cpu, rans
    from aligncodec.formats.errors import CorruptStreamError

    rng = np.random.default_rng(23)
    for lanes, P, chunk, n in [(32, 12, 1100, 1150), (7, 14, 400, 420), (3, 10, 300, 310)]:
        f = _random_table(rng, P, 1 << (P - 2))  # about P - 2 bits per symbol: a word every 1-2 steps per lane
        sym = rng.choice(len(f), size=n, p=f / f.sum()).astype(np.uint16)
        s = rans.encode(sym, freqs=f, precision=P, chunk_symbols=chunk, lanes=lanes)
        assert int(s.chunk_lengths[0]) // 2 > 4 * 32  # several 32-word windows in a chunk
        got = dc.decode_symbols_device(s).copy_to_host()
        assert np.array_equal(got, sym), (lanes, P)
        kinds = set()
        for i, t in byte_flips(s, rng, 2):
            verdicts = []
            for fn in (lambda: decode_cpu.decode_symbols(t), lambda: dc.decode_symbols_device(t).copy_to_host()):
                try:
                    verdicts.append(("ok", fn().tobytes()))
                except CorruptStreamError as exc:
                    verdicts.append(("corrupt", str(exc)))
            assert verdicts[0] == verdicts[1], (lanes, i)
            kinds.add(verdicts[0][0])
        assert "corrupt" in kinds


def _cpu_together(streams, bases, total):
    """The CPU decoder's verdict on several streams decoded together (as a lossy tensor's class
    streams are: every layout checked first, then the first corrupt stream's first corrupt chunk)."""
    from aligncodec.codec import parallel
    from aligncodec.codec.entropy import decode_cpu
    from aligncodec.formats.errors import AczError

    U = np.zeros(total, np.uint16)
    try:
        parallel.run(parallel.together([decode_cpu.plan_decode(s, U[b:b + s.n_symbols]) for s, b in zip(streams, bases)]), 1)
        return ("ok", U.tobytes())
    except AczError as exc:
        return (type(exc).__name__, str(exc))


@sim_only
def test_many_streams_one_launch(dc):
    """plan_symbols + launch_symbols + check_status: streams of both layouts, shared and global
    slot tables and an empty one decode in one launch into one array; damaged streams (a corrupt
    chunk, a bad chunk layout) give the verdict of the CPU decoding them together."""
    from aligncodec.codec.entropy import rans
    from aligncodec.formats.errors import AczError
    from aligncodec.formats.streams import RansStream

    rng = np.random.default_rng(31)
    streams, syms = [], []
    for P, lanes, chunk, n in [(10, 1, 50, 300), (14, 8, 64, 200), (12, 32, 100, 0), (13, 32, 96, 250), (12, 1, 1000, 90)]:
        f = _random_table(rng, P, 30)
        sym = rng.choice(len(f), size=n, p=f / f.sum()).astype(np.uint16)
        streams.append(rans.encode(sym, freqs=f, precision=P, chunk_symbols=chunk, lanes=lanes))
        syms.append(sym)
    bases = np.concatenate([[0], np.cumsum([len(x) for x in syms])]).tolist()
    total = bases.pop()

    def gpu(sts):
        from numba import cuda

        out = cuda.to_device(np.zeros(total, np.uint16))
        try:
            st = dc.Staging()
            plan = dc.plan_symbols(sts, bases, st)
            p = dc.pool()
            views = p.upload(st, "t", 0)
            dc.launch_symbols(plan, views, out, p.status(plan.n_chunks, "t", 0), 0)
            dc.check_status(plan, p, 0)
        except AczError as exc:
            return (type(exc).__name__, str(exc))
        return ("ok", out.copy_to_host().tobytes())

    want = _cpu_together(streams, bases, total)
    assert want == ("ok", np.concatenate(syms).tobytes())
    assert gpu(streams) == want

    def damaged(s, i=None, lengths=None):
        pay = bytearray(s.payload)
        if i is not None:
            pay[i] ^= 0x5A
        return RansStream(s.precision, s.chunk_symbols, s.n_symbols, s.freqs, s.chunk_lengths if lengths is None else lengths, bytes(pay), s.lanes)

    seen = set()
    for trial in range(12):
        sts = list(streams)
        for j in rng.choice([0, 1, 3, 4], size=int(rng.integers(1, 3)), replace=False):
            s = sts[j]
            if trial % 4 == 3:  # a chunk layout that does not add up: a StreamError before any decoding
                lengths = np.array(s.chunk_lengths, copy=True)
                lengths[0] += 2
                sts[j] = damaged(s, lengths=lengths)
            else:
                sts[j] = damaged(s, int(rng.integers(0, len(s.payload))))
        want = _cpu_together(sts, bases, total)
        assert gpu(sts) == want, trial
        seen.add(want[0])
    assert {"CorruptStreamError", "StreamError"} <= seen, seen


@sim_only
def test_driver_calls_per_stream(dc, monkeypatch):
    """Once the pool is warm, decoding a stream costs one host-to-device copy, one kernel launch,
    one status copy back and no device allocation (a float-split tensor: one more launch)."""
    from numba import cuda

    from aligncodec.codec.entropy import rans
    from aligncodec.codec.modes import lossless
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cuda_calls import count_calls

    calls = count_calls(monkeypatch)
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**16, 300, dtype=np.uint16)
    sym, rest = lossless.split_float(bits, "BF16", 2)
    s = rans.encode(sym, alphabet_size=1 << 10, chunk_symbols=64, lanes=32)
    packed = lossless.pack_bits(rest, 6)
    out = cuda.to_device(np.zeros(300, np.uint16))
    dc.decode_float_split_device(s, packed, "BF16", 2, out=out)  # warms the pool
    calls.clear()
    got = dc.decode_float_split_device(s, packed, "BF16", 2, out=out).copy_to_host()
    assert np.array_equal(got, bits)
    assert calls == {"h2d": 1, "launch": 2, "d2h": 1}, calls



@pytest.mark.skipif(IN_SIM, reason="runs without the simulator")
def test_broken_numba_cuda_is_a_named_error(monkeypatch, caplog):
    """A numba-cuda that cannot compile a kernel (numba-cuda 0.30.4 with numpy 2.5 fails at the
    first compile with AttributeError: np.row_stack): available() is False with a logged warning
    (the loaders then use the CPU decoder) and the GPU entry points raise CudaUnavailableError."""
    from aligncodec.codec.entropy import decode_cuda, rans

    class Broken:
        def __getitem__(self, cfg):
            raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    monkeypatch.setattr(decode_cuda.cuda, "is_available", lambda: True)
    monkeypatch.setattr(decode_cuda, "_probe_kernel", Broken())
    monkeypatch.setattr(decode_cuda.cuda, "to_device", lambda a, **k: a)
    monkeypatch.setattr(decode_cuda, "_probe_result", [])
    with caplog.at_level("WARNING"):
        assert decode_cuda.available() is False
    assert "row_stack" in caplog.text and "CPU decoder" in caplog.text
    s = rans.encode(np.arange(10, dtype=np.uint16) % 3)
    with pytest.raises(decode_cuda.CudaUnavailableError, match="row_stack"):
        decode_cuda.decode_symbols_device(s)


@pytest.mark.skipif(IN_SIM, reason="host-side check (the simulator child counts only kernel tests)")
def test_low_occupancy_warnings_off_unless_asked():
    """Loading a model launches kernels for many small tensors: numba's per-launch
    "Grid size N will likely result in GPU under-utilization" warning is off by default,
    and the user's NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS still wins."""
    code = "import aligncodec.codec.entropy.decode_cuda; from numba import config; print(config.CUDA_LOW_OCCUPANCY_WARNINGS)"
    for env_value, want in ((None, "0"), ("1", "1")):
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS"}
        if env_value is not None:
            env["NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS"] = env_value
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == want
