"""Stage 3: calibration.

The calibration windows (BOS + up to ``window`` − 1 tokens of the built-in calibration half, or
``calib_text``) are tokenized and checked against the model's vocabulary before any work
(plan.check_vocab). The embedding is put in place and the arguments every decoder block receives
(masks, rotary tables: whatever the architecture passes) are recorded by running the model with
recording stubs in place of the blocks (:func:`record_block_inputs`). The block pass then runs
each block on these inputs (:func:`run_block`), accumulating Σ = E[x xᵀ] of every linear's input
in float64, and the head's Σ is taken from the last block's outputs through the model's tail
(:func:`head_input_sigma`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from aligncodec.codec import encoder as E
from aligncodec.encode import arch as A


class CalibrationError(RuntimeError):
    """The calibration forward pass cannot run or leaves a linear layer without Σ."""


class _Stop(Exception):
    pass


def calibration_windows(folder: Path, opts, tokenizer=None):
    """The calibration text (built-in calibration half, or ``opts.calib_text``) as protocol windows."""
    from aligncodec.tools.eval.evaluate import make_windows

    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # noqa: BLE001
            raise CalibrationError(f"{folder}: no tokenizer for the calibration text ({type(exc).__name__}: {exc}); "
                                   "use --no-calibration") from None
    text = None
    if opts.calib_text:
        text = Path(opts.calib_text).read_text(encoding="utf-8")
    try:
        return make_windows(tokenizer, opts.calib_tokens, "calib", opts.window, text=text)
    except Exception as exc:  # noqa: BLE001 - too little text etc.
        raise CalibrationError(f"calibration text: {exc}") from None


def record_block_inputs(plan: A.ModelPlan, windows) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Run the model with recording stubs in place of its blocks: the first block's input per
    window and the keyword arguments each block receives (masks, rotary tables, ...)."""
    blocks = A.get_module(plan.model, plan.blocks_path)
    nb = len(blocks)
    inputs: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in range(nb)]
    saved = []
    for i, blk in enumerate(blocks):
        def fwd(*args, _i=i, **kw):
            h = args[0] if args else kw.pop("hidden_states")
            if len(args) > 1:
                raise A.UnsupportedArchitectureError("decoder blocks called with positional arguments beyond the hidden states")
            if _i == 0:
                inputs.append(h.detach())
            kwargs[_i].append(kw)
            if _i == nb - 1:
                raise _Stop
            return h

        saved.append(blk.__dict__.get("forward"))
        blk.forward = fwd
    try:
        with torch.no_grad():
            for w in windows:
                try:
                    plan.model(input_ids=w[None], use_cache=False)
                except _Stop:
                    pass
                else:
                    raise CalibrationError("the model's forward pass did not reach its last decoder block")
    finally:
        for blk, f in zip(blocks, saved):
            if f is None:
                del blk.forward
            else:
                blk.forward = f
    for i in range(nb):
        if len(kwargs[i]) != len(windows):
            raise CalibrationError(f"decoder block {i} was called {len(kwargs[i])} times for {len(windows)} windows")
    return inputs, kwargs


def head_input_sigma(plan: A.ModelPlan, windows, finals: list[torch.Tensor]) -> torch.Tensor:
    """Σ of the output projection's input: the model's tail (final norm, ...) run on the last
    block's outputs."""
    blocks = A.get_module(plan.model, plan.blocks_path)
    nb = len(blocks)
    head = A.get_module(plan.model, plan.lm_head_module)
    acc = None
    n_pos = 0
    state = {"w": 0}
    saved = []
    for i, blk in enumerate(blocks):
        def fwd(*args, _i=i, **kw):
            h = args[0] if args else kw["hidden_states"]
            return finals[state["w"]] if _i == nb - 1 else h

        saved.append(blk.__dict__.get("forward"))
        blk.forward = fwd

    def hook(_m, args):
        nonlocal acc, n_pos
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        acc = x.T @ x if acc is None else acc.addmm_(x.T, x)
        n_pos += x.shape[0]
        raise _Stop

    h = head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for wi, w in enumerate(windows):
                state["w"] = wi
                # dummy input embeddings: the blocks' stubs return the real final states, and
                # the (possibly freed) embedding is not needed
                dummy = torch.zeros(1, len(w), finals[wi].shape[-1], dtype=finals[wi].dtype)
                try:
                    plan.model(inputs_embeds=dummy, use_cache=False)
                except _Stop:
                    pass
    finally:
        h.remove()
        for blk, f in zip(blocks, saved):
            if f is None:
                del blk.forward
            else:
                blk.forward = f
    if acc is None:
        raise CalibrationError("the output projection was never reached")
    acc /= n_pos
    return E.symmetrize_(acc)


GRAM_TILE = 1024  # Σ's columns accumulated per product: inputs wider than this fill the lower triangle only


def add_gram_lower_(G: torch.Tensor, x: torch.Tensor, tile: int = GRAM_TILE) -> None:
    """G += xᵀ x on and below the diagonal (G's upper triangle beyond the diagonal tiles is left
    as it is; :func:`mirror_lower_` completes it): one float32 product per column tile of
    ``tile`` columns, widened into G element by element. Half the multiplications of the full
    product for a wide input (n = 8,192: 56 %); an input of at most ``tile`` is the one product."""
    n = x.shape[1]
    for a in range(0, n, tile):
        G[a:, a:a + tile].add_(x[:, a:].T @ x[:, a:a + tile])


