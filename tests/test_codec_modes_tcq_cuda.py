"""GPU decoding of lossy mode 4 ``tcq`` (codec/modes/lossy_cuda.py: levels_kernel, then the ecsq
reconstruction) bit-exact with the CPU decoder, and the same named errors on damaged archives.

The device tests run in a child process under numba's CUDA simulator
(``test_tcq_kernels_under_simulator`` drives them); run them directly with
``NUMBA_ENABLE_CUDASIM=1 pytest tests/test_codec_modes_tcq_cuda.py``, or on a real device with
``ACZ_TEST_REAL_GPU=1 pytest tests/test_codec_modes_tcq_cuda.py -k "not under_simulator"``.
The random-tensor cases are a covering subset of the grid by default (the simulator is slow);
``ACZ_SIM_FULL=1`` runs all of it.
"""

import os

import numpy as np
import pytest

from test_codec_modes_lossy_cuda import _cpu_bytes, _gpu_bytes, _verdict, flipped_data_verdicts, lc  # noqa: F401 (lc: the fixture)
from test_codec_modes_tcq_cpu import MACHINES, make_tcq

IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
ON_GPU = IN_SIM or os.environ.get("ACZ_TEST_REAL_GPU") == "1"
sim_only = pytest.mark.skipif(not ON_GPU, reason="runs in the NUMBA_ENABLE_CUDASIM=1 child process (or with ACZ_TEST_REAL_GPU=1)")
host_only = pytest.mark.skipif(IN_SIM, reason="runs without the simulator")

SHAPES = [(5, 16), (3, 7), (2, 1), (17, 40)]  # n a power of two, odd n, a single column, n = 8·5
VARIANTS = ["identity-K1", "hadamard-K1-scales", "hadamard-rowclasses", "identity-colclasses-scales"]
# The full grid (machines x shapes x variants, 48 cases) under ACZ_SIM_FULL=1; by default a covering
# subset: every (machine, variant) pair once, the shape rotating so that each shape meets every machine.
if os.environ.get("ACZ_SIM_FULL") == "1":
    CASES = [(mid, v, s) for mid in MACHINES for v in VARIANTS for s in SHAPES]
else:
    CASES = [(mid, v, SHAPES[(a + b) % len(SHAPES)]) for a, mid in enumerate(MACHINES) for b, v in enumerate(VARIANTS)]
N_SIM_TESTS = len(CASES) + 2  # + lanes, corruption; checked by the driver


@host_only
def test_tcq_kernels_under_simulator():
    """Driver: run this module's simulator tests in a child process."""
    from simulator import run_under_simulator

    run_under_simulator(__file__, N_SIM_TESTS, timeout=1800)


@host_only
def test_tcq_has_a_gpu_path():
    from aligncodec.codec.modes import MODES
    from aligncodec.formats.constants import MODE_ECSQ, MODE_TCQ

    gpu = MODES[MODE_TCQ].decode_gpu  # ecsq's: lossy_cuda.decode_gpu, which runs the level kernel for tcq
    assert gpu is not None and gpu.__qualname__ == MODES[MODE_ECSQ].decode_gpu.__qualname__ == "aligncodec.codec.modes.lossy_cuda.decode_gpu"


@sim_only
@pytest.mark.parametrize("mid,variant,shape", CASES, ids=lambda c: str(c))
def test_random_tcq_tensor_on_device(lc, mid, variant, shape):
    rows, n = shape
    transform = 1 if variant.startswith("hadamard") else 0
    classes = (3, 0) if "rowclasses" in variant else (4, 1) if "colclasses" in variant else (1, 0)
    dtype = ["F32", "F16", "BF16"][(SHAPES.index((rows, n)) + mid) % 3]
    e, st = make_tcq(rows, n, mid, dtype=dtype, transform=transform, colscale="scales" in variant, classes=classes,
                     seed=rows * 100 + n + mid, chunk=int(np.random.default_rng(n).choice([7, 64, 500])),
                     extreme=(rows + n) % 2 == 1)
    want = _cpu_bytes(e, st)
    # whole rows in shared memory, then segments + global butterfly stages (tcq changes only the q)
    for shared in (4096, 2):
        lc.SHARED_FLOATS = shared
        assert _gpu_bytes(lc, e, st) == want, shared


@sim_only
def test_lanes_coder_on_device(lc):
    for mid in MACHINES:
        e, st = make_tcq(12, 20, mid, dtype="BF16", colscale=True, classes=(2, 1), chunk=64, lanes=8, seed=mid)
        assert _gpu_bytes(lc, e, st) == _cpu_bytes(e, st), mid


@sim_only
def test_corrupt_tcq_same_verdicts(lc):
    """Damaged tcq tensor data (bytes flipped, the CRC as if recomputed) and damaged params
    (the machine id byte, symbol offsets past ±16383): the CPU and the GPU path reach the same
    verdict, a named error or the same bytes, on every case."""
    import dataclasses

    from aligncodec.formats.layout import align
    from aligncodec.formats.streams import serialize_stream

    rng = np.random.default_rng(14)
    kinds: dict = {}
    n_cases = 0
    for mid, classes in ((1, (1, 0)), (2, (3, 0)), (3, (2, 1)), (5, (3, 1))):
        e, st = make_tcq(12, 32, mid, dtype="F16", colscale=True, classes=classes, seed=mid)
        data = b""
        for i, s in enumerate(st):
            b = serialize_stream(s)
            data += b + (bytes(align(len(b), 8) - len(b)) if i + 1 < len(st) else b"")
        n_cases += flipped_data_verdicts(lc, e, data, rng, kinds, recrc=True)
        for byte17 in (0, 6, 200, 255):  # unknown state-machine ids (0: ecsq's byte; 6: the first unassigned; 255 reserved)
            p = bytearray(e.params)
            p[17] = byte17
            be = dataclasses.replace(e, params=bytes(p))
            cpu, gpu = _verdict(lambda: _cpu_bytes(be, st)), _verdict(lambda: _gpu_bytes(lc, be, st))
            assert cpu == gpu and cpu[0] == "UnsupportedError", (cpu, gpu)
    assert n_cases >= 30, kinds
    assert "CorruptStreamError" in kinds and "ok" in kinds, kinds
