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
    src, sd = ckpt
    out = tmp_path / "m.acz"
    assert main(["compress", str(src), "-o", str(out), "--bpw", "3", "--no-calibration", "-q"]) == 0
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
    assert main(["compress", str(src), "-o", str(out), "--bpw", "3", "-q"]) == 7
    err = capsys.readouterr().err
    assert "no calibration Σ" in err and "--no-calibration" in err
    assert not out.exists()
    # the block-sequential encoder cannot build a model without its config either
    assert main(["compress", str(src), "-o", str(out), "--bpw", "3", "--encoder", "stream", "-q"]) == 6
    err = capsys.readouterr().err
    assert "config.json" in err and "--no-calibration" in err
    assert not out.exists()
