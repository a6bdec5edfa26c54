"""The encoder's options (:class:`EncodeOptions`)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from aligncodec.codec import encoder as E
from aligncodec.codec.quant import registry as Q
from aligncodec.tools.eval.text import STREAM_CALIB_TOKENS

CALIB_MODES = ("quantized", "float", "none")
SCOPES = ("all", "linear")


@dataclass
class EncodeOptions:
    """What to encode to. Exactly one target: ``bpw`` (bits per parameter over the whole file,
    ``scope="all"``, or all-in bits per weight of the block linears, ``scope="linear"``) or
    ``distortion`` (the mean over the lossy tensors of the activation-weighted relative error
    tr(ΔW Σ ΔWᵀ) / tr(W Σ Wᵀ), in (0, 1))."""

    bpw: float | None = None
    scope: str = "all"
    distortion: float | None = None
    calibration: str = "float"  # measured: same KLD as "quantized", better perplexity, one forward pass
    candidates: tuple[str, ...] = E.DEFAULT_CANDIDATES
    alpha: float = 0.25
    seed: int = 0
    calib_tokens: int = STREAM_CALIB_TOKENS
    calib_text: str | None = None  # a file path
    window: int = 1024
    lossy_embeddings: bool | None = None  # None: True for scope "all" (and a distortion target), False for "linear"
    threads: int | None = None  # threads of the encode (None/0: every core, parallel.default_threads); the archive is the same for any count
    sample_rows: int = 64
    workers: int | None = None  # deprecated: the thread count when ``threads`` is not given
    device: str | None = None  # torch device of the calibration forward passes (None: cuda if present, else cpu)
    trellis: int = 0  # 0: mode 2 ecsq; else mode 4 tcq with this state machine (codec/quant/registry.py)
    nonfinite: str = "error"  # a lossy candidate holding NaN/Inf: NonFiniteError, or coded lossless ("lossless")
    # the output head's step (a tied embedding, or an untied lm_head) as a multiple of the blocks'
    # step; None: head.auto_head_step (whole-file scope; 1 in linear scope, where the head is not in the target)
    head_step: float | None = None
    # --tune-norms: an aligncodec.encode.tune.TuneOptions; the norms (and biases) are fitted after
    # the lossy tensors are coded and written with the fitted values (encode/tune.py)
    tune: object | None = None

    def __post_init__(self):
        E.check_target(self.bpw, self.distortion)  # TargetError: exactly one finite target in range
        if self.nonfinite not in ("error", "lossless"):
            raise ValueError(f"nonfinite must be 'error' or 'lossless', not {self.nonfinite!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"bpw scope must be one of {SCOPES}, got {self.scope!r}")
        if self.calibration not in CALIB_MODES:
            raise ValueError(f"calibration must be one of {CALIB_MODES}, got {self.calibration!r}")
        if self.calib_tokens < 1:
            raise ValueError("calib_tokens must be positive")
        for c in self.candidates:
            if c not in E.CANDIDATES:
                raise ValueError(f"unknown candidate {c!r}; choose from {', '.join(E.CANDIDATES)}")
        Q.by_trellis(self.trellis)  # ValueError for an unknown state-machine id
        if self.head_step is not None and not (self.head_step > 0 and math.isfinite(self.head_step)):
            raise ValueError(f"head step multiplier must be positive, got {self.head_step}")
        if self.lossy_embeddings is None:
            self.lossy_embeddings = self.scope == "all"
        for k in ("threads", "workers"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{k} must be a non-negative integer (0: every core), not {v!r}")

    @property
    def target(self) -> dict:
        """The target as recorded in the archive's summary."""
        if self.distortion is not None:
            return {"distortion": self.distortion}
        return {"bpw": self.bpw, "scope": self.scope}

    def rate_for_checks(self) -> float:
        """The bits per weight the disk-space check before any work assumes: the target, or 16
        for a distortion target."""
        return self.bpw if self.bpw is not None else 16.0

    def beyond_lossy(self) -> bool:
        """A bpw target beyond what lossy coding delivers: every tensor goes lossless."""
        return self.bpw is not None and self.bpw >= E.LOSSY_MAX_BPW

    def n_threads(self) -> int:
        """The encode's threads: ``threads`` (or the deprecated ``workers``) when given and
        non-zero, else every core (``ACZ_THREADS`` if set; :func:`parallel.default_threads`)."""
        from aligncodec.codec import parallel

        return (self.threads if self.threads is not None else self.workers) or parallel.default_threads()

    def fingerprint(self) -> dict:
        """What the archive bytes depend on (workers and device do not change them)."""
        d = asdict(self)
        for k in ("workers", "device", "threads"):
            d.pop(k)
        if self.calib_text:
            d["calib_text"] = hashlib.sha256(Path(self.calib_text).read_bytes()).hexdigest()
        if self.tune is not None:
            d["tune"] = {k: v for k, v in asdict(self.tune).items() if k != "threads"}
        if self.distortion is None:  # the fingerprint of a bpw target reads as before the distortion target
            d.pop("distortion")
        if self.tune is None:
            d.pop("tune")
        return json.loads(json.dumps(d))  # the form it has after a trip through the manifest


StreamOptions = EncodeOptions  # the name of the block-sequential encoder's options before 2026-12-08
