"""What the stages share: a :class:`Run` (the plan, the curves, the controller, the archive
writer, the coded tensors) and how a coded tensor is written into the archive."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from aligncodec.codec import encoder as E
from aligncodec.codec.modes import lossless, lossy
from aligncodec.formats.constants import PREAMBLE_SIZE, SECTION_METADATA
from aligncodec.formats.writer import build_section


@dataclass
class Coded:
    """One lossy tensor as written (the archive's per-tensor results)."""

    name: str
    kind: str
    step: float
    nbytes: int
    rel_err: float
    sqnr_db: float
    type: str


def overhead_bytes(meta: dict[str, str], extra_json: int) -> int:
    """Bytes outside the entries: preamble, the metadata section (``extra_json`` more bytes of
    JSON), final alignment."""
    body = json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return PREAMBLE_SIZE + len(build_section(SECTION_METADATA, 0, body)) + extra_json + 32


@dataclass
class Run:
    opts: object  # EncodeOptions
    log: Callable[[str], None]
    quantizer: object = None  # codec.quant.registry.Quantizer
    # plan (plan.py)
    folder: Path | None = None
    src: object = None
    src_meta: dict = field(default_factory=dict)
    ckpt: object = None
    plan: object = None
    calibrate: bool = False
    order: list = field(default_factory=list)  # (name, kind, block index or None)
    n_params: int = 0
    # rate pass (rate.py)
    curves: dict = field(default_factory=dict)
    lossless_why: dict = field(default_factory=dict)  # lossy candidates coded lossless instead, with the reason
    # calibration (calibration.py)
    data: object = None
    windows: list | None = None
    hs: list | None = None
    kws: list | None = None
    # output
    w: object = None  # ArchiveWriter
    meta: dict = field(default_factory=dict)
    ctl: object = None
    head_name: str | None = None
    head_step: float = 1.0
    overhead: int = 0
    coded: dict = field(default_factory=dict)
    by_block: dict = field(default_factory=dict)  # block index (None: outside the blocks) -> its lossy tensors
    deferred: dict = field(default_factory=dict)  # --tune-norms: name -> its lossless code, written after tuning
    decoded: dict | None = None  # --tune-norms: name -> the decoded float32 weight of each lossy tensor

    @property
    def lossy_names(self) -> set[str]:
        return {n for n, _, _ in self.order}

    @property
    def kinds(self) -> dict[str, str]:
        return {n: k for n, k, _ in self.order}

    @property
    def linear_names(self) -> set[str]:
        return {n for n, k, _ in self.order if k not in ("embedding", "lm_head")}

    # ------------------------------------------------------------------ writing

    def add_lossless(self, nm: str, dtype: str, shape: tuple, raw) -> tuple[tuple, int]:
        """Code ``raw`` (the tensor's bytes) losslessly into the archive: (its spool entry, its
        bytes in the file)."""
        mode, params, streams = lossless.encode(raw, dtype, int(np.prod(shape)))
        e = self.w.add(nm, dtype, shape, mode, streams, params)
        return (nm, dtype, shape, mode, params, streams), lossy.entry_bytes(nm, len(shape), len(params), e.size)

    def put(self, nm: str, tc: E.TensorCode, x: float, unfit: str | None = None):
        """Write one coded tensor and check it (blocks.check_coded); a code lossy coding cannot
        serve (``unfit``: clamped symbols, an underflowing step) is replaced by the tensor's
        lossless code, its bytes counted as spent. Returns its spool entry."""
        from aligncodec.codec.torch_interop import tensor_bytes
        from aligncodec.encode.blocks import check_coded

        ti = self.ckpt.tensors[nm]
        ctl, opts = self.ctl, self.opts
        if unfit:
            self.lossless_why[nm] = unfit
            entry, nb = self.add_lossless(nm, ti.dtype, ti.shape, tensor_bytes(self.ckpt.get(nm)))
            if nm in ctl.curves:
                if opts.scope == "all" or opts.distortion is not None:
                    ctl.skip(nm, nbytes=nb)
                else:
                    ctl.skip(nm, share=opts.bpw * ti.numel / 8)
            self.log(f"note: {nm} coded lossless instead of lossy: {unfit}")
            return entry
        e = self.w.add(nm, ti.dtype, ti.shape, tc.params.mode, tc.streams, tc.params.pack())
        check_coded(self.w, e, tc, self.ckpt, nm, keep=self.decoded)
        nb = lossy.entry_bytes(nm, 2, lossy.PARAMS_SIZE, e.size)
        if nm in ctl.curves:
            ctl.record(nm, x, nb, float(tc.rel_err))
        self.coded[nm] = Coded(nm, tc.kind, float(tc.params.step), nb, float(tc.rel_err), float(tc.sqnr_db), self.kinds[nm])
        return (nm, ti.dtype, ti.shape, tc.params.mode, tc.params.pack(), tc.streams)

    # ------------------------------------------------------------------ metadata

    def summary(self) -> dict:
        from aligncodec.codec.quant import registry as Q

        opts, ckpt, coded = self.opts, self.ckpt, self.coded
        lin = self.linear_names
        lin_bytes = sum(c.nbytes for n, c in coded.items() if n in lin)
        n_lin = sum(ckpt.tensors[n].numel for n in coded if n in lin)
        n_coded = sum(ckpt.tensors[n].numel for n in coded)
        modes: dict[str, int] = {}
        for c in coded.values():
            modes[c.kind] = modes.get(c.kind, 0) + 1
        steps = self.ctl.steps if self.ctl is not None else []
        summ = {"encoder": "stream", "target": opts.target, "calibration": opts.calibration,
                "calib_tokens": opts.calib_tokens if self.calibrate else 0,
                "calib_text": hashlib.sha256(Path(opts.calib_text).read_bytes()).hexdigest() if opts.calib_text else "builtin",
                "candidates": list(opts.candidates), "alpha": opts.alpha, "seed": opts.seed,
                "quantizer": Q.label(opts.trellis),
                "steps": [float(f"{s:.6g}") for s in steps],
                "step": float(f"{np.median(steps):.6g}") if steps else None,
                "n_params": self.n_params, "n_lossy_weights": n_coded, "n_linear_weights": n_lin,
                "bpw_linear_all_in": 8 * lin_bytes / max(1, n_lin),
                "bpw_lossy_all_in": 8 * sum(c.nbytes for c in coded.values()) / max(1, n_coded), "modes": modes,
                "nonfinite": opts.nonfinite, "lossless": dict(sorted(self.lossless_why.items())),
                "head": self.head_name, "head_step": self.head_step, "head_step_given": opts.head_step is not None}
        if opts.distortion is not None:
            summ["mean_act_rel_err"] = float(np.mean([c.rel_err for c in coded.values()])) if coded else None
        return summ

    def metadata(self, extra_summary: dict | None = None) -> dict[str, str]:
        per = {n: {"kind": c.kind, "bpw": round(8 * c.nbytes / self.ckpt.tensors[n].numel, 5),
                   "act_rel_err": float(f"{c.rel_err:.6g}"), "sqnr_db": round(c.sqnr_db, 3), "type": c.type,
                   "step": float(f"{c.step:.6g}")} for n, c in self.coded.items()}
        summ = {**self.summary(), **(extra_summary or {})}
        return {**self.meta, "acz.lossy": json.dumps(per, sort_keys=True), "acz.lossy.summary": json.dumps(summ, sort_keys=True)}

    def exact_overhead(self, n_more: int) -> int:
        m = self.metadata()
        return overhead_bytes(m, n_more * (len(m["acz.lossy"]) // max(1, len(self.coded)) + 2 if self.coded else 150))
