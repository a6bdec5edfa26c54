"""GPU reconstruction of lossy mode 2 ``ecsq`` (codec/modes/lossy_cuda.py) bit-exact with the CPU.

Three kinds of tests:

* in this process (no GPU, no simulator): the dtype casts against torch's CPU cast on
  every special value and millions of random bit patterns; and, where NVVM is installed,
  the kernels compiled to PTX for sm_90 with no fused multiply-add in them;
* in a child process with numba's CUDA simulator (``test_lossy_kernels_under_simulator``
  runs them): every lossy golden vector, random tensors of every shape class, the
  corrupt-data verdicts, the out-of-memory error.

Run the simulator tests directly with ``NUMBA_ENABLE_CUDASIM=1 pytest tests/test_codec_modes_lossy_cuda.py``.
"""

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
# ACZ_TEST_REAL_GPU=1 runs the device tests on a real CUDA device instead (no simulator):
#   ACZ_TEST_REAL_GPU=1 pytest tests/test_codec_modes_lossy_cuda.py tests/test_codec_entropy_decode_cuda.py -k "not under_simulator"
ON_GPU = IN_SIM or os.environ.get("ACZ_TEST_REAL_GPU") == "1"
sim_only = pytest.mark.skipif(not ON_GPU, reason="runs in the NUMBA_ENABLE_CUDASIM=1 child process (or with ACZ_TEST_REAL_GPU=1)")
host_only = pytest.mark.skipif(IN_SIM, reason="runs without the simulator")
VECTORS = sorted((Path(__file__).resolve().parent.parent / "spec" / "vectors" / "lossy").glob("*.acz"))
N_SIM_TESTS = len(VECTORS) + 24 + 4  # golden vectors, shape classes, corruption + OOM + small buffers + driver calls; checked by the driver


@host_only
def test_lossy_kernels_under_simulator():
    """Driver: run this module's simulator tests in a child process."""
    from simulator import run_under_simulator

    run_under_simulator(__file__, N_SIM_TESTS, timeout=1800)


# ----------------------------------------------------------------- host: casts and PTX


@host_only
def test_casts_match_cpu_rounding():
    """The device casts against the CPU decoder's rounding (lossy.round_to_dtype) on every special
    value and millions of random float32 bit patterns; NaN stays NaN (never reached: §7.4 bound)."""
    import numba as nb

    from aligncodec.codec.modes import lossy
    from aligncodec.codec.modes import lossy_cuda as LC

    bf16 = nb.njit(LC.bf16_bits)
    f16 = nb.njit(LC.f16_bits)

    @nb.njit
    def cast_all(u, kind):
        out = np.empty(u.shape[0], np.uint16)
        for i in range(u.shape[0]):
            out[i] = bf16(u[i]) if kind == 2 else f16(u[i])
        return out

    rng = np.random.default_rng(0)
    special = []
    for e in (0, 1, 0x66, 0x67, 0x70, 0x71, 0x72, 0x7F, 0x8E, 0x8F, 0xFE, 0xFF):
        for mant in (0, 1, 0xFFF, 0x1000, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x18000, 0x400000, 0x7FFFFF, 0x7FE000, 0x7FF000):
            for s in (0, 1):
                special.append((s << 31) | (e << 23) | mant)
    u = np.concatenate([np.array(special, np.uint32), rng.integers(0, 2**32, 2_000_000, dtype=np.uint32),
                        # dense around the float16 subnormal / normal / overflow boundaries
                        np.arange(0x33000000 - 4096, 0x38800000 + 4096, 97, dtype=np.uint32),
                        np.arange(0x477FE000 - 4096, 0x47800000 + 4096, dtype=np.uint32)])
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    for kind, dt in ((2, "BF16"), (1, "F16")):
        got = cast_all(u, kind)
        want = lossy.round_to_dtype(u[~nan].view(np.float32), dt).view(np.uint16)
        bad = np.flatnonzero(got[~nan] != want)
        assert bad.size == 0, (dt, [hex(int(x)) for x in u[~nan][bad[:5]]])
        exp = 0x7F80 if dt == "BF16" else 0x7C00
        man = 0x7F if dt == "BF16" else 0x3FF
        assert np.all((got[nan] & exp) == exp) and np.all(got[nan] & man), dt


