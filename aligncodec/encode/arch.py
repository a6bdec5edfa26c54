"""Architecture discovery and lazy checkpoint access for the block-sequential encoder.

``plan_model(folder)`` builds the model Transformers would build from the folder's
``config.json`` on the meta device (no weight memory), finds its decoder blocks (the
``nn.ModuleList`` of repeated layers that holds most parameters) and the ``nn.Linear``
layers inside them, and maps every parameter to its checkpoint tensor. Nothing is
hard-coded per architecture: Llama/SmolLM, Gemma-3, Qwen2 (attention biases), Mistral,
Phi-3 (fused qkv and gate_up) and tied or untied embeddings all go through the same
code. Everything that cannot work fails here, before any encoding, with a named error:

* :class:`UnsupportedArchitectureError`: no config, a config Transformers cannot build
  as a causal LM, no repeated decoder blocks, blocks without ``nn.Linear`` layers;
* :class:`CheckpointError` (an :class:`aligncodec.archive.InputError`): a shard named by
  the index is missing or truncated, a tensor the model needs is absent, a shape
  disagrees with the config, an unsupported dtype.

``Checkpoint`` reads one tensor at a time through ``safetensors.safe_open``
(memory-mapped): a single ``.safetensors`` file or a sharded Hugging Face folder
(``model.safetensors.index.json``), BF16/F16/F32 weights.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aligncodec.archive import InputError

INDEX_NAME = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


class UnsupportedArchitectureError(ValueError):
    """The model cannot be encoded block by block (no config, not a causal LM Transformers
    can build, no repeated decoder blocks, no linear layers)."""


class CheckpointError(InputError):
    """The checkpoint does not fit its config or cannot be read (missing or truncated shard,
    missing tensor, shape mismatch, non-finite weights)."""


# --------------------------------------------------------------------------- checkpoint


@dataclass
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _read_header(path: Path) -> dict:
    """The safetensors header of ``path``, checked against the file size (a truncated shard
    fails here, by name, before any work)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"shard {path.name} is missing ({path})") from None
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"shard {path.name} is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20 or 8 + n > size:
            raise CheckpointError(f"shard {path.name} is truncated or not safetensors (header of {n} bytes, file {size})")
        try:
            hdr = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"shard {path.name}: safetensors header is not JSON") from None
    end = 0
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        try:
            a, b = v["data_offsets"]
            nb = ITEM_BYTES.get(v["dtype"])
            numel = 1
            for d in v["shape"]:
                numel *= int(d)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"shard {path.name}: malformed entry for tensor {k!r}") from None
        if nb is not None and b - a != numel * nb:
            raise CheckpointError(f"shard {path.name}: tensor {k!r} spans {b - a} bytes, its shape needs {numel * nb}")
        end = max(end, b)
    if 8 + n + end > size:
        raise CheckpointError(f"shard {path.name} is truncated: {size} bytes, its header needs {8 + n + end}")
    return hdr


