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


def test_cli_lossy_compress_inspect_verify_decompress(tmp_path, ckpt, capsys):
    """At the lossy-tensor rate (--bpw-scope linear)."""
    src, sd = ckpt
    out = tmp_path / "m.acz"
    assert main(["compress", str(src), "-o", str(out), "--bpw", "3", "--no-calibration", "-q", "--bpw-scope", "linear"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in info["tensors"]}
    lossy = [r for r in rows.values() if r["mode"] == "tcq"]  # the default quantiser (codec/quant/registry.py DEFAULT)
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


def test_cli_distortion_target_through_the_one_encoder(tmp_path, ckpt, capsys):
    """--distortion D: the one encoder meets the mean activation-weighted relative error (here Σ = I:
    the weight domain) that the archive records, which the decoded weights confirm; a lower D
    costs more bits. With --bpw-scope it is a usage error (the scope is what --bpw counts)."""
    src, sd = ckpt
    got = {}
    for d in (0.02, 0.005):
        out = tmp_path / f"m{d}.acz"
        assert main(["compress", str(src), "-o", str(out), "--distortion", str(d), "--no-calibration", "-q"]) == 0
        summ = json.loads(archive_summary(out))
        assert summ["encoder"] == "stream" and summ["target"] == {"distortion": d}
        assert abs(summ["mean_act_rel_err"] / d - 1) <= 0.1, summ["mean_act_rel_err"]
        assert main(["decompress", str(out), "-o", str(tmp_path / f"d{d}"), "-q"]) == 0
        dec = load_file(str(tmp_path / f"d{d}" / "model.safetensors"))
        lossy = [n for n in sd if n.endswith("proj.weight")]
        rel = np.mean([float(((dec[n] - sd[n]) ** 2).sum() / (sd[n] ** 2).sum()) for n in lossy])
        assert rel == pytest.approx(summ["mean_act_rel_err"], rel=1e-3)
        got[d] = summ["bpw_lossy_all_in"]
    assert got[0.005] > got[0.02] + 0.5  # 4x less error: about one bit per weight more
    out = tmp_path / "x.acz"
    assert main(["compress", str(src), "-o", str(out), "--distortion", "0.01", "--bpw-scope", "all", "-q"]) == 2
    assert "scope" in capsys.readouterr().err and not out.exists()


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
    # the encoder cannot build a model without its config (--encoder stream: the old name, accepted)
    for encoder in ([], ["--encoder", "stream"]):
        assert main(["compress", str(src), "-o", str(out), "--bpw", "3", "-q", *encoder]) == 6
        err = capsys.readouterr().err
        assert "config.json" in err and "--no-calibration" in err
        assert not out.exists()
