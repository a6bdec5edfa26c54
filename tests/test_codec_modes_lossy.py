"""Lossy mode ecsq (spec §7.4): bit-exact decode, rate targeting, all-in byte counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aligncodec.codec import encoder as E
from aligncodec.codec.modes import lossy
from aligncodec.formats.constants import MODE_ECSQ, PREAMBLE_SIZE, SECTION_METADATA
from aligncodec.formats.layout import TensorEntry, align, crc32
from aligncodec.formats.streams import parse_streams, serialize_stream
from aligncodec.formats.reader import ArchiveReader
from aligncodec.formats.writer import build_section
from aligncodec.formats import errors as FE
from aligncodec import archive
from aligncodec import encode as S
from aligncodec.codec.modes import decode_entry
from aligncodec.codec.torch_interop import bytes_to_tensor


def _sigma(n, seed, spike=True):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    S = A @ A.T + 0.1 * torch.eye(n, dtype=torch.float64)
    if spike:
        S[1, 1] *= 50
    return S


def _job(rows, n, seed, dtype="F32", sigma=True):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(rows, n, generator=g) * 0.05).to(torch.float32)
    return E.TensorJob(f"m.l{seed}.weight", W, dtype, _sigma(n, seed) if sigma else None)


def _through_container(tc: E.TensorCode, name, dtype, shape):
    data = b""
    for i, s in enumerate(tc.streams):
        b = serialize_stream(s)
        if i + 1 < len(tc.streams):
            b += bytes(align(len(b), 8) - len(b))
        data += b
    streams = parse_streams(data, len(tc.streams))
    e = TensorEntry(name, dtype, shape, MODE_ECSQ, len(streams), 0, len(data), crc32(data), tc.params.pack())
    return e, streams


@pytest.mark.parametrize("kind", E.CANDIDATES)
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_decode_bit_exact(kind, dtype):
    job = _job(40, 96, 1, dtype)  # 96 = 32·3: the hadamard has an odd factor
    E.build_candidates(job, (kind,))
    tc = E.code_candidate(job, job.cands[0], 0.02)
    e, streams = _through_container(tc, job.name, dtype, tuple(job.W.shape))
    raw = decode_entry(e, streams)
    ref = decode_entry(e, streams, reference=True)
    assert np.array_equal(raw, ref)
    got = bytes_to_tensor(e, raw).to(torch.float32).numpy()
    assert np.array_equal(got.view(np.uint32), tc.W_hat.view(np.uint32))
    # and the reconstruction is a quantisation of W, not garbage
    assert 5 < tc.sqnr_db < 60


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 24), n=st.sampled_from([1, 3, 8, 12, 40, 64]), step=st.floats(1e-3, 0.2),
       kind=st.sampled_from(E.CANDIDATES), seed=st.integers(0, 100),
       cls=st.sampled_from([(1, 0), (2, 0), (3, 1), (16, 1), (16, 0)]))
def test_roundtrip_property(rows, n, step, kind, seed, cls):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, n, generator=g) * 0.05
    job = E.TensorJob("x.weight", W, "F32", _sigma(n, seed, spike=False))
    E.build_candidates(job, (kind,))
    tc = E.code_candidate(job, job.cands[0], step, class_options=[cls])
    e, streams = _through_container(tc, "x.weight", "F32", (rows, n))
    got = lossy.decode(e, streams).view(np.float32).reshape(rows, n)
    assert np.array_equal(got, tc.W_hat)
    # error bounded: GPTQ with feedback never gets worse than a few steps per weight
    assert np.abs(got - W.numpy()).max() < 50 * step + 1e-6


def test_transform_is_orthogonal_and_matches_float64():
    hd = lossy.HadamardData.from_seed(96, 7)
    T = hd.matrix64()
    assert np.allclose(T.T @ T, np.eye(96), atol=1e-6)
    Cm = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32)
    got = lossy.inverse_hadamard_f32(Cm, hd)
    assert np.allclose(got, Cm.astype(np.float64) @ T.T, atol=1e-5)
    # serialisation round trip
    hd2 = lossy.HadamardData.from_bytes(hd.to_bytes(), 96, hd.m)
    assert np.array_equal(hd2.signs, hd.signs) and np.array_equal(hd2.Q, hd.Q)


def test_bad_params_and_streams_raise_named_errors():
    job = _job(8, 64, 2)
    E.build_candidates(job, ("hadamard-colscale",))
    tc = E.code_candidate(job, job.cands[0], 0.05)
    e, streams = _through_container(tc, job.name, "F32", (8, 64))
    bad = TensorEntry(e.name, e.dtype, e.shape, e.mode, e.stream_count, 0, e.size, e.crc, e.params[:-1])
    with pytest.raises(FE.StreamError):
        lossy.decode(bad, streams)
    with pytest.raises(FE.StreamError):
        lossy.decode(e, streams[:2])
    p = lossy.EcsqParams.unpack(e.params)
    p.transform = 9
    with pytest.raises(FE.UnsupportedError):
        lossy.decode(TensorEntry(e.name, e.dtype, e.shape, e.mode, 3, 0, 0, 0, p.pack()), streams)
    with pytest.raises(FE.StreamError):  # a 3-D shape cannot be ecsq
        lossy.decode(TensorEntry(e.name, e.dtype, (2, 4, 64), e.mode, 3, 0, 0, 0, e.params), streams)


def _write_model(path, seed=0):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(192, 128, generator=g) * 0.05,
        "model.layers.0.mlp.down_proj.weight": torch.randn(128, 384, generator=g) * 0.03,
        "model.layers.0.mlp.up_proj.weight": (torch.randn(384, 128, generator=g) * 0.04).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.ones(128) + 0.01 * torch.randn(128, generator=g),
        "model.embed_tokens.weight": torch.randn(100, 128, generator=g) * 0.1,
    }
    save_file(sd, str(path))
    return sd


def test_compress_meets_bpw_and_counts_every_byte(tmp_path, full_codes):
    target = 2.5
    src = tmp_path / "model.safetensors"
    sd = _write_model(src)
    out = tmp_path / "m.acz"
    codes = full_codes
    summ = S.encode(src, out, S.EncodeOptions(bpw=target, scope="linear", calibration="none",
                                              candidates=("hadamard", "colscale")), progress=False)
    lossy_names = set(json.loads(archive.inspect(out)["metadata"]["acz.lossy"]))
    n_weights = sum(sd[n].numel() for n in lossy_names)
    with ArchiveReader(out) as r:
        lossy_bytes = sum(lossy.entry_bytes(e.name, 2, len(e.params), e.size) for e in r.tensors if e.name in lossy_names)
    assert lossy_bytes * 8 / n_weights == pytest.approx(summ["bpw_lossy_all_in"], rel=1e-12)  # the encoder's count is the archive's
    assert abs(summ["bpw_lossy_all_in"] / target - 1) <= 0.01
    # every byte of the file is accounted for: tensors' all-in bytes + fixed overhead
    with ArchiveReader(out) as r:
        per = sum(lossy.entry_bytes(e.name, len(e.shape), len(e.params), e.size) for e in r.tensors)
        meta = build_section(SECTION_METADATA, 0, json.dumps(r.metadata, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
        last = r.tensors[-1]
        slack = align(last.size, 64) - last.size  # the last tensor is not padded
        header_pad = r.header.data_offset - PREAMBLE_SIZE - r.header.header_size
        assert PREAMBLE_SIZE + len(meta) + header_pad + per - slack == r.file_size
        modes = {e.name: e.mode_name for e in r.tensors}
    assert modes["model.layers.0.self_attn.q_proj.weight"] == "ecsq"
    assert modes["model.embed_tokens.weight"] in ("stored", "float-split", "bytegroup")
    assert modes["model.layers.0.input_layernorm.weight"] in ("stored", "float-split", "bytegroup")
    # decompress: lossless tensors exact, lossy ones equal to the encoder's reconstruction
    outdir = tmp_path / "dec"
    archive.decompress(out, outdir, progress=False)
    from safetensors.torch import load_file

    dec = load_file(str(outdir / "model.safetensors"))
    assert torch.equal(dec["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    assert lossy_names == {n for n in sd if n.endswith("proj.weight")}
    for n in lossy_names:
        assert dec[n].dtype == sd[n].dtype
        assert np.array_equal(dec[n].to(torch.float32).numpy(), codes[n].W_hat)
    info = archive.inspect(out)
    row = next(r for r in info["tensors"] if r["name"] == "model.layers.0.mlp.down_proj.weight")
    assert row["transform"] in ("hadamard", "colscale") and row["act_rel_err"] > 0


def test_rate_decreases_with_step():
    job = _job(64, 96, 5)
    E.build_candidates(job, ("hadamard",))
    b = [E.code_candidate(job, job.cands[0], s).bytes_all_in for s in (0.005, 0.01, 0.02, 0.04)]
    assert b == sorted(b, reverse=True)
    # ~1 bit per weight per halving at high rate
    assert 0.7 < (b[0] - b[1]) * 8 / job.numel < 1.3


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_round_to_dtype_is_bit_equal_to_torch(dtype):
    """The decoder's numpy rounding (no torch) gives torch's bits for every non-NaN float32:
    random bit patterns over the whole range, values near the target's subnormals, overflow and ties."""
    rng = np.random.default_rng(1)
    u = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    near = (u & np.uint32(0x807FFFFF)) | (rng.integers(95, 145, size=u.size, dtype=np.uint64).astype(np.uint32) << np.uint32(23))
    ties = (rng.integers(0, 2**16, size=1000, dtype=np.uint64).astype(np.uint32) << np.uint32(16)) | np.uint32(0x8000)
    W = np.concatenate([u, near, ties]).view(np.float32)
    W = W[~np.isnan(W)]
    W = W[: W.size // 7 * 7].reshape(-1, 7)  # a matrix, as the decoder rounds it
    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    want = torch.from_numpy(W.copy()).to(tdt).contiguous().view(torch.uint8).numpy()
    got = lossy.round_to_dtype(W, dtype).view(np.uint8)
    assert np.array_equal(got.reshape(-1), want.reshape(-1))
    back = torch.from_numpy(W.copy()).to(tdt).to(torch.float32).numpy()
    assert np.array_equal(lossy.rounded_f32(W, dtype).view(np.uint32), back.view(np.uint32))


def _refine_plain(q, ids, axis, iters=20):
    """refine_classes' counts and class means as the whole-array expressions (the reference for
    the chunked version)."""
    X = q if axis == 0 else q.T
    ids = np.asarray(ids, dtype=np.int64).copy()
    k = int(ids.max()) + 1
    lo = int(X.min())
    A = int(X.max()) - lo + 1
    idx = (X.astype(np.int64) - lo) + (np.arange(X.shape[0], dtype=np.int64) * A)[:, None]
    cnt = np.bincount(idx.reshape(-1), minlength=X.shape[0] * A).reshape(X.shape[0], A).astype(np.float64)
    ids = lossy.lloyd_classes(cnt, ids, k, iters)  # (the rounds themselves: test_refined_classes_code_no_longer...)
    used = np.unique(ids)
    mean_abs = np.array([np.abs(X[ids == c].astype(np.float64)).mean() for c in used])
    rank = np.empty(len(used), dtype=np.int64)
    rank[np.argsort(mean_abs, kind="stable")] = np.arange(len(used))
    return rank[np.searchsorted(used, ids)].astype(np.uint8)


@pytest.mark.parametrize("elems", [1 << 20, 64, 7])
def test_refine_classes_in_row_chunks_is_the_whole_array_expression(monkeypatch, elems):
    """refine_classes counts a row chunk of q at a time (no int64 copy of a large tensor's
    symbols): the same class map as the whole-array expressions, for rows and columns."""
    monkeypatch.setattr(lossy, "_CLASS_ELEMS", elems)
    rng = np.random.default_rng(12)
    scale = np.exp(rng.normal(0, 0.9, (50, 1))) * np.exp(rng.normal(0, 0.5, (1, 33)))
    q = np.rint(rng.laplace(0, 1, (50, 33)) * scale).astype(np.int16)
    for axis in (0, 1):
        for k in (2, 4, 8):
            ids0 = lossy.make_classes(q, k, axis)
            assert np.array_equal(lossy.refine_classes(q, ids0, axis), _refine_plain(q, ids0, axis))


def test_refined_classes_code_no_longer_and_roundtrip():
    """lossy.refine_classes (Lloyd on the classes' tables) never lengthens the order-0 code of
    the start map, returns dense ids, and encode_symbols writes a given map that decodes exactly."""
    rng = np.random.default_rng(11)
    scale = np.exp(rng.normal(0, 0.8, 40))
    q = np.rint(rng.laplace(0, 1, (40, 30)) * scale[:, None]).astype(np.int32)

    def bits(ids, axis):
        X = q if axis == 0 else q.T
        tot = 0.0
        for c in np.unique(ids):
            _, cnt = np.unique(X[ids == c], return_counts=True)
            tot -= float((cnt * np.log2(cnt / cnt.sum())).sum())
        return tot

    for axis in (0, 1):
        ids0 = lossy.make_classes(q, 4, axis)
        ids = lossy.refine_classes(q, ids0, axis)
        k = int(ids.max()) + 1
        assert ids.dtype == np.uint8 and set(np.unique(ids)) == set(range(k))
        assert bits(ids, axis) <= bits(ids0, axis) + 1e-9
        params, streams = lossy.encode_symbols(q, lossy.EcsqParams(0, 0.5, 0), None, None, classes=(k, axis, ids))
        assert params.n_classes == k and params.class_axis == axis
        from aligncodec.formats.layout import TensorEntry

        e = TensorEntry("t", "F32", q.shape, params.mode, len(streams), 0, 0, 0, params.pack())
        assert np.array_equal(lossy.decode(e, streams).view(np.float32).reshape(q.shape), q.astype(np.float32) * np.float32(0.5))
    with pytest.raises(ValueError):
        lossy.encode_symbols(q, lossy.EcsqParams(0, 0.5, 0), None, None, classes=(3, 0, np.zeros(40, np.uint8)))


@pytest.mark.parametrize("classes", [(1, 0), (8, 0), (8, 1)])
def test_encode_symbols_of_a_large_tensor_holds_no_wide_copy(classes):
    """Coding the symbols of a large tensor (an embedding: hundreds of millions) allocates less
    than twice the int32 symbols in numpy temporaries: no int64 widening of the whole array, the
    classes split off one at a time (the 3B stand-in's embedding peaked at 5.0 GB before)."""
    import tracemalloc

    rng = np.random.default_rng(3)
    q = np.clip(np.rint(rng.laplace(scale=3.0, size=(16384, 1024))), -200, 200).astype(np.int32)  # 64 MB, > 8,192 rows
    base = lossy.EcsqParams(0, 0.5, 0)
    tracemalloc.start()
    try:
        params, streams = lossy.encode_symbols(q, base, None, None, classes=classes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * q.nbytes, (peak / q.nbytes, classes)
    from aligncodec.formats.layout import TensorEntry

    e = TensorEntry("t", "F32", q.shape, params.mode, len(streams), 0, 0, 0, params.pack())
    assert np.array_equal(lossy.decode(e, streams).view(np.float32).reshape(q.shape), q.astype(np.float32) * np.float32(0.5))
