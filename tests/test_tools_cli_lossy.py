"""`aligncodec compress --bpw` end to end through the CLI on a small synthetic checkpoint."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from aligncodec.tools.cli import main


@pytest.fixture
def ckpt(tmp_path):
    g = torch.Generator().manual_seed(7)
    sd = {
        "model.layers.0.self_attn.o_proj.weight": torch.randn(128, 128, generator=g) * 0.05,
        "model.layers.0.mlp.down_proj.weight": torch.randn(128, 256, generator=g) * 0.03,
        "model.norm.weight": torch.ones(128),
    }
    p = tmp_path / "model.safetensors"
    save_file(sd, str(p))
    return p, sd


@pytest.mark.parametrize("encoder", [["--encoder", "whole"], ["--bpw-scope", "linear"]], ids=["whole", "stream"])
def test_cli_lossy_compress_inspect_verify_decompress(tmp_path, ckpt, capsys, encoder):
    """Both encoders at the lossy-tensor rate (the stream encoder is the default: no --encoder)."""
    src, sd = ckpt
    out = tmp_path / "m.acz"
    assert main(["compress", str(src), "-o", str(out), "--bpw", "3", "--no-calibration", "-q", *encoder]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in info["tensors"]}
    lossy = [r for r in rows.values() if r["mode"] == "tcq"]  # the default quantiser (encoder.DEFAULT_QUANTIZER)
    assert len(lossy) == 2 and rows["model.norm.weight"]["mode"] not in ("ecsq", "tcq")
    summ = json.loads(info["metadata"]["acz.lossy.summary"])
    assert abs(summ["bpw_lossy_all_in"] / 3 - 1) <= 0.01
    assert all(r["act_rel_err"] > 0 and r["transform"] for r in lossy)
    assert main(["verify", str(out), "-q"]) == 0
    assert main(["decompress", str(out), "-o", str(tmp_path / "d"), "-q"]) == 0
    dec = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert torch.equal(dec["model.norm.weight"], sd["model.norm.weight"])
    W, Wh = sd["model.layers.0.mlp.down_proj.weight"], dec["model.layers.0.mlp.down_proj.weight"]
    sqnr = 10 * np.log10(float((W**2).sum() / ((W - Wh) ** 2).sum()))
    assert 10 < sqnr < 30  # ~3 bits per weight of a Gaussian: ≈ 18 dB


def test_cli_default_bpw_counts_the_whole_file(tmp_path, ckpt, capsys):
    """`compress --bpw B` (no --encoder, no --bpw-scope): file bytes x 8 / every parameter lands
    within 1 % of B, auxiliary bytes, lossless norm and metadata included; the lossy tensors
    therefore get less than B each, and inspect reports both figures."""
    src, sd = ckpt
    out = tmp_path / "m.acz"
    assert main(["compress", str(src), "-o", str(out), "--bpw", "3", "--no-calibration", "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    n_params = sum(v.numel() for v in sd.values())
    assert info["bpw_file"] == pytest.approx(8 * out.stat().st_size / n_params)
    assert abs(info["bpw_file"] / 3 - 1) <= 0.01
    summ = json.loads(info["metadata"]["acz.lossy.summary"])
    assert summ["encoder"] == "stream" and summ["target"]["scope"] == "all"
    assert 0 < info["bpw_linear"] < 3
    assert main(["verify", str(out), "-q"]) == 0


def test_cli_whole_only_flags_pick_the_whole_encoder(tmp_path, ckpt, capsys):
    """--distortion (and --tune-norms) without --encoder: the whole-model encoder, said in one
    stderr line; with --bpw-scope all or a stream-only flag, a usage error; a stream-only flag
    with --encoder whole is a usage error too. Nothing is written on an error."""
    src, _ = ckpt
    out = tmp_path / "m.acz"
    assert main(["compress", str(src), "-o", str(out), "--distortion", "0.01", "--no-calibration"]) == 0
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("note:") and "--encoder whole" in ln and "--distortion" in ln]
    summ = json.loads(archive_summary(out))
    assert "encoder" not in summ and summ["target"] == {"distortion": 0.01}  # the whole encoder's summary
    out.unlink()
    for extra in (["--bpw", "3", "--tune-norms", "--bpw-scope", "all"], ["--distortion", "0.01", "--workers", "2"],
                  ["--bpw", "3", "--encoder", "whole", "--resume"], ["--bpw", "3", "--encoder", "whole", "--calib-tokens", "64"],
                  ["--distortion", "0.01", "--encoder", "stream"]):
        assert main(["compress", str(src), "-o", str(out), "--no-calibration", "-q", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert "encoder" in err and "Traceback" not in err, extra
        assert not out.exists()


def archive_summary(path):
    from aligncodec import archive

    return archive.inspect(path)["metadata"]["acz.lossy.summary"]


def test_cli_lossy_needs_exactly_one_target(tmp_path, ckpt):
    src, _ = ckpt
    out = tmp_path / "m.acz"
    assert main(["compress", str(src), "-o", str(out), "-q"]) == 2
    assert main(["compress", str(src), "-o", str(out), "--lossless", "--bpw", "3", "-q"]) == 2
    assert main(["compress", str(src), "-o", str(out), "--bpw", "3", "--distortion", "0.01", "-q"]) == 2
    assert main(["compress", str(src), "-o", str(out), "--bpw", "-1", "--no-calibration", "-q"]) == 2


def test_calibration_failure_is_an_error_not_weight_mse(tmp_path, ckpt, capsys):
    """A checkpoint that cannot be calibrated (no model config) is refused with the dependency exit code;
    Σ = I is used only when --no-calibration asks for it."""
    src, _ = ckpt
    out = tmp_path / "m.acz"
    assert main(["compress", str(src), "-o", str(out), "--bpw", "3", "--encoder", "whole", "-q"]) == 7
    err = capsys.readouterr().err
    assert "no calibration Σ" in err and "--no-calibration" in err
    assert not out.exists()
    # the block-sequential encoder (the default) cannot build a model without its config either
    for encoder in ([], ["--encoder", "stream"]):
        assert main(["compress", str(src), "-o", str(out), "--bpw", "3", "-q", *encoder]) == 6
        err = capsys.readouterr().err
        assert "config.json" in err and "--no-calibration" in err
        assert not out.exists()
