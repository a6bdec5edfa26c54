"""The shard index of a sharded Hugging Face folder (``model.safetensors.index.json``) and the
archive's ``acz.index`` metadata (spec §3.1).

An index is never an auxiliary file (it could stand in for the weights): ``compress`` checks it
against the shards and keeps only what the shards cannot say (its other members, such as
``metadata.total_size``, and the layout of its JSON text); ``decompress`` derives the weight map
from the archive's own file split (``acz.files``) and writes the index back — byte for byte when
the layout was recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

from aligncodec.errors import InputError
from aligncodec.formats import errors as E
from aligncodec.formats import metadata as M

INDEX_SUFFIX = M.INDEX_SUFFIX

__all__ = ["INDEX_SUFFIX", "ShardIndexError", "is_index_name", "find_indexes", "index_metadata", "index_bytes"]


class ShardIndexError(InputError):
    """A shard index (``*.safetensors.index.json``) of the input folder disagrees with its shards
    or is not a valid index (an input error: exit 3)."""


def is_index_name(name: str) -> bool:
    """True for a file name that is (or would be taken for) a safetensors shard index (any case)."""
    return name.lower().endswith(INDEX_SUFFIX)


def find_indexes(folder: Path) -> list[Path]:
    """The shard index files of a model folder."""
    return sorted(f for f in Path(folder).iterdir() if f.is_file() and is_index_name(f.name))


def _render(fields: dict, weight_map: dict, layout: dict | None) -> bytes:
    if layout is None:  # Hugging Face Transformers' own layout (save_pretrained)
        return (json.dumps({**fields, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n").encode("utf-8")
    if layout["sort_keys"]:
        obj = {**fields, "weight_map": weight_map}
    else:
        items = list(fields.items())
        items.insert(layout["at"], ("weight_map", {t: weight_map[t] for t in layout["order"]}))
        obj = dict(items)
    text = json.dumps(obj, indent=layout["indent"], sort_keys=layout["sort_keys"], ensure_ascii=layout["ascii"])
    return (text + ("\n" if layout["newline"] else "")).encode("utf-8")


def _weight_map(shards: list[str], files: dict[str, dict]) -> dict[str, str]:
    return {t: f for f in shards for t in files[f].get("tensors", [])}


def index_bytes(spec: dict, files: dict[str, dict]) -> bytes:
    """The bytes of one index file, from its ``acz.index`` entry and the archive's ``acz.files``
    (both validated by :func:`aligncodec.formats.metadata.parse_index`)."""
    return _render(spec["fields"], _weight_map(spec["files"], files), spec["layout"])


def _layout_of(raw: bytes, obj: dict, fields: dict, weight_map: dict) -> dict | None:
    """The layout that writes ``obj`` back as exactly ``raw``, or None when none of those tried does."""
    text = raw.decode("utf-8")
    body = text[:-1] if text.endswith("\n") else text
    if "\n" in body:
        second = body.split("\n", 2)[1]
        indent = len(second) - len(second.lstrip(" "))
    else:
        indent = None
    newline = text.endswith("\n")
    keys = list(obj)
    if indent is not None and indent > 16:
        return None
    for sort_keys in (True, False):
        for ascii_ in (True, False):
            lay = {"indent": indent, "sort_keys": sort_keys, "ascii": ascii_, "newline": newline}
            if not sort_keys:
                lay.update(at=keys.index("weight_map"), order=list(weight_map))
            if _render(fields, weight_map, lay) == raw:
                return lay
    return None


def _read_index(path: Path, files: dict[str, dict]) -> tuple[dict, str | None]:
    """One index checked against the shards: its ``acz.index`` entry and a note (or None)."""
    name = path.name

    def bad(msg: str):
        return ShardIndexError(f"{name}: {msg}")

    why = M._index_name_problem(name)
    if why:
        raise bad(f"the index file name {why} (rename it, or remove it from the folder)")
    raw = path.read_bytes()

    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise bad(f"key {k!r} is listed twice")
            out[k] = v
        return out

    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs,
                         parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not JSON")))
    except RecursionError:
        raise bad("nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise bad("not a safetensors index (no 'weight_map' object)")
    wm = obj["weight_map"]
    held = {t: f for f, info in files.items() for t in info["tensors"]}
    for t, f in wm.items():
        if not isinstance(f, str):
            raise bad(f"tensor {t!r} maps to {f!r}, not a file name")
        if f not in files:
            raise bad(f"tensor {t!r} points to {f!r}, which is not in the folder")
        if t not in held:
            raise bad(f"lists tensor {t!r}, which no shard holds")
        if held[t] != f:
            raise bad(f"lists tensor {t!r} in {f!r}, but it is in {held[t]!r}")
    shards = sorted(set(wm.values()))
    for f in shards:
        missing = [t for t in files[f]["tensors"] if t not in wm]
        if missing:
            raise bad(f"tensor {missing[0]!r} of {f!r} is missing from the index"
                      + (f" ({len(missing) - 1} more)" if len(missing) > 1 else ""))
    fields = {k: v for k, v in obj.items() if k != "weight_map"}
    lay = _layout_of(raw, obj, fields, wm)
    spec = {"files": shards, "fields": fields, "layout": lay}
    try:  # the reader's own rules (types of metadata.total_size, ...), as the archive will be read
        M.parse_index(json.dumps({name: spec}), files)
    except E.HeaderError as exc:
        raise bad(str(exc)) from None
    note = None
    if lay is None:
        note = f"{name} is not laid out as json.dumps writes it: decompress writes the same content in Hugging Face's layout"
    return spec, note


def index_metadata(indexes: list[Path], files: dict[str, dict]) -> tuple[dict[str, str], list[str]]:
    """``({"acz.index": ...}, notes)`` for the shard index files ``indexes`` of a folder
    (``({}, [])`` when there are none), each checked against the shards ``files`` (``acz.files``' shape). Raises
    :class:`ShardIndexError` (an InputError, exit 3) on an index that disagrees with the shards:
    a tensor missing, listed twice, listed in the wrong shard or that no shard holds, a shard
    that is not in the folder, a shard named by two indexes, a safetensors file of the folder
    that no index names."""
    out: dict[str, dict] = {}
    notes: list[str] = []
    owner: dict[str, str] = {}
    for p in indexes:
        spec, note = _read_index(p, files)
        for f in spec["files"]:
            if f in owner:
                raise ShardIndexError(f"{p.name}: shard {f!r} is named by {owner[f]} too")
            owner[f] = p.name
        if note:
            notes.append(note)
        out[p.name] = spec
    if not out:
        return {}, notes
    for f, info in files.items():  # what the index does not name, a loader of the folder would not read
        if f not in owner:
            eg = f" (its tensors, e.g. {info['tensors'][0]!r}, are missing from the index)" if info["tensors"] else ""
            raise ShardIndexError(f"{', '.join(sorted(out))}: {f} is in the folder but not in the index{eg}; "
                                  "remove the file or fix the index")
    # member order is kept (a layout that does not sort keys needs it); the text is deterministic
    return {M.KEY_INDEX: json.dumps(out, ensure_ascii=False, separators=(",", ":"))}, notes
