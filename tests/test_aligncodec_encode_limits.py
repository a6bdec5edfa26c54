"""The lossy encoder on inputs and targets lossy coding cannot serve (issue 15): NaN / Inf
weights, --bpw 48 / 100 / inf / nan / 0, all-zero and constant-3e38 tensors, clamped steps,
and the post-write check of the archive. Small synthetic checkpoints, through the CLI.

Every --bpw case runs at ``--bpw-scope linear`` (the ``enc`` fixture; on checkpoints this
small the file's fixed overhead, a few KB, would take most of a whole-file budget)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from aligncodec.codec import encoder
from aligncodec.tools.cli import main

LOSSY = ("ecsq", "tcq")  # the lossy modes (the CLI's default quantiser codes tcq)
O_PROJ = "model.layers.0.self_attn.o_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


def _ckpt(tmp_path, edit=None, name="model.safetensors"):
    g = torch.Generator().manual_seed(7)
    sd = {O_PROJ: torch.randn(64, 64, generator=g) * 0.05,
          DOWN: torch.randn(64, 128, generator=g) * 0.03,
          "model.norm.weight": torch.ones(64)}
    if edit:
        edit(sd)
    p = tmp_path / name
    save_file(sd, str(p))
    return p, sd


ENCODERS = {"linear": ["--bpw-scope", "linear"]}


@pytest.fixture(params=sorted(ENCODERS))
def enc(request):
    return request.param


def _compress(src, out, *extra, enc=None):
    return main(["compress", str(src), "-o", str(out), "--no-calibration", "-q", *ENCODERS.get(enc, []), *extra])


def _no_leftovers(tmp_path, out):
    """Nothing under the final name, no temporary archive, no spool of the stream encoder."""
    assert not out.exists() and not list(tmp_path.glob(".acz-tmp-*")) and not list(tmp_path.glob(".acz-spool-*"))


def _modes(out, capsys):
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    return {r["name"]: r["mode"] for r in info["tensors"]}, info


def _decoded(tmp_path, out):
    d = tmp_path / "dec"
    assert main(["decompress", str(out), "-o", str(d), "-q"]) == 0
    return load_file(str(d / "model.safetensors"))


def _poison(value, count=1):
    def edit(sd):
        sd[DOWN].view(-1)[:count] = value
    return edit


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_is_a_named_error_before_any_work(tmp_path, capsys, monkeypatch, value, enc):
    from aligncodec.encode import calibration, spool

    src, _ = _ckpt(tmp_path, _poison(value, 3))
    called = []
    monkeypatch.setattr(encoder, "build_candidates", lambda *a, **k: called.append(1))
    monkeypatch.setattr(calibration, "calibration_windows", lambda *a, **k: called.append(3))
    out = tmp_path / "m.acz"
    assert _compress(src, out, "--bpw", "3", enc=enc) == 3
    err = capsys.readouterr().err
    assert "NonFiniteError" in err and DOWN in err and "3 NaN/Inf" in err and "Traceback" not in err
    assert not called  # no calibration, no encoding
    _no_leftovers(tmp_path, out)
    assert not spool.spool_dir(out).exists()  # not even a resume spool


def test_nonfinite_lossless_flag(tmp_path, capsys, enc):
    src, sd = _ckpt(tmp_path, _poison(float("nan"), 2))
    out = tmp_path / "m.acz"
    assert _compress(src, out, "--bpw", "3", "--nonfinite", "lossless", enc=enc) == 0
    modes, info = _modes(out, capsys)
    assert modes[DOWN] not in LOSSY and modes[O_PROJ] in LOSSY
    summ = json.loads(info["metadata"]["acz.lossy.summary"])
    assert "NaN" in summ["lossless"][DOWN]
    dec = _decoded(tmp_path, out)
    assert torch.equal(dec[DOWN].view(torch.int32), sd[DOWN].view(torch.int32))  # NaN bits kept
    W, Wh = sd[O_PROJ], dec[O_PROJ]
    assert float(((W - Wh) ** 2).sum() / (W**2).sum()) < 0.05  # the clean tensor is coded normally (~3 bpw)


@pytest.mark.parametrize("bpw", ["48", "100"])
def test_rate_beyond_lossy_goes_lossless(tmp_path, capsys, bpw, enc):
    src, sd = _ckpt(tmp_path)
    out = tmp_path / "m.acz"
    assert _compress(src, out, "--bpw", bpw, enc=enc) == 0
    modes, info = _modes(out, capsys)
    assert all(m not in LOSSY for m in modes.values())
    summ = json.loads(info["metadata"]["acz.lossy.summary"])
    assert set(summ["lossless"]) == {O_PROJ, DOWN}
    dec = _decoded(tmp_path, out)
    for k, v in sd.items():
        assert torch.equal(dec[k], v)  # never zero weights: exact
    assert main(["verify", str(out), "-q"]) == 0


@pytest.mark.parametrize("bpw", ["inf", "nan", "0", "-1"])
def test_invalid_targets_are_named_errors(tmp_path, capsys, bpw, enc):
    src, _ = _ckpt(tmp_path)
    out = tmp_path / "m.acz"
    assert _compress(src, out, f"--bpw={bpw}", enc=enc) == 2
    err = capsys.readouterr().err
    assert "TargetError" in err and "math domain" not in err
    assert not out.exists()


def test_invalid_distortion_is_named(tmp_path, capsys):
    src, _ = _ckpt(tmp_path)
    assert _compress(src, tmp_path / "m.acz", "--distortion=nan") == 2
    assert "TargetError" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["zero", "const3e38", "all_zero"])
def test_degenerate_tensors_go_lossless(tmp_path, capsys, case, enc):
    def edit(sd):
        if case == "zero":
            sd[DOWN].zero_()
        elif case == "const3e38":
            sd[DOWN].fill_(3e38)
        else:
            sd[DOWN].zero_()
            sd[O_PROJ].zero_()
    src, sd = _ckpt(tmp_path, edit)
    out = tmp_path / "m.acz"
    assert _compress(src, out, "--bpw", "3", enc=enc) == 0
    modes, info = _modes(out, capsys)
    assert modes[DOWN] not in LOSSY
    assert (modes[O_PROJ] in LOSSY) == (case != "all_zero")
    assert DOWN in json.loads(info["metadata"]["acz.lossy.summary"])["lossless"]
    dec = _decoded(tmp_path, out)
    assert torch.equal(dec[DOWN], sd[DOWN])
    assert main(["verify", str(out), "-q"]) == 0


def test_clamped_symbols_go_lossless(tmp_path, capsys):
    """A tiny distortion target on a tensor with a large outlier needs symbols beyond ±32767
    (ecsq) or ±16383 (tcq):
    that tensor must go lossless, never be written with its outlier clamped."""
    def edit(sd):
        sd[DOWN][0, 0] = 2000.0  # ~70,000 × the rms
    src, sd = _ckpt(tmp_path, edit)
    out = tmp_path / "m.acz"
    assert _compress(src, out, "--distortion", "1e-9", "--candidates", "identity") == 0
    modes, info = _modes(out, capsys)
    dec = _decoded(tmp_path, out)
    summ = json.loads(info["metadata"]["acz.lossy.summary"])
    assert modes[DOWN] not in LOSSY and "symbols beyond" in summ["lossless"][DOWN]
    assert torch.equal(dec[DOWN], sd[DOWN])
    for k in (O_PROJ,):  # every tensor written lossy decodes close to its original
        W, Wh = sd[k], dec[k]
        assert float(((W - Wh) ** 2).sum() / (W**2).sum()) < 1e-4


def test_clamped_symbols_at_a_high_rate_go_lossless(tmp_path, capsys, enc):
    """--bpw 15 (below the lossy limit) on a tensor with a ~70,000 x rms outlier: the step the
    rate asks for needs symbols beyond the quantiser's range for that tensor, which must go
    lossless (exact) instead of being written with its outlier clamped; the other stays lossy."""
    def edit(sd):
        sd[DOWN][0, 0] = 2000.0
    src, sd = _ckpt(tmp_path, edit)
    out = tmp_path / "m.acz"
    assert _compress(src, out, "--bpw", "15", "--candidates", "identity", enc=enc) == 0
    modes, info = _modes(out, capsys)
    summ = json.loads(info["metadata"]["acz.lossy.summary"])
    assert modes[DOWN] not in LOSSY and "symbols beyond" in summ["lossless"][DOWN]
    assert modes[O_PROJ] in LOSSY
    dec = _decoded(tmp_path, out)
    assert torch.equal(dec[DOWN], sd[DOWN])
    W, Wh = sd[O_PROJ], dec[O_PROJ]
    assert float(((W - Wh) ** 2).sum() / (W**2).sum()) < 1e-6  # ~15 bits per weight
    assert main(["verify", str(out), "-q"]) == 0


def test_unfit_reason_underflowing_step():
    job = encoder.TensorJob("w", torch.randn(32, 32), "F32", None)
    encoder.build_candidates(job, ("identity",))
    code = encoder.code_candidate(job, job.cands[0], 1e-3)
    assert encoder.unfit_reason(code, job) is None
    code.params.step = 1e-46  # float32 of it is 0
    assert "underflows" in encoder.unfit_reason(code, job)


def test_post_write_check_rejects_a_mismatch(tmp_path, capsys, monkeypatch, enc):
    """Each tensor is decoded right after coding it and its error compared with what the encoder measured; a mismatch is
    EncodeVerifyError (exit 8) and no output is kept."""
    src, _ = _ckpt(tmp_path)
    real = encoder.code_candidate

    def lying(*a, **k):
        c = real(*a, **k)
        c.noise *= 1.5  # the encoder "measured" something else than what it wrote
        return c

    monkeypatch.setattr(encoder, "code_candidate", lying)
    out = tmp_path / "m.acz"
    assert _compress(src, out, "--bpw", "3", enc=enc) == 8
    err = capsys.readouterr().err
    assert "EncodeVerifyError" in err
    _no_leftovers(tmp_path, out)

