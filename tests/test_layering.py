"""The layering the README promises, checked on the source and in fresh interpreters.

formats/ (bytes) imports neither torch nor codec/ nor tools/; codec/ imports nothing from
tools/ nor the public-API modules aligncodec.archive / aligncodec.loader; and the
``inspect`` / ``verify`` commands start without torch or the encoder."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VALID = ROOT / "spec" / "vectors" / "valid" / "one_chunk.acz"
LOSSY = ROOT / "spec" / "vectors" / "lossy" / "lossy_hadamard_colscale_classes.acz"


def _imports(folder: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import statement under a repository folder, lazy ones included."""
    out = []
    for f in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                out += [(f.relative_to(ROOT).as_posix(), a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out += [(f.relative_to(ROOT).as_posix(), node.module)]
                out += [(f.relative_to(ROOT).as_posix(), f"{node.module}.{a.name}") for a in node.names]
    return out


def _offending(folder: str, banned: tuple[str, ...]) -> list[tuple[str, str]]:
    assert _imports(folder), f"no imports found under {folder}/"
    return [(f, m) for f, m in _imports(folder) if any(m == b or m.startswith(b + ".") for b in banned)]


def test_formats_imports_no_torch_codec_or_tools():
    assert _offending("formats", ("torch", "numba", "aligncodec.codec", "aligncodec.tools", "aligncodec.archive",
                                  "aligncodec.loader", "aligncodec.auxfiles", "aligncodec.encode")) == []


def test_codec_imports_no_tools_nor_public_api():
    assert _offending("codec", ("aligncodec.tools", "aligncodec.archive", "aligncodec.loader", "aligncodec.auxfiles",
                                "aligncodec.encode")) == []


def test_public_api_modules_import_no_circle():
    """No two modules of the aligncodec/ folder import each other, lazily or not (auxfiles.py holds the
    auxiliary-file rules that validation.py checks; the readers of auxiliary files live in archive.py)."""
    edges = {(Path(f).stem, m.split(".")[1]) for f, m in _imports("aligncodec")
             if f.count("/") == 1 and m.startswith("aligncodec.") and m.count(".") >= 1}
    assert ("auxfiles", "validation") not in edges  # the circle issue 23 names
    assert sorted((a, b) for a, b in edges if a != b and (b, a) in edges) == []


def test_formats_runs_without_torch():
    code = ("import sys, aligncodec.formats.reader, aligncodec.formats.writer, aligncodec.formats.atomic, "
            "aligncodec.codec.modes; bad = sorted(m for m in ('torch', 'numba') if m in sys.modules); "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("argv", [["inspect", str(VALID)], ["inspect", "--json", str(VALID)],
                                  ["verify", "-q", str(VALID)], ["verify", "-q", "--no-decode", str(VALID)],
                                  ["inspect", str(LOSSY)], ["verify", "-q", str(LOSSY)],
                                  ["verify", "-q", "--no-decode", str(LOSSY)]])
def test_inspect_and_verify_import_neither_torch_nor_the_encoder(argv):
    # inspect and verify --no-decode decode nothing: not even numba (the decoders' JIT) is imported;
    # the quantiser registry (codec/quant/registry.py, plain data the CLI's choices read) may be
    jit = ", 'numba'" if argv[0] == "inspect" or "--no-decode" in argv else ""
    code = ("import sys\nfrom aligncodec.tools.cli import main\nrc = main(sys.argv[1:])\n"
            "heavy = ('torch', 'transformers', 'aligncodec.codec.encoder', 'aligncodec.codec.quant.gptq', "
            "'aligncodec.codec.quant.trellis', 'aligncodec.codec.quant.grids', "
            f"'aligncodec.codec.baselines', 'aligncodec.encode'{jit})\n"
            "bad = sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy))\n"
            "print('HEAVY', bad, file=sys.stderr)\nsys.exit(rc or (3 if bad else 0))\n")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "HEAVY []" in r.stderr