def _fake_current_device():
    import numba.cuda.dispatcher as d

    class Dev:
        compute_capability = (9, 0)

    d.get_current_device = lambda: Dev()


@host_only
def test_kernels_compile_without_fma():
    """NVVM contracts a·b + c into fma.rn.f32 by default; the lossy kernels must have none.
    Needs libNVVM (a CUDA toolkit), not a GPU; skipped where it is missing."""
    from numba import cuda
    from numba import types as T

    def plain(a, b, c):  # control: the contraction the kernels must avoid
        i = cuda.grid(1)
        if i < a.shape[0]:
            c[i] = a[i] * b[i] + c[i]

    try:
        ptx, _ = cuda.compile_ptx(plain, "void(float32[:], float32[:], float32[:])", cc=(9, 0))
    except Exception as exc:  # no NVVM / toolkit here
        pytest.skip(f"no NVVM: {type(exc).__name__}")
    assert "fma.rn.f32" in ptx  # NVVM does contract plain code
    _fake_current_device()  # device functions are compiled for "the current device"
    from aligncodec.codec.modes import lossy_cuda as LC

    A = lambda t: t[::1]  # noqa: E731
    idx = (A(T.uint16), A(T.int64), A(T.float32)) + (T.int64,) * 6  # syms, I, F, table offsets
    sigs = {
        "identity_kernel": idx + (T.int64, T.int64, A(T.uint16), T.int64),
        "segment_kernel": idx + (T.int64, T.int64, T.int64, T.int64, T.int64, T.float32, T.int64, A(T.uint16), T.int64, A(T.float32), T.boolean),
        "load_kernel": idx + (T.int64, T.int64, T.int64, A(T.float32)),
        "stage_kernel": (A(T.float32), T.int64, T.int64, T.int64, T.int64),
        "finish_kernel": (A(T.float32), T.int64, T.int64, T.int64, T.int64, A(T.float32), T.int64, T.float32, T.int64, A(T.uint32), T.int64),
    }
    for name, sig in sigs.items():
        ptx, _ = cuda.compile_ptx(getattr(LC, name).py_func, T.void(*sig), cc=(9, 0))
        fops = [ln.split()[0] for ln in ptx.splitlines() if ".f32" in ln and any(o in ln for o in ("mul", "add", "sub", "fma"))]
        assert fops, name
        assert not any("fma" in o for o in fops), (name, fops)
        assert all(o in ("mul.rn.f32", "add.rn.f32", "sub.rn.f32") for o in fops), (name, set(fops))


# ----------------------------------------------------------------- simulator


@pytest.fixture
def lc():
    from numba import config

    assert config.ENABLE_CUDASIM or os.environ.get("ACZ_TEST_REAL_GPU") == "1", "simulator not active"
    from aligncodec.codec.entropy import decode_cuda
    from aligncodec.codec.modes import lossy_cuda

    old = (lossy_cuda.THREADS_PER_BLOCK, lossy_cuda.SHARED_FLOATS, lossy_cuda.BUFFER_BYTES, decode_cuda.THREADS_PER_BLOCK)
    lossy_cuda.THREADS_PER_BLOCK = 8  # few simulated threads, several blocks
    decode_cuda.THREADS_PER_BLOCK = 16
    yield lossy_cuda
    lossy_cuda.THREADS_PER_BLOCK, lossy_cuda.SHARED_FLOATS, lossy_cuda.BUFFER_BYTES, decode_cuda.THREADS_PER_BLOCK = old


def _gpu_bytes(lc, entry, streams) -> bytes:
    return lc.reconstruct_device(entry, streams).copy_to_host().tobytes()


def _cpu_bytes(entry, streams) -> bytes:
    from aligncodec.codec.modes import decode_entry

    return decode_entry(entry, streams).tobytes()


@sim_only
@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_golden_vector_on_device(lc, path):
    from aligncodec.formats.reader import ArchiveReader

    want = json.loads(path.with_suffix(".json").read_text())["tensors"][0]["sha256"]
    with ArchiveReader(path) as r:
        e = r.tensors[0]
        st = r.read_streams(e)
        got = _gpu_bytes(lc, e, st)
        assert got == _cpu_bytes(e, st)
    assert hashlib.sha256(got).hexdigest() == want


