"""Strict parsing of the METADATA section and of its reserved ``acz.*`` keys (spec/FORMAT.md §3.1).

Every reader path (random access and streaming) runs :func:`parse_metadata` and
:func:`check_reserved`, so ``verify``, ``inspect``, ``decompress`` and ``load``
accept and reject the same archives. The JSON is strict: UTF-8, no duplicate
keys at any level, no ``NaN``/``Infinity``, no lone surrogates, bounded nesting;
every failure is a :class:`~aligncodec.formats.errors.HeaderError`.
"""

from __future__ import annotations

import json
import math

from aligncodec.formats import errors as E
from aligncodec.formats.constants import AUX_PREFIX

KEY_FILES = "acz.files"
KEY_INDEX = "acz.index"
INDEX_SUFFIX = ".safetensors.index.json"
KEY_LOSSY = "acz.lossy"
KEY_LOSSY_SUMMARY = "acz.lossy.summary"
MAX_FILE_NAME_BYTES = 255
# fields of an acz.lossy entry that readers use, with the JSON types they must have
_LOSSY_FIELDS = {
    "kind": (str,),
    "type": (str,),
    "bpw": (int, float),
    "act_rel_err": (int, float, type(None)),
    "sqnr_db": (int, float, type(None)),
    "rank": (int,),
}


class _Bad(Exception):
    pass


def _pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Bad(f"duplicate key {k!r}")
        out[k] = v
    return out


def _constant(name):
    raise _Bad(f"{name} is not JSON")


