"""Stage 1: the plan. Nothing is encoded before it succeeds.

The input is found and checked (:func:`aligncodec.archive.find_inputs`: symlinks, names, files
that are not safetensors, an index that disagrees with its shards). With a config (or when
calibration is on), the model is built on the meta device (:mod:`aligncodec.encode.arch`), its
decoder blocks and their ``nn.Linear`` layers are found and every parameter is mapped to its
checkpoint tensor; shards, shapes and dtypes are checked. The plan is the coding order: the block
linears block by block, then the embedding and an untied ``lm_head`` (lossy in whole-file scope).
A checkpoint without a config (or whose architecture has no block plan) and without
calibration is coded tensor by tensor in the checkpoint's order with Σ = I (weight MSE): every 2-D floating ``*.weight`` of at least
``MIN_NUMEL`` entries with both sides ≥ 16 that is not an embedding (:func:`is_lossy_candidate`).
"""

from __future__ import annotations

import os
from pathlib import Path

from aligncodec.codec import encoder as E
from aligncodec.codec.modes import lossy
from aligncodec.codec.naming import is_embedding, layer_type
from aligncodec.encode import arch as A

MIN_NUMEL = 4096


class NonFiniteError(A.CheckpointError, E.NonFiniteError):
    """A weight to be coded holds NaN or Inf (``nonfinite="error"``, the default)."""


class TokenizerMismatchError(A.CheckpointError):
    """The calibration tokenizer yields token ids the model has no embedding row for (a
    tokenizer that belongs to another model beside the weights)."""


def resolve_input(model: str | os.PathLike) -> Path:
    """A path as given, or a reference model's cached folder by its name (``smollm2``)."""
    p = Path(model)
    if p.exists():
        return p
    from aligncodec.tools.eval.models import resolve_model

    return resolve_model(str(model))


def lossy_shape_ok(shape) -> bool:
    return len(shape) == 2 and min(shape) >= 16 and shape[0] * shape[1] >= MIN_NUMEL


def is_lossy_candidate(name: str, dtype: str, shape: tuple[int, ...], lossy_embeddings: bool = False) -> bool:
    """Whether a tensor of a checkpoint without a model plan is coded lossy."""
    if dtype not in lossy.LOSSY_DTYPES or not name.endswith(".weight") or not lossy_shape_ok(shape):
        return False
    return lossy_embeddings or not is_embedding(name)


def coding_order(plan: "A.ModelPlan | None", ckpt: A.Checkpoint, lossy_embeddings: bool) -> list[tuple[str, str, int | None]]:
    """(checkpoint name, controller kind, block index or None) of every lossy tensor, in coding order."""
    order: list[tuple[str, str, int | None]] = []
    if plan is not None:
        for b in plan.blocks:
            for li in b.linears:
                if lossy_shape_ok(ckpt.tensors[li.weight].shape):
                    order.append((li.weight, li.module.rsplit(".", 1)[-1], b.index))
        if lossy_embeddings:
            for nm, kind in ((plan.embedding, "embedding"), (None if plan.tied else plan.lm_head, "lm_head")):
                if nm is not None and lossy_shape_ok(ckpt.tensors[nm].shape):
                    order.append((nm, kind, None))
    else:
        for nm, ti in ckpt.tensors.items():
            if is_lossy_candidate(nm, ti.dtype, ti.shape, lossy_embeddings=lossy_embeddings):
                order.append((nm, layer_type(nm), None))
    return order


def check_vocab(plan: A.ModelPlan, ckpt: A.Checkpoint, windows, tokenizer_size=None) -> None:
    """Raise TokenizerMismatchError, naming both numbers, when a calibration token id is not
    below the model's vocabulary: its config's ``vocab_size`` and its input embedding's rows
    (before any work; the first forward pass would otherwise fail deep in the embedding lookup).
    ``tokenizer_size``: a callable giving len(tokenizer) for the message (called on error only)."""
    top = max((int(w.max()) for w in windows if w.numel()), default=-1)
    cfg = plan.config
    vs = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    rows = ckpt.tensors[plan.embedding].shape[0] if plan.embedding in ckpt.tensors else None
    limits = [(int(v), what) for v, what in ((vs, "config vocab_size"), (rows, f"rows of {plan.embedding}")) if v]
    bad = [(v, what) for v, what in limits if top >= v]
    if bad:
        v, what = min(bad)
        size = tokenizer_size() if callable(tokenizer_size) else tokenizer_size
        tok = f" (of {size:,} tokens)" if size and size > top else ""
        raise TokenizerMismatchError(
            f"the calibration tokenizer{tok} gives token id {top:,}, but the model has a vocabulary of {v:,} "
            f"({what}): the tokenizer does not belong to this model; put the model's own tokenizer beside its weights, "
            "or use --no-calibration")


def tokenizer_size(folder: Path, tokenizer) -> int | None:
    """len(tokenizer) of the given tokenizer, or of the folder's (for an error message only)."""
    try:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return len(tokenizer)
    except Exception:  # noqa: BLE001 - only a detail of the message
        return None


def plan(run, model, follow_symlinks: bool = False) -> None:
    """Stage 1 on a :class:`~aligncodec.encode.state.Run`: input, checkpoint, model plan, order."""
    from aligncodec import archive

    opts = run.opts
    src_path = resolve_input(model)
    run.folder = src_path.parent if src_path.is_file() else src_path
    run.src = archive.find_inputs(src_path, follow_symlinks=follow_symlinks)
    run.src_meta, notes = run.src.metadata()
    for n in notes:
        run.log(f"note: {n}")
    run.ckpt = A.Checkpoint(src_path)
    run.calibrate = opts.calibration != "none"
    has_config = (run.folder / "config.json").is_file()
    if opts.tune is not None and not has_config:
        from aligncodec.encode.tune import TuneError

        raise TuneError(f"{model}: --tune-norms needs a model folder with its config and tokenizer")
    run.plan = None
    if run.calibrate or opts.tune is not None:
        run.plan = A.plan_model(src_path, run.ckpt)
    elif has_config:  # without calibration a checkpoint that is not a causal LM Transformers can run block
        try:  # by block (an encoder-only model, a checkpoint without its head) is coded tensor by tensor
            run.plan = A.plan_model(src_path, run.ckpt)
        except (A.UnsupportedArchitectureError, A.CheckpointError) as exc:
            run.log(f"note: no block plan ({type(exc).__name__}: {exc}); coding tensor by tensor with weight MSE")
    run.order = coding_order(run.plan, run.ckpt, opts.lossy_embeddings)
    if not run.order:
        raise ValueError(f"{model}: no tensor qualifies for lossy coding")
    run.n_params = run.ckpt.n_params