def _make(rng, rows, n, transform, classes, scales_on, dtype):
    """A random ecsq tensor: (entry, streams)."""
    from aligncodec.codec.modes import lossy

    q = np.round(rng.laplace(0, 3.0, size=(rows, n))).astype(np.int32)
    q[: max(1, rows // 3)] *= 4
    sc = (0.5 + rng.random(n)).astype(np.float16).astype(np.float32) if scales_on else None
    hd = None
    m = 0
    if transform == lossy.TRANSFORM_HADAMARD:
        p, m = lossy.split_pow2(n)
        Q = np.linalg.qr(rng.standard_normal((m, m)))[0].astype(np.float32)
        hd = lossy.HadamardData(np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32), Q)
    base = lossy.EcsqParams(transform, float(np.float32(0.0173)), 0, lossy.FLAG_COL_SCALES if scales_on else 0, m)
    params, streams = lossy.encode_symbols(q, base, sc, hd, chunk_symbols=int(rng.choice([7, 64, 500])), classes=classes)
    return _entry_of(f"t.{rows}x{n}", dtype, (rows, n), params, streams)


def _entry_of(name, dtype, shape, params, streams):
    """Write one tensor to an in-memory archive and read it back: the entry and its parsed streams."""
    import tempfile

    from aligncodec.formats.constants import MODE_ECSQ
    from aligncodec.formats.reader import ArchiveReader
    from aligncodec.formats.writer import ArchiveWriter

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.acz")
        with ArchiveWriter(path) as w:
            w.add(name, dtype, shape, MODE_ECSQ, streams, params.pack())
        with ArchiveReader(path) as r:
            e = r.tensors[0]
            data = bytes(r.read_data(e))
    return e, data


SHAPES = [  # (rows, n): n a power of two (m = 1), odd n (p = 1), n = p·m with odd m > 1
    (5, 16), (3, 7), (6, 24), (4, 40), (2, 1), (3, 96),
]


@sim_only
@pytest.mark.parametrize("rows,n", SHAPES)
@pytest.mark.parametrize("variant", ["identity-K1", "hadamard-K1-scales", "hadamard-rowclasses", "identity-colclasses-scales"])
def test_random_tensor_on_device(lc, rows, n, variant):
    from aligncodec.codec.modes import lossy
    from aligncodec.formats.streams import parse_streams

    rng = np.random.default_rng(hash((rows, n, variant)) % 2**32)
    transform = lossy.TRANSFORM_HADAMARD if variant.startswith("hadamard") else lossy.TRANSFORM_IDENTITY
    classes = (3, 0) if "rowclasses" in variant else (4, 1) if "colclasses" in variant else (1, 0)
    dtype = ["F32", "F16", "BF16"][SHAPES.index((rows, n)) % 3]
    e, data = _make(rng, rows, n, transform, classes, "scales" in variant, dtype)
    st = parse_streams(data, e.stream_count)
    want = _cpu_bytes(e, st)
    # whole rows in shared memory, then segments + global butterfly stages, then m > segment
    for shared in (4096, 8, 2):
        lc.SHARED_FLOATS = shared
        assert _gpu_bytes(lc, e, st) == want, shared


@sim_only
def test_row_batches(lc):
    """Rows longer than the shared segment, processed a few rows at a time through the buffer."""
    from aligncodec.codec.modes import lossy
    from aligncodec.formats.streams import parse_streams

    rng = np.random.default_rng(5)
    e, data = _make(rng, 7, 48, lossy.TRANSFORM_HADAMARD, (2, 1), True, "BF16")
    st = parse_streams(data, e.stream_count)
    lc.SHARED_FLOATS = 6
    lc.BUFFER_BYTES = 4 * 48 * 3  # three rows per batch, last batch short
    assert _gpu_bytes(lc, e, st) == _cpu_bytes(e, st)


def _verdict(fn):
    from aligncodec.formats.errors import AczError

    try:
        return ("ok", hashlib.sha256(fn()).hexdigest())
    except AczError as exc:
        return (type(exc).__name__, str(exc))


def flipped_data_verdicts(lc, e, data: bytes, rng, kinds: dict, *, recrc: bool = False, tries: int = 40) -> int:
    """``tries`` copies of tensor ``e``'s data with 1-2 random bytes changed: each that parses into
    streams is decoded by the CPU and the GPU path, whose verdicts must agree; ``kinds`` counts the
    verdicts (and the parse errors). ``recrc``: the entry's CRC as if recomputed over the damage.
    Returns the number of cases that reached the decoders."""
    import dataclasses

    from aligncodec.formats.layout import crc32
    from aligncodec.formats.streams import parse_streams

    n_cases = 0
    for _ in range(tries):
        bad = bytearray(data)
        for i in rng.choice(len(bad), size=int(rng.integers(1, 3)), replace=False):
            bad[i] ^= int(rng.integers(1, 256))
        try:
            st = parse_streams(bytes(bad), e.stream_count)
        except Exception as exc:  # caught before any decoder runs: the same for both
            kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
            continue
        be = dataclasses.replace(e, crc=crc32(bytes(bad))) if recrc else e
        cpu = _verdict(lambda: _cpu_bytes(be, st))
        gpu = _verdict(lambda: _gpu_bytes(lc, be, st))
        assert gpu == cpu, (e.name, cpu, gpu)
        kinds[cpu[0]] = kinds.get(cpu[0], 0) + 1
        n_cases += 1
    return n_cases


@sim_only
def test_corrupt_data_same_verdicts(lc):
    """A damaged-archive corpus: bytes of the tensor data changed (CRC aside, as if it had been
    recomputed); the CPU and the GPU path reach the same verdict on every one."""
    from aligncodec.codec.modes import lossy
    from aligncodec.formats.reader import ArchiveReader

    rng = np.random.default_rng(11)
    cases = []
    for path in VECTORS:
        with ArchiveReader(path) as r:
            cases.append((r.tensors[0], bytes(r.read_data(r.tensors[0]))))
    cases.append(_make(rng, 6, 24, lossy.TRANSFORM_HADAMARD, (1, 0), True, "F16"))
    kinds = {}
    n_cases = sum(flipped_data_verdicts(lc, e, data, rng, kinds) for e, data in cases)
    assert n_cases >= 30, kinds
    assert "CorruptStreamError" in kinds and "ok" in kinds, kinds  # the corpus reaches the decoders' checks


@sim_only
def test_out_of_memory_names_the_tensor(lc, monkeypatch):
    from aligncodec.codec.entropy import decode_cuda
    from aligncodec.formats.reader import ArchiveReader

    path = VECTORS[0]
    with ArchiveReader(path) as r:
        e = r.tensors[0]
        st = r.read_streams(e)

    def full(n, dtype, stream_obj):
        raise MemoryError("CUDA_ERROR_OUT_OF_MEMORY")

    monkeypatch.setattr(decode_cuda, "_raw_device_array", full)
    with pytest.raises(decode_cuda.DeviceOutOfMemoryError, match=re.escape(repr(e.name))):
        lc.reconstruct_device(e, st)


@sim_only
def test_driver_calls_per_tensor(lc, monkeypatch):
    """Once this thread's pool is warm, a lossy tensor with several class streams (rows in shared
    memory) costs one host-to-device copy, two kernel launches (every class stream, then the
    reconstruction), one status copy back, and no allocation or other copy."""
    from numba import cuda

    from aligncodec.codec.modes import lossy
    from aligncodec.formats.streams import parse_streams

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cuda_calls import count_calls

    rng = np.random.default_rng(8)
    e, data = _make(rng, 6, 24, lossy.TRANSFORM_HADAMARD, (3, 0), True, "BF16")
    st = parse_streams(data, e.stream_count)
    out = cuda.to_device(np.zeros(e.numel, np.uint16))
    calls = count_calls(monkeypatch)
    lc.reconstruct_device(e, st, out)  # warms the pool
    calls.clear()
    assert lc.reconstruct_device(e, st, out).copy_to_host().tobytes() == _cpu_bytes(e, st)
    assert calls == {"h2d": 1, "launch": 2, "d2h": 1}, calls
