"""Lossless mode 3, bytegroup (spec §7.5): bit-exact for every float dtype, special value, slice
size and thread count; the fast decoder equals the numpy reference; the encoder's policies; every
declared size and the zstd content size checked before decoding; CPU fallback for CUDA targets."""

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from aligncodec.codec import parallel
from aligncodec.codec.modes import MODES, lossless
from aligncodec.formats.constants import FLOAT_FORMATS, MAX_STREAMS, MODE_BYTEGROUP, MODE_FLOAT_SPLIT, MODE_STORED
from aligncodec.formats.errors import CorruptStreamError, StreamError
from aligncodec.formats.layout import TensorEntry
from aligncodec.formats.streams import RawStream, ZstdStream

SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-45, 65504.0, 3.0e38]
TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def weights(dtype: str, n: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    k = min(n, len(SPECIALS))
    t[:k] = torch.tensor(SPECIALS[:k], dtype=torch.float64)
    return t.to(TORCH[dtype]).view(torch.uint8).numpy().copy()


def entry(dtype, n, params, streams, name="t"):
    return TensorEntry(name, dtype, (n,), MODE_BYTEGROUP, len(streams), 0, 0, 0, params)


def decode_all_ways(e, streams):
    """The fast plan (1 and 2 threads) and the numpy reference: all must agree."""
    outs = [lossless.decode(e, streams, reference=True).tobytes()]
    for th in (1, 2):
        outs.append(lossless.decode(e, streams, threads=th).tobytes())
    assert len(set(outs)) == 1
    return outs[0]


@pytest.mark.parametrize("dtype", sorted(FLOAT_FORMATS))
@pytest.mark.parametrize("n,slice_elems", [(1, None), (9, None), (4096, None), (4096, 1000), (4096, 4096), (300_001, None)])
def test_bit_exact(dtype, n, slice_elems):
    raw = weights(dtype, n)
    width = FLOAT_FORMATS[dtype][0]
    params, streams = lossless.encode_bytegroup(raw.view(f"<u{width // 8}"), dtype, slice_elems=slice_elems)
    S = int.from_bytes(params, "little")
    assert len(streams) == -(-n // S) * (width // 8) <= MAX_STREAMS
    assert decode_all_ways(entry(dtype, n, params, streams), streams) == raw.tobytes()


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(FLOAT_FORMATS)), st.integers(1, 700), st.integers(1, 800), st.integers(0, 2**32 - 1))
def test_any_bit_pattern_round_trips(dtype, n, slice_elems, seed):
    """Arbitrary bit patterns (NaN payloads, subnormals, both zeros) and slice lengths."""
    width = FLOAT_FORMATS[dtype][0]
    if -(-n // slice_elems) * (width // 8) > MAX_STREAMS:
        slice_elems = -(-n // (MAX_STREAMS // (width // 8)))
    raw = np.random.default_rng(seed).integers(0, 256, n * width // 8, dtype=np.uint8)
    params, streams = lossless.encode_bytegroup(raw.view(f"<u{width // 8}"), dtype, slice_elems=slice_elems)
    assert decode_all_ways(entry(dtype, n, params, streams), streams) == raw.tobytes()


def test_planes_are_the_rotated_bytes():
    # BF16 -1.5 = 0xBFC0: rotated left by one = 0x7F81, so plane 0 (low byte) 0x81, plane 1 0x7F
    b = np.array([0xBFC0], dtype="<u2")
    assert lossless.bytegroup_planes(b, 16).tolist() == [[0x81], [0x7F]]
    assert lossless.rotr1(lossless.rotl1(b, 16), 16).tolist() == [0xBFC0]


def test_decodes_into_the_loader_buffer_in_parallel():
    raw = weights("BF16", 1 << 20)
    mode, params, streams = lossless.encode(raw, "BF16", raw.size // 2, mode=MODE_BYTEGROUP)
    e = entry("BF16", raw.size // 2, params, streams)
    assert e.stream_count > 2  # several slices: one task each
    out = np.empty(raw.size, np.uint8)
    assert parallel.run(lossless.plan_decode(e, streams, out, threads=2), 2) is out
    assert out.tobytes() == raw.tobytes()


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
def test_policies(dtype, size):
    raw = weights(dtype, 50_000 if size == "small" else 70_000, seed=3)
    n = raw.size // (FLOAT_FORMATS[dtype][0] // 8)
    got = {p: lossless.encode(raw, dtype, n, policy=p) for p in lossless.POLICIES}
    size = {p: lossless._streams_size(c[2]) for p, c in got.items()}
    assert got["float-split"][0] in (MODE_FLOAT_SPLIT, MODE_STORED)
    assert got["bytegroup"][0] in (MODE_BYTEGROUP, MODE_STORED)
    assert size["smallest"] == min(size["bytegroup"], size["float-split"])
    if dtype != "BF16":  # auto: the smaller of stored and bytegroup unless float-split is more than AUTO_TOLERANCE smaller
        if got["auto"][0] != MODE_FLOAT_SPLIT:
            assert size["auto"] == size["bytegroup"] <= (1 + lossless.AUTO_TOLERANCE) * size["smallest"]
        else:
            assert size["auto"] == size["smallest"] and size["bytegroup"] > (1 + lossless.AUTO_TOLERANCE) * size["smallest"]
    elif n < lossless.AUTO_ALL_BELOW:  # BF16: every mode for a small tensor
        assert got["auto"][0] == got["smallest"][0] and size["auto"] == size["smallest"]
    else:  # BF16: float-split (or stored)
        assert got["auto"][0] == got["float-split"][0] and size["auto"] == size["float-split"]
    for p, (mode, params, streams) in got.items():
        e = TensorEntry("t", dtype, (n,), mode, len(streams), 0, 0, 0, params)
        assert lossless.decode(e, streams).tobytes() == raw.tobytes(), p


def test_use_policy_and_default():
    raw = weights("F16", 4096)
    assert lossless.current_policy() == lossless.DEFAULT_POLICY
    with lossless.use_policy("float-split"):
        assert lossless.current_policy() == "float-split"
        assert lossless.encode(raw, "F16", 4096)[0] == MODE_FLOAT_SPLIT
    assert lossless.current_policy() == lossless.DEFAULT_POLICY
    with pytest.raises(ValueError):
        with lossless.use_policy("fastest"):
            pass


def test_forced_mode_and_non_float_dtype():
    assert lossless.encode(weights("F32", 3), "F32", 3, mode=MODE_BYTEGROUP)[0] == MODE_BYTEGROUP
    with pytest.raises(ValueError):
        lossless.encode(np.arange(8, dtype=np.int32).view(np.uint8), "I32", 8, mode=MODE_BYTEGROUP)


def _good(n=3000, slice_elems=1000):
    raw = weights("BF16", n)
    params, streams = lossless.encode_bytegroup(raw.view("<u2"), "BF16", slice_elems=slice_elems)
    assert isinstance(streams[1], ZstdStream)
    return raw, params, streams


def _check_fails(e, streams, exc):
    with pytest.raises(exc):
        lossless.validate(e, streams)
    for ref in (False, True):
        with pytest.raises(exc):
            lossless.decode(e, streams, reference=ref)


def test_header_checks():
    raw, params, streams = _good()
    with pytest.raises(StreamError):  # stream count must be ceil(numel / S) * 2
        lossless.check_params(TensorEntry("t", "BF16", (3000,), MODE_BYTEGROUP, 4, 0, 0, 0, params))
    for bad in (bytes(4), params + b"\0", params[:3]):
        with pytest.raises(StreamError):
            lossless.check_params(TensorEntry("t", "BF16", (3000,), MODE_BYTEGROUP, 6, 0, 0, 0, bad))
    with pytest.raises(StreamError):
        lossless.check_params(TensorEntry("t", "I16", (3000,), MODE_BYTEGROUP, 6, 0, 0, 0, params))
    with pytest.raises(StreamError):
        lossless.check_params(TensorEntry("t", "BF16", (0,), MODE_BYTEGROUP, 2, 0, 0, 0, params))


def test_stream_checks_before_decoding():
    raw, params, streams = _good()
    e = entry("BF16", 3000, params, streams)
    plane = lossless.bytegroup_planes(raw.view("<u2"), 16)[1, :1000].tobytes()
    # a raw plane of the wrong size
    _check_fails(e, [RawStream(plane[:999])] + streams[1:], StreamError)
    # a zstd stream whose declared count is not the slice's
    _check_fails(e, [streams[0], ZstdStream(streams[1].data, 999)] + streams[2:], StreamError)
    # a frame without its content size
    bare = zstandard.ZstdCompressor(write_content_size=False).compress(plane)
    _check_fails(e, [streams[0], ZstdStream(bare, 1000)] + streams[2:], StreamError)
    # a frame that declares (and holds) one byte more than the slice: never decoded past the limit
    longer = zstandard.ZstdCompressor(write_content_size=True).compress(plane + b"x")
    _check_fails(e, [streams[0], ZstdStream(longer, 1000)] + streams[2:], CorruptStreamError)


def test_damaged_frame_is_a_named_error_or_the_right_size():
    """A frame cut short is a CorruptStreamError; a flipped byte inside a block is either that or
    bytes of the slice's size (zstd frames carry no checksum here: the tensor's CRC-32, checked
    before decoding, is what catches it in an archive), never a crash or a larger output."""
    raw, params, streams = _good()
    e = entry("BF16", 3000, params, streams)
    cut = [streams[0], ZstdStream(bytes(streams[1].data[:-3]), 1000)] + streams[2:]
    longer = [streams[0], ZstdStream(bytes(streams[1].data) + b"junk", 1000)] + streams[2:]  # not exactly one frame
    for bad in (cut, longer):
        for ref in (False, True):
            with pytest.raises(CorruptStreamError):
                lossless.decode(e, bad, reference=ref)
    z0 = bytes(streams[1].data)
    for i in range(6, len(z0)):
        z = bytearray(z0)
        z[i] ^= 0x5A
        bad = [streams[0], ZstdStream(bytes(z), 1000)] + streams[2:]
        try:
            out = lossless.decode(e, bad)
        except (CorruptStreamError, StreamError):
            continue
        assert out.size == raw.size


def test_registry_has_no_gpu_path_so_cuda_targets_decode_on_the_cpu():
    assert MODES[MODE_BYTEGROUP].decode_gpu is None
    from aligncodec.codec.modes import has_gpu_path

    raw, params, streams = _good()
    assert not has_gpu_path(entry("BF16", 3000, params, streams))


def test_archive_with_both_lossless_float_modes_loads_bit_exact(tmp_path):
    """The default policy on a mixed checkpoint: fp16 tensors and an fp32 tensor of bf16 values in
    bytegroup, bf16 ones in float-split; every read path agrees."""
    from safetensors.torch import save_file

    from aligncodec import archive, loader

    g = torch.Generator().manual_seed(5)
    sd = {"a.weight": (torch.randn(512, 256, generator=g) * 0.02).half(),
          "b.weight": (torch.randn(512, 256, generator=g) * 0.02).to(torch.bfloat16),
          "c.bias": torch.zeros(7),
          "d.weight": (torch.randn(512, 256, generator=g) * 0.02).to(torch.bfloat16).float()}
    src = tmp_path / "m"
    src.mkdir()
    save_file(sd, src / "model.safetensors")
    archive.compress(src, tmp_path / "m.acz", progress=False)
    modes = {t["name"]: t["mode"] for t in archive.inspect(tmp_path / "m.acz")["tensors"]}
    assert modes["a.weight"] == modes["d.weight"] == "bytegroup" and modes["b.weight"] == "float-split", modes
    archive.verify(tmp_path / "m.acz")
    got = loader.load_state_dict(tmp_path / "m.acz")
    for k, v in sd.items():
        assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k
    with open(tmp_path / "m.acz", "rb") as fh:  # front to back, as from a pipe
        got = loader.load_state_dict(fh)
    assert all(torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)) for k, v in sd.items())


def test_cli_lossless_mode_flag(tmp_path):
    from safetensors.torch import save_file

    from aligncodec import archive
    from aligncodec.tools.cli import main

    g = torch.Generator().manual_seed(6)
    save_file({"w": (torch.randn(300, 300, generator=g) * 0.02).to(torch.bfloat16)}, tmp_path / "m.safetensors")
    for mode in ("bytegroup", "float-split"):
        out = tmp_path / f"{mode}.acz"
        assert main(["compress", str(tmp_path / "m.safetensors"), "-o", str(out), "--lossless", "--lossless-mode", mode, "-q"]) == 0
        assert archive.inspect(out)["tensors"][0]["mode"] == mode
    assert lossless.current_policy() == lossless.DEFAULT_POLICY  # the CLI's block is over
