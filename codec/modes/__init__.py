"""Coding modes (spec/FORMAT.md §7): the one registry that maps a tensor's mode id to
what the decoders call.

Each :class:`Mode` names these callables:

* ``check_params(entry, limits)``: check what the header entry alone says (params, dtype,
  shape, stream count, reader limits such as the ecsq Hadamard factor), before any data;
* ``validate(entry, streams)``: check the entry's params and its parsed streams, decode
  nothing (``aligncodec verify --no-decode``);
* ``decode(entry, streams, *, reference=False)``: the tensor's little-endian bytes as a
  uint8 numpy array, on the CPU (``reference=True``: the plain reference rANS decoder);
* ``decode_gpu(entry, streams, device)`` (optional): a torch tensor of the entry's dtype on
  a CUDA device; a mode without one is decoded on the CPU and copied.

Adding a mode (or a GPU path for one) is one entry in :data:`MODES`. The callables are
imported on first use, so importing this registry costs nothing (no numba, no torch).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from aligncodec.codec.registry import lazy
from aligncodec.formats.constants import MODE_BYTEGROUP, MODE_ECSQ, MODE_FLOAT_SPLIT, MODE_NAMES, MODE_STORED, MODE_TCQ
from aligncodec.formats.errors import UnsupportedError
from aligncodec.formats.layout import TensorEntry


@dataclass(frozen=True)
class Mode:
    validate: Callable[[TensorEntry, list], None]
    decode: Callable[..., np.ndarray]
    decode_gpu: Callable | None = None
    check_params: Callable | None = None


_LOSSLESS = "aligncodec.codec.modes.lossless"
_LOSSY = "aligncodec.codec.modes.lossy"
_CUDA = "aligncodec.codec.entropy.decode_cuda"
_LOSSY_CUDA = "aligncodec.codec.modes.lossy_cuda"

MODES: dict[int, Mode] = {
    MODE_STORED: Mode(lazy(_LOSSLESS, "validate"), lazy(_LOSSLESS, "decode"), None, lazy(_LOSSLESS, "check_params")),
    MODE_FLOAT_SPLIT: Mode(lazy(_LOSSLESS, "validate"), lazy(_LOSSLESS, "decode"), lazy(_CUDA, "decode_float_split_tensor"),
                           lazy(_LOSSLESS, "check_params")),
    MODE_ECSQ: Mode(lazy(_LOSSY, "validate"), lazy(_LOSSY, "decode"), lazy(_LOSSY_CUDA, "decode_gpu"), lazy(_LOSSY, "check_params")),
    # no GPU path: for a CUDA device the loader decodes a bytegroup tensor on the CPU pool as soon as
    # it is read (zstd + the byte-plane join, GB/s on a few cores), while the GPU decodes the batches
    # of the other modes (gpu_batch), and copies it to the device in its turn
    MODE_BYTEGROUP: Mode(lazy(_LOSSLESS, "validate"), lazy(_LOSSLESS, "decode"), None, lazy(_LOSSLESS, "check_params")),
    # trellis-coded ecsq (spec §7.6): the same streams and reconstruction after an integer pass
    # over the symbols (the level walk down each column), on the CPU and on the GPU
    MODE_TCQ: Mode(lazy(_LOSSY, "validate"), lazy(_LOSSY, "decode"), lazy(_LOSSY_CUDA, "decode_gpu"), lazy(_LOSSY, "check_params")),
}
assert set(MODES) == set(MODE_NAMES), "every mode id in formats.constants has a registry entry"


def mode_of(entry: TensorEntry) -> Mode:
    try:
        return MODES[entry.mode]
    except KeyError:
        raise UnsupportedError(f"tensor {entry.name!r}: coding mode {entry.mode} is not supported by this build") from None


def check_entry_params(entry: TensorEntry, limits=None) -> None:
    """Check what a tensor's header entry says about its coding (mode known, params, dtype,
    shape, stream count, the reader's limits) before reading its data."""
    m = mode_of(entry)
    if m.check_params is not None:
        m.check_params(entry, limits)


def validate_entry(entry: TensorEntry, streams: list) -> None:
    """Check a tensor's params and streams against its coding mode without decoding."""
    mode_of(entry).validate(entry, streams)


def decode_entry(entry: TensorEntry, streams: list, *, reference: bool = False) -> np.ndarray:
    """Decode one tensor to its little-endian bytes (uint8) on the CPU."""
    return mode_of(entry).decode(entry, streams, reference=reference)


def has_gpu_path(entry: TensorEntry) -> bool:
    return mode_of(entry).decode_gpu is not None


def decode_entry_gpu(entry: TensorEntry, streams: list, device):
    """Decode one tensor into a torch tensor on a CUDA ``device``, or None when its mode has
    no GPU path (the caller then decodes on the CPU and copies)."""
    gpu = mode_of(entry).decode_gpu
    return None if gpu is None else gpu(entry, streams, device)


def release_decoder_scratch() -> None:
    """Free the idle buffers the CPU decoders keep for the next tensor (the lossy decoder's
    pooled symbol buffers), if that decoder was ever loaded: the end of a load, or an encoder's
    read-back check."""
    lossy_cpu = sys.modules.get(__name__ + ".lossy_cpu")
    if lossy_cpu is not None:
        lossy_cpu.release_scratch()
