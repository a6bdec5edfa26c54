"""``--tune-norms`` (aligncodec/encode/tune.py) on a tiny random Llama: the tuned archive decodes
with the very same lossy tensors as the untuned one, different norm gains, and a lower KL to
the unmodified model on the calibration text, measured by the evaluation harness."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from aligncodec import encode as S  # noqa: E402
from aligncodec.encode import tune as TN  # noqa: E402
from aligncodec.loader import load_hf_model, load_state_dict  # noqa: E402
from aligncodec.tools.cli import EXIT_USAGE, main  # noqa: E402

from tiny_arch import ToyTokenizer, make_checkpoint  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
        "Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump! ") * 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tn")
    src = make_checkpoint(root / "model", "llama", tied=True, dtype=torch.float32, seed=3)
    text = root / "calib.txt"
    text.write_text(TEXT)
    return src, text


def _compress(src, out, bpw, tune=None):
    """The lossy tensors of the block linears at ``bpw`` (embeddings lossless), weight MSE."""
    opts = S.EncodeOptions(bpw=bpw, scope="linear", calibration="none", tune=tune)
    return S.encode(src, out, opts, progress=False, tokenizer=ToyTokenizer())


def _kl_on_calib(acz, src, text, window=256, n_tokens=1024):
    from transformers import AutoModelForCausalLM

    from aligncodec.tools.eval.evaluate import evaluate

    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    model = load_hf_model(acz)
    ev = evaluate(model, ToyTokenizer(), n_tokens=n_tokens, ref_model=ref, split="calib", window=window,
                  threads=1, progress=False, text=text.read_text())
    return ev["kld_mean"]


def test_tuned_archive_keeps_lossy_tensors_and_lowers_calibration_kl(tmp_path, tiny):
    src, text = tiny
    opts = TN.TuneOptions(steps=24, tokens=1024, window=256, lr=2e-2, calib_text=str(text), threads=1)
    plain, tuned = tmp_path / "plain.acz", tmp_path / "tuned.acz"
    _compress(src, plain, 2.5)
    summ = _compress(src, tuned, 2.5, opts)
    info = summ["tune_norms"]
    assert info["kept"] and info["kl_calib_after"] < info["kl_calib_before"] and info["steps"] == 24
    a, b = load_state_dict(plain), load_state_dict(tuned)
    assert a.keys() == b.keys()
    lossy_names = set(json.loads(__import__("aligncodec").archive.inspect(tuned)["metadata"]["acz.lossy"]))
    assert lossy_names and all(a[n].ndim == 2 for n in lossy_names)
    for n in lossy_names:  # the lossy tensors decode bit-identically
        assert torch.equal(a[n], b[n]), n
    free = [n for n in a if a[n].ndim == 1]
    assert free and all("norm" in n for n in free)
    assert any(not torch.equal(a[n], b[n]) for n in free)  # the tuned gains are what the archive stores
    for n in a:  # nothing else changed (embeddings, every other lossless tensor)
        if n not in lossy_names and n not in free:
            assert torch.equal(a[n], b[n]), n
    # an independent measurement (the evaluation harness, exact KL) agrees that tuning helped
    kl_plain = _kl_on_calib(plain, src, text)
    kl_tuned = _kl_on_calib(tuned, src, text)
    assert kl_tuned < kl_plain
    assert kl_plain == pytest.approx(info["kl_calib_before"], rel=0.05)  # 1024 tokens, 256-position windows in both


def test_not_kept_when_it_does_not_help(tmp_path, tiny, monkeypatch):
    """With zero steps the values are unchanged, so the KL does not fall: the originals are kept."""
    src, text = tiny
    opts = TN.TuneOptions(steps=0, tokens=512, window=256, calib_text=str(text), threads=1)
    out = tmp_path / "t.acz"
    summ = _compress(src, out, 3.0, opts)
    assert summ["tune_norms"]["kept"] is False and summ["tune_norms"]["steps"] == 0
    plain = load_state_dict(out)
    from safetensors.torch import load_file

    orig = load_file(str(src / "model.safetensors"))
    for n, t in plain.items():
        if t.ndim == 1:
            assert torch.equal(t, orig[n])


def test_options_are_checked():
    for bad in (dict(steps=-1), dict(tokens=0), dict(window=1), dict(lr=0.0), dict(lr=float("nan")), dict(minutes=0.0),
                dict(val_tokens=-1), dict(val_tokens=1.5)):
        with pytest.raises(ValueError):
            TN.TuneOptions(**bad)


def test_cli_flag_errors(tmp_path, tiny, capsys):
    src, _ = tiny
    out = tmp_path / "x.acz"
    assert main(["compress", str(src), "-o", str(out), "--lossless", "--tune-norms", "-q"]) == EXIT_USAGE
    assert main(["compress", str(src), "-o", str(out), "--bpw", "3", "--tune-steps", "4", "-q"]) == EXIT_USAGE
    assert main(["compress", str(src), "-o", str(out), "--bpw", "3", "--tune-norms", "--tune-steps", "-2", "-q",
                 "--no-calibration"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--tune-norms" in err
    assert not out.exists()


def test_cli_no_tokenizer_is_named(tmp_path, tiny, capsys):
    """The tiny folder has no tokenizer: the CLI names the problem (exit 7) before any coding, writes nothing."""
    src, text = tiny
    out = tmp_path / "x.acz"
    rc = main(["compress", str(src), "-o", str(out), "--bpw", "3", "--no-calibration", "--tune-norms", "--tune-steps", "1",
               "--tune-tokens", "256", "--calib-text", str(text), "-q"])
    err = capsys.readouterr().err
    assert rc == 7 and "tokenizer" in err and "Traceback" not in err
    assert not out.exists()


def test_held_out_check_stops_a_diverging_run_early(tmp_path, tiny):
    """A step size that makes the optimiser diverge: the held-out checks pick an earlier state
    than the last step, and what is stored never has a higher held-out KL than the original."""
    src, text = tiny
    opts = TN.TuneOptions(steps=12, tokens=512, window=256, lr=30.0, val_tokens=512, calib_text=str(text), threads=1)
    out = tmp_path / "t.acz"
    summ = _compress(src, out, 3.0, opts)
    info = summ["tune_norms"]
    assert info["val_tokens"] == 512 and info["steps"] == 12
    assert info["best_step"] < 12, info
    assert info["kept"] == (info["kl_val_after"] < info["kl_val_before"])
    if not info["kept"]:
        from safetensors.torch import load_file

        orig = load_file(str(src / "model.safetensors"))
        for n, t in load_state_dict(out).items():
            if t.ndim == 1:
                assert torch.equal(t, orig[n])


def test_too_little_calibration_text_for_the_hold_out_is_named(tmp_path, tiny):
    src, _ = tiny
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:1200])
    opts = TN.TuneOptions(steps=1, tokens=512, window=256, val_tokens=4096, calib_text=str(short), threads=1)
    with pytest.raises(TN.TuneError, match="val_tokens"):
        _compress(src, tmp_path / "t.acz", 3.0, opts)
    assert not (tmp_path / "t.acz").exists()