def mirror_lower_(G: torch.Tensor, tile: int = GRAM_TILE) -> torch.Tensor:
    """G's upper triangle beyond the diagonal tiles set to its lower one (in place, a tile at a
    time), and each diagonal tile symmetrised, (X + Xᵀ)/2: G exactly symmetric. Returns G."""
    n = G.shape[0]
    for a in range(0, n, tile):
        X = G[a:a + tile, a:a + tile]
        X.copy_((X + X.T) / 2)
        for b in range(a + tile, n, tile):
            G[a:a + tile, b:b + tile].copy_(G[b:b + tile, a:a + tile].T)
    return G


def run_block(block: torch.nn.Module, hs: list[torch.Tensor], kws: list[dict], capture: list[tuple[str, torch.nn.Module]] | None,
              dev: torch.device | None = None, sigma_only: bool = False, energy: dict[str, float] | None = None):
    """Outputs of ``block`` per window; with ``capture``, also Σ per linear (float64; aliases
    share the tensor: linears that read the very same input get the same Σ object).
    ``sigma_only``: the outputs are not wanted (quantized calibration runs the block again with
    the decoded weights), so each window stops as soon as every captured linear has seen its
    input (the last linear itself, e.g. ``down_proj``, and what follows it are skipped); returns
    no outputs. ``energy``: filled with tr(W Σ Wᵀ) = ‖X Wᵀ‖² / positions per captured linear
    whose output was computed, from the outputs the forward pass makes anyway (the encoder's
    relative error needs it; otherwise a rows × n² product per tensor)."""
    acc: dict[str, torch.Tensor] = {}
    en: dict[str, float] = {}
    aliases: dict[str, str] = {}
    last = {"x": None, "key": None}
    seen: set[str] = set()
    n_capture = len({k for k, _m in capture or []})
    handles = []
    n_pos = 0

    def hook_for(key):
        def hook(_m, args):
            x = args[0]
            seen.add(key)
            if x is last["x"]:
                aliases[key] = aliases.get(last["key"], last["key"])
                if sigma_only and len(seen) == n_capture:
                    raise _Stop
                return
            last["x"], last["key"] = x, key
            # one window's product in float32 (≤ 1024 positions), accumulated in float64
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            if key not in acc:
                acc[key] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64, device=x2.device)
            add_gram_lower_(acc[key], x2)
            if sigma_only and len(seen) == n_capture:
                raise _Stop

        return hook

    def out_hook_for(key):
        def hook(m, _args, y):
            y2 = y.detach().reshape(-1, y.shape[-1]).float()
            b = getattr(m, "bias", None)
            if isinstance(b, torch.Tensor):
                y2 = y2 - b.detach().float()
            en[key] = en.get(key, 0.0) + float((y2 * y2).sum(dtype=torch.float64))

        return hook

    for key, m in capture or []:
        handles.append(m.register_forward_pre_hook(hook_for(key)))
        if energy is not None:
            handles.append(m.register_forward_hook(out_hook_for(key)))
    outs = []
    try:
        with torch.no_grad():
            for h, kw in zip(hs, kws):
                last["x"] = last["key"] = None
                seen.clear()
                try:
                    o = block(h.to(dev) if dev is not None else h, **kw)
                except _Stop:
                    o = None
                if not sigma_only:
                    if o is None:
                        raise CalibrationError("a decoder block stopped before its output")
                    outs.append((o[0] if isinstance(o, tuple) else o).detach().cpu())
                n_pos += h.shape[0] * h.shape[1]
    finally:
        for hd in handles:
            hd.remove()
        last["x"] = None
    sig = {}
    if capture:
        for k in list(acc):  # accumulated and kept in float64 (float32 storage cost Gemma-3 4 % KLD)
            acc[k] /= n_pos
            acc[k] = mirror_lower_(acc[k]).to(device="cpu")
        if energy is not None:
            energy.update({k: v / n_pos for k, v in en.items()})
        for key, _m in capture:
            if key in acc:
                sig[key] = acc[key]
            elif key in aliases:
                sig[key] = acc[aliases[key]]
            else:
                raise CalibrationError(f"linear {key} was never called during the calibration pass")
    return outs, sig


# --------------------------------------------------------------------------- spool (resume)


def load_windows(run, tokenizer=None) -> None:
    """The calibration windows of a run, checked against the model's vocabulary (before any work)."""
    from aligncodec.encode.plan import check_vocab, tokenizer_size

    if run.data is None:
        run.data = calibration_windows(run.folder, run.opts, tokenizer)
        check_vocab(run.plan, run.ckpt, run.data.windows, lambda: tokenizer_size(run.folder, tokenizer))


def calibration_inputs(run, tokenizer=None) -> None:
    """Stage 3 on a :class:`~aligncodec.encode.state.Run`: the first block's inputs per window
    (``run.hs``) and every block's keyword arguments (``run.kws``); a model that cannot run fails here."""
    plan, ckpt = run.plan, run.ckpt
    load_windows(run, tokenizer)
    run.windows = run.data.windows
    for path, cname in plan.outer.items():
        # the output projection is never run (its input is captured by a hook that stops there)
        if plan.lm_head_module and path.startswith(plan.lm_head_module + "."):
            continue
        A.set_param(plan.model, path, ckpt.float32(cname))
    run.hs, run.kws = record_block_inputs(plan, run.windows)
    for path, cname in plan.outer.items():  # the embedding is only needed for the inputs
        if cname in (plan.embedding, plan.lm_head):
            A.set_param(plan.model, path, None)
    run.log(f"calibration: {run.data.n_tokens} tokens in {len(run.windows)} windows")
