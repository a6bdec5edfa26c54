"""Command line: every sub-command end to end, one-line errors with distinct exit codes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from aligncodec.tools.cli import main

VEC = Path(__file__).resolve().parent.parent / "spec" / "vectors"


@pytest.fixture
def ckpt(tmp_path):
    g = torch.Generator().manual_seed(0)
    p = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(128, 64, generator=g).to(torch.bfloat16), "n": torch.ones(64)}, p)
    return p


def test_compress_inspect_verify_decompress(tmp_path, ckpt, capsys):
    out = tmp_path / "m.acz"
    assert main(["compress", str(ckpt), "-o", str(out), "--lossless", "-q"]) == 0
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in info["tensors"]} == {"w", "n"}
    assert main(["verify", str(out), "-q"]) == 0
    assert main(["decompress", str(out), "-o", str(tmp_path / "d"), "-q"]) == 0
    assert (tmp_path / "d" / "m.safetensors").read_bytes() == ckpt.read_bytes()
    # refuses to overwrite without --force
    assert main(["compress", str(ckpt), "-o", str(out), "--lossless", "-q"]) == 3
    assert main(["compress", str(ckpt), "-o", str(out), "--lossless", "-q", "--force"]) == 0


@pytest.mark.parametrize(
    "vector,code",
    [("bad_magic", 4), ("data_crc", 5), ("unsupported_version", 6), ("rans_state_corrupt", 4), ("huge_shape", 4)],
)
def test_exit_codes(vector, code, capsys):
    assert main(["verify", "-q", str(VEC / "invalid" / f"{vector}.acz")]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aligncodec: error:")


def test_missing_input(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none.acz")]) == 3
    assert main(["compress", str(tmp_path / "none"), "-o", str(tmp_path / "x.acz"), "--lossless"]) == 3


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("compress", "decompress", "inspect", "verify"):
        assert cmd in out
