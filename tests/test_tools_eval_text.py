"""Evaluation text: markup stripping and the checksum check."""

import pytest

from aligncodec.tools.eval import text as T


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNCODEC_HOME", str(tmp_path))
    return tmp_path


def test_clean_wikitext_drops_markup():
    src = (
        "'''Albedo''' is a [[measure|measurement]] of [[reflection]].<ref>Some book, p. 3</ref>\n"
        "[[File:Albedo.png|thumb|A picture]]\n{{Infobox|x=1}}\n"
        "== History ==\nIt was named in 1760.<!-- comment -->\n\n\n\n"
        '{| class="wikitable"\n| a || b\n|}\n[[Category:Optics]]\n[[de:Albedo]]\n'
    )
    got = T.clean_wikitext(src)
    assert got == "Albedo is a measurement of reflection.\n\nHistory\nIt was named in 1760."


def test_checksum_mismatch_is_detected(home):
    d = T.text_dir()
    d.mkdir(parents=True)
    (d / "eval.txt").write_text("not the evaluation text\n")
    with pytest.raises(T.TextChecksumError, match="eval text has sha256"):
        T.get_text("eval")


def test_checksum_check_accepts_matching_text(home, monkeypatch):
    d = T.text_dir()
    d.mkdir(parents=True)
    (d / "calib.txt").write_text("hello\n")
    monkeypatch.setitem(T.EXPECTED_SHA256, "calib", T.sha256_text("hello\n"))
    assert T.get_text("calib") == "hello\n"


def test_bad_split_name(home):
    with pytest.raises(ValueError, match="split"):
        T.get_text("test")


@pytest.mark.model
def test_extraction_reproduces_recorded_checksums(tmp_path, monkeypatch):
    """Re-extract from the wheel (pip download, or the cached wheel) and check both halves."""
    import shutil

    from aligncodec.tools.eval.models import cache_root

    wheels = sorted((cache_root() / "downloads").glob("gensim-4.4.0-*.whl"))
    monkeypatch.setenv("ALIGNCODEC_HOME", str(tmp_path))
    if wheels:
        (tmp_path / "downloads").mkdir()
        shutil.copy(wheels[0], tmp_path / "downloads")
    halves = T.build_splits()
    for split, text in halves.items():
        assert T.sha256_text(text) == T.EXPECTED_SHA256[split]
    assert "Anarchism" in halves["calib"][:200] and len(halves["eval"]) > 10**6