class Checkpoint:
    """Lazy, memory-mapped access to the tensors of a safetensors file or HF model folder."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if p.is_file():
            self.root, files = p.parent, [p]
        elif p.is_dir():
            self.root = p
            idx = p / INDEX_NAME
            if idx.is_file():
                try:
                    wm = json.loads(idx.read_text())["weight_map"]
                except (ValueError, KeyError, TypeError):
                    raise CheckpointError(f"{idx}: not a safetensors index (no weight_map)") from None
                files = sorted({p / f for f in wm.values()})
                for f in files:
                    if not f.is_file():
                        raise CheckpointError(f"shard {f.name} named by {INDEX_NAME} is missing")
            else:
                files = sorted(p.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"folder {str(p)!r} holds no .safetensors file")
        else:
            raise FileNotFoundError(f"input {str(p)!r} does not exist")
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            hdr = _read_header(f)
            for k, v in hdr.items():
                if k == "__metadata__":
                    continue
                if k in self.tensors:
                    raise CheckpointError(f"tensor {k!r} appears in both {self.tensors[k].file.name} and {f.name}")
                self.tensors[k] = TensorInfo(k, f, v["dtype"], tuple(int(d) for d in v["shape"]))
        if p.is_dir() and (p / INDEX_NAME).is_file():
            missing = [k for k in wm if k not in self.tensors]
            if missing:
                raise CheckpointError(f"{INDEX_NAME} lists tensors no shard holds: {missing[:3]}")

    def get(self, name: str) -> torch.Tensor:
        """A copy of the tensor as stored. The file is opened for this read only: a mapping
        kept open would keep every page read so far resident (and in the peak RSS)."""
        from safetensors import safe_open

        with safe_open(str(self.tensors[name].file), framework="pt") as f:
            return f.get_tensor(name)

    def float32(self, name: str) -> torch.Tensor:
        t = self.get(name)
        return t.to(torch.float32) if t.dtype != torch.float32 else t.clone()

    def rows_float32(self, name: str, rows: slice) -> torch.Tensor:
        """Rows ``rows`` (a slice, strided or not) of a tensor of two or more dimensions, in
        float32, read without reading the rest of the tensor (the file is opened for this read only)."""
        from safetensors import safe_open

        with safe_open(str(self.tensors[name].file), framework="pt") as f:
            t = f.get_slice(name)[rows]
        return t.to(torch.float32).contiguous() if t.dtype != torch.float32 else t.clone().contiguous()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())


# --------------------------------------------------------------------------- model plan


@dataclass
class LinearInfo:
    module: str  # module path, e.g. model.layers.3.self_attn.q_proj
    weight: str  # checkpoint tensor name of the weight
    bias: str | None
    shape: tuple[int, int]  # (out, in)


@dataclass
class BlockInfo:
    index: int
    prefix: str  # module path of the block
    linears: list[LinearInfo]
    params: dict[str, str]  # module parameter path -> checkpoint tensor name (every parameter of the block)


@dataclass
class ModelPlan:
    config: object
    model: torch.nn.Module  # built on the meta device
    blocks_path: str  # module path of the ModuleList
    blocks: list[BlockInfo]
    outer: dict[str, str]  # parameters outside the blocks: module path -> checkpoint name
    embedding: str | None  # checkpoint name of the input embedding weight
    lm_head: str | None  # checkpoint name of the output embedding weight (== embedding when tied)
    lm_head_module: str | None
    tied: bool
    extra: list[str] = field(default_factory=list)  # checkpoint tensors the model does not use (coded lossless)

    @property
    def checkpoint_names(self) -> set[str]:
        out = set(self.outer.values())
        for b in self.blocks:
            out.update(b.params.values())
        return out


def load_config(folder: Path):
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise UnsupportedArchitectureError(
            f"{folder}: no config.json, so the model cannot be built for calibration "
            "(give a Hugging Face model folder, or use --no-calibration)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - any failure to read the config is one named error
        raise UnsupportedArchitectureError(f"{cfg}: Transformers cannot read this config ({type(exc).__name__}: {exc})") from None


def build_meta_model(config) -> torch.nn.Module:
    """The causal LM of ``config`` with its parameters on the meta device (buffers such as
    rotary frequencies stay real, so the non-block parts can run once materialised)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # init_empty_weights re-creates each registered parameter, which unties shared ones
        model.tie_weights()
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedArchitectureError(
            f"Transformers cannot build a causal LM for model_type {getattr(config, 'model_type', '?')!r} "
            f"({type(exc).__name__}: {str(exc)[:200]})") from None
    model.eval()
    return model


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of repeated decoder blocks: the one holding most parameters among lists
    whose members share one class and each hold an ``nn.Linear``."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not all(any(isinstance(x, torch.nn.Linear) for x in m.modules()) for m in mod):
            continue
        n = sum(p.numel() for p in mod.parameters())
        # a list nested in a block (MoE experts) is smaller than the block list that holds it
        if best is None or n > best[2]:
            best = (name, mod, n)
    if best is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: no list of repeated decoder blocks with nn.Linear layers was found")
    return best[0], best[1]


