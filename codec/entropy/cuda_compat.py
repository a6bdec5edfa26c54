"""Device-side primitives that behave identically on a GPU and in numba's CUDA simulator.

* ``fmul_rn`` / ``fadd_rn`` / ``fsub_rn``: one IEEE binary32 operation, round to nearest
  even, never fused. NVVM contracts a plain ``a * b + c`` into ``fma.rn.f32`` by default
  (numba passes no ``-fma=0``), which would break spec §7.4's "no fused multiply-add";
  libdevice's ``__nv_fmul_rn`` lowers to ``mul.rn.f32``, which PTX never contracts
  (tests/test_codec_modes_lossy_cuda.py compiles the kernels to PTX and checks there is no ``fma``).
* ``f32_bits``: the bit pattern of a float32 as uint32 (libdevice ``float_as_int``).
* ``ballot_sync`` (warp vote) and ``shfl_sync`` (indexed warp shuffle): the simulator has
  neither, so :func:`install_simulator_warp_vote` adds them to its fake ``cuda`` module, built
  on the block barrier the simulator does have. They are exact for kernels whose warps call them in lock step (every
  lane of a warp reaches the same call), which is how the interleaved-lanes rANS kernel uses them.

In the simulator the float operations are numpy float32 operations (one rounding each).
"""

from __future__ import annotations

import os
import threading

import numpy as np
from numba import config, cuda

SIMULATOR = bool(config.ENABLE_CUDASIM)

# A model load launches kernels for many small tensors; numba would warn "Grid size N will
# likely result in GPU under-utilization" for each of them, flooding the user's log with a
# condition they cannot act on. Off unless the user set NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS.
if "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS" not in os.environ:
    config.CUDA_LOW_OCCUPANCY_WARNINGS = 0

if SIMULATOR:

    def fmul_rn(x, y):
        return np.float32(np.float32(x) * np.float32(y))

    def fadd_rn(x, y):
        return np.float32(np.float32(x) + np.float32(y))

    def fsub_rn(x, y):
        return np.float32(np.float32(x) - np.float32(y))

    def f32_bits(x):
        return np.float32(x).view(np.uint32)

else:
    from numba.cuda import libdevice as _ld

    fmul_rn = _ld.fmul_rn
    fadd_rn = _ld.fadd_rn
    fsub_rn = _ld.fsub_rn

    @cuda.jit(device=True, inline=True)
    def f32_bits(x):
        return np.uint32(_ld.float_as_int(x))


def install_simulator_warp_vote() -> None:
    """Give the simulator's fake ``cuda`` module ``ballot_sync(mask, predicate)`` and ``shfl_sync(mask, value, src_lane)`` (idempotent)."""
    if not SIMULATOR:
        return
    from numba.cuda.simulator import kernelapi

    if hasattr(kernelapi.FakeCUDAModule, "ballot_sync") and hasattr(kernelapi.FakeCUDAModule, "shfl_sync"):
        return

    def ballot_sync(self, mask, predicate):
        t = threading.current_thread()
        state = t._manager.block_state  # bool array of the block's shape, one entry per thread
        idx = (t.threadIdx.x, t.threadIdx.y, t.threadIdx.z)[: state.ndim]
        state[idx] = bool(predicate)
        t.syncthreads()
        flat = state.reshape(-1, order="F")  # thread_id order (x fastest)
        w = t.thread_id // 32
        bits = 0
        for lane, b in enumerate(flat[32 * w : 32 * w + 32]):
            if b:
                bits |= 1 << lane
        t.syncthreads()
        return np.uint32(bits & int(mask))

    def shfl_sync(self, mask, value, src_lane):
        t = threading.current_thread()
        vals = t._manager.__dict__.setdefault("_acz_shfl", {})  # thread_id -> value (dict ops are atomic)
        vals[t.thread_id] = value
        t.syncthreads()
        got = vals[32 * (t.thread_id // 32) + (int(src_lane) & 31)]
        t.syncthreads()
        return got

    kernelapi.FakeCUDAModule.ballot_sync = ballot_sync
    kernelapi.FakeCUDAModule.shfl_sync = shfl_sync


install_simulator_warp_vote()
