"""Lossless modes: bit-exact for every float dtype and special value; bit packing; checkpoint round trip."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from aligncodec.codec.modes import lossless
from aligncodec.formats.constants import MODE_FLOAT_SPLIT
from aligncodec.formats.layout import TensorEntry
from aligncodec import archive

SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-45, 65504.0, 3.0e38]


@pytest.mark.parametrize("dtype,torch_dtype", [("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16), ("F64", torch.float64)])
@pytest.mark.parametrize("k", [None, 0, 1, 3])
def test_float_split_bit_exact(dtype, torch_dtype, k):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4096, generator=g) * 0.02
    t[:len(SPECIALS)] = torch.tensor(SPECIALS)
    raw = t.to(torch_dtype).view(torch.uint8).numpy()
    mode, params, streams = lossless.encode(raw, dtype, t.numel(), mantissa_bits=k, mode=MODE_FLOAT_SPLIT)
    e = TensorEntry("t", dtype, (t.numel(),), mode, len(streams), 0, 0, 0, params)
    assert lossless.decode(e, streams).tobytes() == raw.tobytes()
    assert lossless.decode(e, streams, reference=True).tobytes() == raw.tobytes()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 63), st.integers(0, 300), st.integers(0, 2**32))
def test_pack_bits_roundtrip(width, n, seed):
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 2**width if width < 63 else 2**62, n, dtype=np.uint64)
    packed = lossless.pack_bits(v, width)
    assert len(packed) == lossless.packed_size(n, width)
    assert np.array_equal(lossless.unpack_bits(packed, n, width), v)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
@pytest.mark.parametrize("width", [3, 8, 13, 16, 24, 31])
def test_pack_bits_of_narrow_types_is_the_uint64_packing(dtype, width):
    """Unsigned values are packed in their own width (split_float's rest of a large F32 tensor:
    no uint64 copy): the same bytes as packing them widened to uint64."""
    bits = 8 * np.dtype(dtype).itemsize
    rng = np.random.default_rng(width + bits)
    v = rng.integers(0, 2 ** min(width, bits), 1001, dtype=np.uint64)
    assert lossless.pack_bits(v.astype(dtype), width) == lossless.pack_bits(v, width)


def test_pack_bits_is_lsb_first():
    # values 1 and 2 in 3 bits: bits 100 010 -> 0b010001 = 0x11
    assert lossless.pack_bits(np.array([1, 2]), 3) == bytes([0x11])


def test_stream_sizes_checked_against_shape():
    raw = np.arange(1024, dtype="<f4").view(np.uint8)
    mode, params, streams = lossless.encode(raw, "F32", 1024)
    e = TensorEntry("t", "F32", (2048,), mode, len(streams), 0, 0, 0, params)
    from aligncodec.formats.errors import StreamError

    with pytest.raises(StreamError):
        lossless.decode(e, streams)


def test_checkpoint_folder_roundtrip_byte_exact(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    g = torch.Generator().manual_seed(1)
    save_file({"a.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16), "a.bias": torch.zeros(64)}, src / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({"b.weight": torch.randn(32, 32, generator=g).half(), "step": torch.tensor(7, dtype=torch.int64)}, src / "model-00002-of-00002.safetensors")
    (src / "config.json").write_text(json.dumps({"hidden_size": 48}))
    archive.compress(src, tmp_path / "m.acz", progress=False)
    archive.verify(tmp_path / "m.acz")
    out = tmp_path / "out"
    archive.decompress(tmp_path / "m.acz", out, progress=False)
    for f in src.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    info = archive.inspect(tmp_path / "m.acz")
    assert info["n_weights"] == 64 * 48 + 64 + 32 * 32 + 1
    assert info["bpw"] == pytest.approx((info["file_bytes"] - info["aux_bytes"]) * 8 / info["n_weights"])
