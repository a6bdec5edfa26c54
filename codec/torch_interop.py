"""The one bridge between archive dtypes/bytes and torch: the dtype table and zero-copy
conversions both ways. Everything else in ``codec/`` and ``formats/`` is torch-free;
torch is imported only when a function here is called.
"""

from __future__ import annotations

import numpy as np

from aligncodec.formats.errors import StreamError
from aligncodec.formats.layout import TensorEntry

# archive dtype name (formats.constants.DTYPES) -> torch dtype attribute
TORCH_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8", "I16": "int16",
    "I32": "int32", "I64": "int64", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def torch_dtype(name: str):
    """The torch dtype of an archive dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def tensor_bytes(t) -> np.ndarray:
    """A torch tensor's little-endian bytes as a uint8 numpy array (a view where possible)."""
    import torch

    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


def bytes_to_tensor(entry: TensorEntry, raw: np.ndarray):
    """Decoded little-endian bytes as a torch tensor of the entry's dtype and shape: a view
    of ``raw`` when it is writable (copied once otherwise; torch wants memory it may write).
    Raises StreamError when the byte count does not match the entry."""
    import torch

    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size != entry.nbytes:
        raise StreamError(f"tensor {entry.name!r} decoded to {raw.size} bytes, {entry.nbytes} expected")
    if not raw.flags.writeable:
        raw = raw.copy()
    t = torch.from_numpy(raw) if raw.size else torch.zeros(0, dtype=torch.uint8)
    return t.view(torch_dtype(entry.dtype)).reshape(entry.shape)