def _map_names(param_names: list[str], ckpt: set[str]) -> dict[str, str]:
    """Module parameter path -> checkpoint name: exact, else with one consistent prefix added
    or removed (e.g. checkpoints saved from the inner model)."""
    if all(p in ckpt for p in param_names):
        return {p: p for p in param_names}
    probe = next(p for p in param_names if p not in ckpt)
    cands = []
    for k in ckpt:  # prefix to add: k == pre + p
        if k.endswith("." + probe):
            cands.append(("add", k[: -len(probe)]))
    parts = probe.split(".")
    for i in range(1, len(parts)):  # prefix to strip: p == pre + k
        if ".".join(parts[i:]) in ckpt:
            cands.append(("strip", ".".join(parts[:i]) + "."))
    for how, pre in cands:
        if how == "add":
            m = {p: pre + p for p in param_names}
        else:
            m = {p: p[len(pre):] if p.startswith(pre) else p for p in param_names}
        if all(v in ckpt for v in m.values()):
            return m
    return {p: p for p in param_names}  # the caller reports what is missing


def plan_model(path: str | os.PathLike, ckpt: Checkpoint | None = None) -> ModelPlan:
    """Build the meta model of the folder's config and map it onto the checkpoint; every
    mismatch is a named error here (see the module doc)."""
    p = Path(path)
    folder = p.parent if p.is_file() else p
    ckpt = ckpt or Checkpoint(p)
    config = load_config(folder)
    model = build_meta_model(config)
    blocks_path, blocks = find_blocks(model)
    params = dict(model.named_parameters())  # tied parameters appear once
    names = _map_names(list(params), set(ckpt.tensors))
    # a tied parameter may be saved under any of its names (e.g. lm_head.weight only)
    by_obj: dict[int, list[str]] = {}
    for n, prm in model.named_parameters(remove_duplicate=False):
        by_obj.setdefault(id(prm), []).append(n)
    for n, prm in params.items():
        if names[n] not in ckpt.tensors:
            for alt in by_obj.get(id(prm), []):
                alt_c = _map_names([alt], set(ckpt.tensors))[alt]
                if alt_c in ckpt.tensors:
                    names[n] = alt_c
                    break
    missing = [n for n in params if names[n] not in ckpt.tensors]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensor(s) the {config.model_type} config needs: {missing[:4]}")
    for n, prm in params.items():
        ti = ckpt.tensors[names[n]]
        if tuple(prm.shape) != ti.shape:
            raise CheckpointError(f"tensor {ti.name!r} has shape {list(ti.shape)}, the config needs {list(prm.shape)}")
        if ti.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {ti.name!r} has dtype {ti.dtype}; the encoder reads F32, F16 and BF16 weights")
    binfo = []
    in_block = set()
    for i, blk in enumerate(blocks):
        prefix = f"{blocks_path}.{i}"
        bp = {f"{prefix}.{n}": names[f"{prefix}.{n}"] for n, _ in blk.named_parameters()}
        lin = []
        for mn, m in blk.named_modules():
            if isinstance(m, torch.nn.Linear):
                full = f"{prefix}.{mn}"
                lin.append(LinearInfo(full, names[f"{full}.weight"], names.get(f"{full}.bias") if m.bias is not None else None,
                                      (m.out_features, m.in_features)))
        if not lin:
            raise UnsupportedArchitectureError(f"decoder block {prefix} holds no nn.Linear layer")
        in_block.update(bp)
        binfo.append(BlockInfo(i, prefix, lin, bp))
    outer = {n: names[n] for n in params if n not in in_block}
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    rev = {id(v): k for k, v in model.named_parameters()}
    emb_name = names.get(rev.get(id(emb.weight))) if emb is not None else None
    head_name = names.get(rev.get(id(out.weight))) if out is not None and hasattr(out, "weight") else None
    head_mod = None
    if out is not None:
        head_mod = next((n for n, m in model.named_modules() if m is out), None)
    tied = out is not None and emb is not None and out.weight is emb.weight
    extra = sorted(set(ckpt.tensors) - set(names.values()))
    return ModelPlan(config, model, blocks_path, binfo, outer, emb_name, head_name, head_mod, tied, extra)


def get_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path) if path else model


def set_param(model: torch.nn.Module, path: str, value: torch.Tensor | None, shape=None) -> None:
    """Replace parameter ``path`` by ``value`` (float32, frozen) or, with None, by a meta
    placeholder of ``shape`` (frees the memory)."""
    mod_path, _, pname = path.rpartition(".")
    mod = get_module(model, mod_path)
    if value is None:
        value = torch.empty(shape if shape is not None else mod._parameters[pname].shape, device="meta")
    mod._parameters[pname] = torch.nn.Parameter(value, requires_grad=False)