def _check_strings(obj, depth: int = 0) -> None:
    """Every string (keys included) must be valid Unicode (no lone surrogates from \\ud800 escapes)."""
    if depth > 64:
        raise _Bad("nested too deeply")
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise _Bad("a string holds a lone surrogate") from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_strings(k, depth + 1)
            _check_strings(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check_strings(v, depth + 1)
    elif isinstance(obj, bool) or obj is None or isinstance(obj, int):
        pass
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise _Bad("a number is not finite")


def loads(text: str | bytes, what: str):
    """Strict JSON: raises HeaderError (never RecursionError, ValueError, ...)."""
    try:
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
        _check_strings(obj)
    except RecursionError:
        raise E.HeaderError(f"{what} is nested too deeply") from None
    except _Bad as exc:
        raise E.HeaderError(f"{what}: {exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise E.HeaderError(f"{what} is not UTF-8 JSON: {exc}") from None
    return obj


def parse_metadata(payload: bytes | memoryview) -> dict[str, str]:
    """The METADATA section: a JSON object whose keys and values are all strings."""
    obj = loads(payload, "metadata")
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        raise E.HeaderError("metadata must be a JSON object of strings")
    return obj


def check_output_file_name(name: str, what: str) -> None:
    """A safetensors file name of ``acz.files``: one portable path component ending in .safetensors."""
    bad = (
        not name
        or len(name.encode("utf-8")) > MAX_FILE_NAME_BYTES
        or name in (".", "..")
        or any(c in name for c in "/\\")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or not name.endswith(".safetensors")
    )
    if bad:
        raise E.HeaderError(f"{what} names an unsafe output file {name!r}")


def parse_files(text: str, tensor_names=None) -> dict[str, dict]:
    """``acz.files``: ``{file name: {"metadata": {str: str}, "tensors": [str]}}``.

    With ``tensor_names`` (the archive's tensors) every listed tensor must exist, be a
    weight (not an auxiliary file) and be listed once."""
    obj = loads(text, KEY_FILES)
    if not isinstance(obj, dict):
        raise E.HeaderError(f"{KEY_FILES} must be a JSON object, not {type(obj).__name__}")
    seen: dict[str, str] = {}
    for fname, info in obj.items():
        check_output_file_name(fname, KEY_FILES)
        if not isinstance(info, dict) or set(info) - {"metadata", "tensors"}:
            raise E.HeaderError(f"{KEY_FILES}[{fname!r}] must be an object with 'metadata' and 'tensors'")
        meta = info.get("metadata", {})
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise E.HeaderError(f"{KEY_FILES}[{fname!r}].metadata must be an object of strings")
        names = info.get("tensors", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise E.HeaderError(f"{KEY_FILES}[{fname!r}].tensors must be a list of strings")
        for n in names:
            if n in seen:
                raise E.HeaderError(f"{KEY_FILES} lists tensor {n!r} twice ({seen[n]!r}, {fname!r})")
            seen[n] = fname
            if n.startswith(AUX_PREFIX):
                raise E.HeaderError(f"{KEY_FILES} lists the auxiliary file {n!r} as a weight")
            if tensor_names is not None and n not in tensor_names:
                raise E.HeaderError(f"{KEY_FILES} lists tensor {n!r} that the archive lacks")
    return obj


def _index_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be the file name of a shard index (spec §3.1), or None: one portable
    file name (ASCII letters, digits, ``.``, ``_``, ``-``, ``+``; not starting with ``.``, ``-``,
    ``+``), at most 200 bytes, ending in ``.safetensors.index.json``."""
    if not isinstance(name, str) or not name.endswith(INDEX_SUFFIX) or name == INDEX_SUFFIX:
        return f"does not end in {INDEX_SUFFIX!r} after a stem"
    if len(name) > 200 or not all(c.isascii() and (c.isalnum() or c in "._+-") for c in name) or name[0] in ".-+":
        return "is not a portable file name"
    if name.split(".")[0].lower() in _WINDOWS_DEVICES:
        return "is a reserved device name"
    return None


_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_LAYOUT_SORTED = {"indent", "sort_keys", "ascii", "newline"}
_LAYOUT_ORDERED = _LAYOUT_SORTED | {"at", "order"}


def parse_index(text: str, files: dict[str, dict]) -> dict[str, dict]:
    """``acz.index``: the shard indexes of the source folder (spec §3.1), given the parsed
    ``acz.files``: ``{index file name: {"files": [...], "fields": {...}, "layout": {...} | null}}``.

    The weight map of an index is never stored: it is derived from ``acz.files`` (every tensor of
    every file in ``files``). ``fields`` are the index's other top-level members (normally
    ``metadata``), ``layout`` how to write the JSON text back byte for byte."""
    obj = loads(text, KEY_INDEX)
    if not isinstance(obj, dict):
        raise E.HeaderError(f"{KEY_INDEX} must be a JSON object, not {type(obj).__name__}")
    owner: dict[str, str] = {}
    lower: dict[str, str] = {}
    for name, spec in obj.items():
        why = _index_name_problem(name)
        if why:
            raise E.HeaderError(f"{KEY_INDEX} names an index file {name!r} that {why}")
        if name.lower() in lower:
            raise E.HeaderError(f"{KEY_INDEX} names index files {lower[name.lower()]!r} and {name!r} that differ only in case")
        lower[name.lower()] = name
        where = f"{KEY_INDEX}[{name!r}]"
        if not isinstance(spec, dict) or set(spec) != {"files", "fields", "layout"}:
            raise E.HeaderError(f"{where} must be an object with exactly 'files', 'fields' and 'layout'")
        shards = spec["files"]
        if not isinstance(shards, list) or not all(isinstance(f, str) for f in shards):
            raise E.HeaderError(f"{where}.files must be a list of strings")
        for f in shards:
            if f not in files:
                raise E.HeaderError(f"{where}.files names {f!r}, which {KEY_FILES} lacks")
            if f in owner:
                raise E.HeaderError(f"{where}.files names {f!r} twice or in two indexes")
            owner[f] = name
        fields = spec["fields"]
        if not isinstance(fields, dict) or "weight_map" in fields:
            raise E.HeaderError(f"{where}.fields must be an object without 'weight_map'")
        if "metadata" in fields:
            md = fields["metadata"]
            if not isinstance(md, dict):
                raise E.HeaderError(f"{where}.fields.metadata must be an object")
            ts = md.get("total_size", 0)
            if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts < 0:
                raise E.HeaderError(f"{where}.fields.metadata.total_size must be a non-negative number")
        lay = spec["layout"]
        if lay is None:
            continue
        if not isinstance(lay, dict) or not isinstance(lay.get("sort_keys"), bool):
            raise E.HeaderError(f"{where}.layout must be null or an object with a boolean 'sort_keys'")
        if set(lay) != (_LAYOUT_SORTED if lay["sort_keys"] else _LAYOUT_ORDERED):
            raise E.HeaderError(f"{where}.layout must have exactly the fields "
                                + ", ".join(sorted(_LAYOUT_SORTED if lay["sort_keys"] else _LAYOUT_ORDERED)))
        ind = lay["indent"]
        if ind is not None and (isinstance(ind, bool) or not isinstance(ind, int) or not 0 <= ind <= 16):
            raise E.HeaderError(f"{where}.layout.indent must be null or an integer 0..16")
        if not isinstance(lay["ascii"], bool) or not isinstance(lay["newline"], bool):
            raise E.HeaderError(f"{where}.layout.ascii and .newline must be booleans")
        if not lay["sort_keys"]:
            at, order = lay["at"], lay["order"]
            if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at <= len(fields):
                raise E.HeaderError(f"{where}.layout.at must be an integer 0..{len(fields)}")
            want = [t for f in shards for t in files[f].get("tensors", [])]
            if not isinstance(order, list) or len(order) != len(want) or set(order) != set(want):
                raise E.HeaderError(f"{where}.layout.order must list the index's tensors, each once")
    return obj


def parse_lossy(text: str) -> dict[str, dict]:
    """``acz.lossy``: ``{tensor name: {"kind", "bpw", "act_rel_err", ...}}`` (informative; typed)."""
    obj = loads(text, KEY_LOSSY)
    if not isinstance(obj, dict):
        raise E.HeaderError(f"{KEY_LOSSY} must be a JSON object, not {type(obj).__name__}")
    for name, info in obj.items():
        if not isinstance(info, dict):
            raise E.HeaderError(f"{KEY_LOSSY}[{name!r}] must be an object")
        for k, types in _LOSSY_FIELDS.items():
            if k in info and (not isinstance(info[k], types) or (isinstance(info[k], bool))):
                raise E.HeaderError(f"{KEY_LOSSY}[{name!r}].{k} has the wrong type")
    return obj


def check_reserved(metadata: dict[str, str], tensor_names=None) -> None:
    """Validate the reserved keys an archive carries (spec §3.1); others are the user's."""
    if KEY_FILES in metadata:
        parse_files(metadata[KEY_FILES], tensor_names)
    if KEY_INDEX in metadata:
        parse_index(metadata[KEY_INDEX], parse_files(metadata.get(KEY_FILES, "{}")))
    if KEY_LOSSY in metadata:
        parse_lossy(metadata[KEY_LOSSY])
    if KEY_LOSSY_SUMMARY in metadata and not isinstance(loads(metadata[KEY_LOSSY_SUMMARY], KEY_LOSSY_SUMMARY), dict):
        raise E.HeaderError(f"{KEY_LOSSY_SUMMARY} must be a JSON object")
