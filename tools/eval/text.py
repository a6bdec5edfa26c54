"""Evaluation and calibration text: the English Wikipedia excerpt in the gensim wheel.

Source: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
inside the gensim 4.4.0 wheel, fetched with ``pip download --no-deps gensim==4.4.0`` into
``$ALIGNCODEC_HOME/downloads`` (gensim is never installed).  Licence: CC BY-SA (Wikipedia).

Extraction (deterministic, see ``extract_articles``):
  1. every ``<page>`` in namespace 0 that is not a redirect, in file order;
  2. wiki markup removed with mwparserfromhell: ``<ref>``, tables, galleries and comments
     dropped, File:/Image:/Category:/interlanguage links dropped, templates dropped,
     other links and formatting reduced to their text (``strip_code``);
  3. lines stripped of surrounding whitespace, runs of blank lines collapsed to one, article = title, blank
     line, body; articles joined by one blank line.
Split by article: the first ``n // 2`` articles are the calibration half, the rest
the evaluation half.  Each half is cached as UTF-8 text in ``$ALIGNCODEC_HOME/text/`` and
its sha256 is checked against the constants below on every load; a mismatch raises
``TextChecksumError`` (a different parser version can change the text: then the
numbers are no longer comparable, which is exactly what the check is for).
"""

from __future__ import annotations

import bz2
import glob
import hashlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from aligncodec.formats.atomic import atomic_write

GENSIM_REQ = "gensim==4.4.0"
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MEMBER_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
TEXT_VERSION = "enwiki-gensim-4.4.0-v2"

# sha256 of the UTF-8 bytes of each half (computed once with mwparserfromhell 0.7.2).
EXPECTED_SHA256 = {
    "calib": "562853189daa9273d9211676200e4500635f2990fef004c4998dfa8d35fa54ce",
    "eval": "55622584ab75377d882d6a37449af974937208149fbcfc7a19a1f9c66d238553",
}

SPLITS = ("calib", "eval")
DEFAULT_CALIB_TOKENS = 16384  # calibration tokens of the whole-model Σ capture (`aligncodec calibrate`, its cache)
# the stream encoder's (--calib-tokens): SmolLM2 linear scope 3.0 bpw, held-out calibration KL and
# evaluation KLD both lower with 32,768 than with 16,384 (docs/results/2026-12-07-allocation.md)
STREAM_CALIB_TOKENS = 32768

_DROP_TAGS = {"ref", "table", "gallery", "references", "timeline", "imagemap"}
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?)\s*:", re.IGNORECASE)


class TextError(Exception):
    """The evaluation text cannot be obtained."""


class TextChecksumError(TextError):
    """A text half does not have its recorded sha256."""


def text_dir() -> Path:
    from aligncodec.tools.eval.models import cache_root

    return cache_root() / "text" / TEXT_VERSION


def _split_path(split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return text_dir() / f"{split}.txt"


def _wheel() -> Path:
    from aligncodec.tools.eval.models import cache_root

    dl = cache_root() / "downloads"
    found = sorted(glob.glob(str(dl / "gensim-4.4.0-*.whl")))
    if found:
        return Path(found[0])
    dl.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", GENSIM_REQ, "-d", str(dl)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(str(dl / "gensim-4.4.0-*.whl")))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
        raise TextError(f"cannot download {GENSIM_REQ} (pip exit {proc.returncode}): {' | '.join(tail)}")
    return Path(found[0])


def read_dump() -> bytes:
    """The decompressed XML excerpt, with the compressed member's sha256 checked."""
    with zipfile.ZipFile(_wheel()) as z:
        data = z.read(MEMBER)
    got = hashlib.sha256(data).hexdigest()
    if got != MEMBER_SHA256:
        raise TextChecksumError(f"{MEMBER} has sha256 {got}, expected {MEMBER_SHA256}")
    return bz2.decompress(data)


def clean_wikitext(wikitext: str) -> str:
    """Plain text of one article's wikitext (see module docstring)."""
    import mwparserfromhell as mw

    code = mw.parse(wikitext)
    for tag in code.filter_tags(recursive=True):
        if str(tag.tag).strip().lower() in _DROP_TAGS:
            try:
                code.remove(tag)
            except ValueError:  # inside something already removed
                pass
    for link in code.filter_wikilinks(recursive=True):
        if _DROP_LINK.match(str(link.title)):
            try:
                code.remove(link)
            except ValueError:
                pass
    text = code.strip_code(normalize=True, collapse=True, keep_template_params=False)
    lines = [ln.strip() for ln in text.splitlines()]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def extract_articles(xml: bytes) -> list[tuple[str, str]]:
    """``[(title, plain text)]`` of every non-redirect main-namespace article, in file order."""
    root = ET.fromstring(xml)
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    out = []
    for page in root.findall(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        title = page.findtext(f"{ns}title") or ""
        body = clean_wikitext(page.findtext(f"{ns}revision/{ns}text") or "")
        if body:
            out.append((title, body))
    return out


def build_splits() -> dict[str, str]:
    arts = extract_articles(read_dump())
    half = len(arts) // 2
    join = lambda part: "\n\n".join(f"{t}\n\n{b}" for t, b in part) + "\n"  # noqa: E731
    return {"calib": join(arts[:half]), "eval": join(arts[half:])}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check(split: str, text: str, expected: dict | None = None) -> None:
    want = (expected or EXPECTED_SHA256).get(split)
    got = sha256_text(text)
    if want is not None and got != want:
        raise TextChecksumError(
            f"{split} text has sha256 {got[:16]}…, expected {want[:16]}… "
            f"(corrupt cache {_split_path(split)}? a different mwparserfromhell version?)"
        )


def get_text(split: str = "eval") -> str:
    """The calibration (``"calib"``) or evaluation (``"eval"``) half, checksum-verified."""
    path = _split_path(split)
    if not path.is_file():
        halves = build_splits()
        for name, text in halves.items():
            _check(name, text)
        path.parent.mkdir(parents=True, exist_ok=True)
        for name, text in halves.items():
            atomic_write(_split_path(name), lambda tmp, data=text.encode("utf-8"): tmp.write_bytes(data))
    text = path.read_bytes().decode("utf-8")
    _check(split, text)
    return text


def text_sha256(split: str) -> str:
    """The recorded checksum of a split (after verifying the cached text)."""
    return EXPECTED_SHA256[split] or sha256_text(get_text(split))
