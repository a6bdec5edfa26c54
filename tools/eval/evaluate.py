"""Perplexity, bits per byte and KL divergence of a causal LM on the evaluation text.

Protocol (docs/evaluation.md):
  * the evaluation half of the text (``tools/eval/text.py``) is tokenized once, without special
    tokens; the first ``n_tokens`` tokens are scored;
  * disjoint windows of ``window`` (1024) positions: a BOS token, never scored, then up to
    ``window - 1`` text tokens; every text token is scored, predicted from BOS and the
    text tokens before it in its window (the last window may be shorter);
  * float32 logits, ``torch.set_num_threads(threads)`` fixed (default 2), eval mode,
    no dropout, no KV cache: the result is deterministic on a given machine;
  * ``nll_sum`` = Σ −ln p(token) over scored tokens (nats); perplexity = exp(nll_sum / n);
  * bits per byte = nll_sum / ln 2 / ``n_bytes``, where ``n_bytes`` is the number of UTF-8
    bytes of the source text span covered by the scored tokens (from the first scored
    token's start offset to the last one's end offset; the scored tokens are contiguous,
    so this is exactly the bytes of their text);
  * KL divergence, per scored position, of the model's next-token distribution Q from the
    reference model's P, KL(P‖Q) = Σ_v P(v) (ln P(v) − ln Q(v)) in nats, averaged over the
    scored positions (``kld_mean``; llama.cpp's convention).

KLD comes in two flavours, reported in ``kld_method``:
  * ``"exact"``: the reference model runs on the same window right after the model
    (``ref_model`` is a module): the full vocabulary, nothing stored beyond one window;
  * ``"topK"``: against ``ReferenceStats`` computed once (and cached on disk) from the
    reference model: for each position the top-K reference log-probs, their token ids and
    the log of the remaining mass.  The KL is then taken between the two distributions
    coarsened to {top-K tokens, "everything else"}: a lower bound of the exact KL (data
    processing inequality), equal to it when the reference's tail mass is ~0.  Cheap:
    the reference model does not run again, memory is n_tokens × K × 8 bytes.

Archives (``.acz``) are decoded into a model by the streaming loader
(:func:`aligncodec.loader.load_hf_model`); the tokenizer comes from the
archive's auxiliary files and the default KLD reference from its
``acz.source_model`` metadata.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aligncodec.formats.atomic import atomic_write

DEFAULT_WINDOW = 1024
DEFAULT_THREADS = 2
DEFAULT_TOPK = 256
ROW_CHUNK = 256  # rows of logits turned into log-probs at once (memory bound: ROW_CHUNK × vocab)


class EvalError(Exception):
    """Evaluation cannot run (too few tokens, no BOS token, mismatched reference)."""


class ArchiveNotSupportedError(NotImplementedError):
    """An .acz archive was given but the streaming loader is not wired in yet."""


# --------------------------------------------------------------------------- data


@dataclass
class EvalData:
    """The scored token stream cut into protocol windows."""

    windows: list[torch.Tensor]  # each int64 [L], BOS first
    n_tokens: int  # scored tokens = sum(L - 1)
    n_bytes: int
    bos_id: int
    split: str
    text_sha256: str
    window: int


_TOKEN_CACHE: dict[tuple, tuple[list[int], list[tuple[int, int]] | None, str]] = {}


def _bos_id(tokenizer) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    raise EvalError("tokenizer has neither a BOS nor an EOS token to open windows with")


def _tokenize(tokenizer, split: str, text: str | None = None):
    """Token ids and char offsets of a whole split (memoised per tokenizer and text)."""
    from aligncodec.tools.eval.text import get_text, sha256_text

    if text is None:
        text = get_text(split)
    sha = sha256_text(text)
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), type(tokenizer).__name__, sha)
    if key not in _TOKEN_CACHE:
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            offsets = [tuple(o) for o in enc["offset_mapping"]]
        except (NotImplementedError, TypeError, ValueError):
            enc = tokenizer(text, add_special_tokens=False, verbose=False)
            offsets = None
        _TOKEN_CACHE[key] = (list(enc["input_ids"]), offsets, text)
    ids, offsets, text = _TOKEN_CACHE[key]
    return ids, offsets, text, sha


def make_windows(tokenizer, n_tokens: int = 8192, split: str = "eval", window: int = DEFAULT_WINDOW,
            text: str | None = None) -> EvalData:
    """Cut the first ``n_tokens`` tokens of ``split`` into protocol windows.

    ``text`` overrides the split's text (tests use a tiny text).
    """
    if window < 2:
        raise EvalError("window must hold BOS and at least one token")
    if n_tokens < 1:
        raise EvalError("n_tokens must be positive")
    ids, offsets, text, sha = _tokenize(tokenizer, split, text)
    if n_tokens > len(ids):
        raise EvalError(f"the {split} text has only {len(ids)} tokens, {n_tokens} requested")
    bos = _bos_id(tokenizer)
    per = window - 1
    scored = ids[:n_tokens]
    windows = [torch.tensor([bos] + scored[i : i + per], dtype=torch.long) for i in range(0, n_tokens, per)]
    if offsets is not None:
        start, end = offsets[0][0], offsets[n_tokens - 1][1]
        n_bytes = len(text[start:end].encode("utf-8"))
    else:  # slow tokenizer without offsets: bytes of the decoded scored tokens
        n_bytes = len(tokenizer.decode(scored).encode("utf-8"))
    return EvalData(windows, n_tokens, n_bytes, bos, split, sha, window)


# --------------------------------------------------------------------------- maths


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """float32 next-token logits for positions 0..L-2 of one window: [L-1, V]."""
    out = model(input_ids=ids[None], use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0, :-1].float()


def _rest_logp(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """ln of the probability mass outside the columns ``idx`` (per row)."""
    masked = logp.scatter(1, idx, float("-inf"))
    return torch.logsumexp(masked, dim=1)


def _xdiff(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """p·(ln p − ln q) elementwise, 0 where p = 0."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))


@dataclass
class ReferenceStats:
    """Top-K reference log-probs per scored position (see module docstring)."""

    topk_logp: torch.Tensor  # float32 [n, K]
    topk_idx: torch.Tensor  # int64 [n, K]
    rest_logp: torch.Tensor  # float32 [n]: ln of the reference mass outside the top K
    target_logp: torch.Tensor  # float32 [n]: reference ln p(actual token)
    meta: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.topk_idx.shape[1])

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"topk_logp": self.topk_logp.contiguous(), "topk_idx": self.topk_idx.to(torch.int32).contiguous(),
                   "rest_logp": self.rest_logp.contiguous(), "target_logp": self.target_logp.contiguous()}
        meta = {k: str(v) for k, v in self.meta.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(t["topk_logp"], t["topk_idx"].long(), t["rest_logp"], t["target_logp"], meta)


def compute_reference_stats(ref_model, tokenizer, n_tokens: int = 8192, split: str = "eval",
                            topk: int = DEFAULT_TOPK, window: int = DEFAULT_WINDOW,
                            threads: int | None = DEFAULT_THREADS, progress: bool = True,
                            data: EvalData | None = None) -> ReferenceStats:
    """Run ``ref_model`` once over the protocol windows and keep its top-K log-probs."""
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)
    data = data or make_windows(tokenizer, n_tokens, split, window)
    ref_model.eval()
    parts = {"v": [], "i": [], "r": [], "t": []}
    with torch.inference_mode(), tqdm(total=data.n_tokens, unit="tok", desc="reference", disable=not progress,
                                      dynamic_ncols=True) as bar:
        for w in data.windows:
            lg = _logits(ref_model, w)
            tgt = w[1:]
            for a in range(0, lg.shape[0], ROW_CHUNK):
                lp = torch.log_softmax(lg[a : a + ROW_CHUNK], dim=-1)
                v, i = lp.topk(min(topk, lp.shape[1]), dim=1)
                parts["v"].append(v)
                parts["i"].append(i)
                parts["r"].append(_rest_logp(lp, i))
                parts["t"].append(lp.gather(1, tgt[a : a + ROW_CHUNK, None])[:, 0])
            bar.update(len(tgt))
    meta = {"n_tokens": data.n_tokens, "split": split, "window": window, "topk": topk,
            "text_sha256": data.text_sha256, "bos_id": data.bos_id}
    return ReferenceStats(torch.cat(parts["v"]), torch.cat(parts["i"]), torch.cat(parts["r"]),
                          torch.cat(parts["t"]), meta)


def reference_stats(ref: str, n_tokens: int = 8192, split: str = "eval", topk: int = DEFAULT_TOPK,
                    window: int = DEFAULT_WINDOW, threads: int | None = DEFAULT_THREADS,
                    progress: bool = True) -> ReferenceStats:
    """Reference stats of a named/path model, cached on disk keyed by its weights' sha256.

    Cache: ``$ALIGNCODEC_HOME/refstats/<name>-<sha16>/<split>-n<N>-w<W>-k<K>-<textsha12>.safetensors``
    (tensors ``topk_logp``, ``topk_idx``, ``rest_logp``, ``target_logp``; metadata as ``meta``).
    """
    from aligncodec.tools.eval.models import cache_root, load_causal_lm, model_identity
    from aligncodec.tools.eval.text import text_sha256

    ident = model_identity(ref)
    tag = Path(ident["name"]).name
    path = (cache_root() / "refstats" / f"{tag}-{ident['weights_sha256'][:16]}" /
            f"{split}-n{n_tokens}-w{window}-k{topk}-{text_sha256(split)[:12]}.safetensors")
    if path.is_file():
        st = ReferenceStats.load(path)
        if st.meta.get("weights_sha256") == ident["weights_sha256"]:
            return st
    model, tok = load_causal_lm(ref)
    st = compute_reference_stats(model, tok, n_tokens, split, topk, window, threads, progress)
    st.meta.update({"model": ident["name"], "weights_sha256": ident["weights_sha256"]})
    st.save(path)
    return st


# --------------------------------------------------------------------------- evaluate


def evaluate(model, tokenizer, n_tokens: int = 8192, ref_model=None, split: str = "eval",
             window: int = DEFAULT_WINDOW, threads: int | None = DEFAULT_THREADS, progress: bool = True,
             text: str | None = None, label: str | None = None) -> dict:
    """Evaluate ``model`` (an in-memory causal LM) by the protocol; returns a JSON-able dict.

    ``ref_model``: None (no KLD), a module (exact KLD, run window by window beside the
    model), or a ``ReferenceStats`` (top-K KLD, reference not run again).  The reference
    must share the tokenizer.  ``text`` replaces the split's text (tests).
    """
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)
    data = make_windows(tokenizer, n_tokens, split, window, text=text)
    model.eval()
    stats = ref_model if isinstance(ref_model, ReferenceStats) else None
    ref_mod = ref_model if isinstance(ref_model, torch.nn.Module) else None
    if ref_model is not None and stats is None and ref_mod is None:
        raise EvalError(f"ref_model must be a module or ReferenceStats, not {type(ref_model).__name__}")
    if stats is not None:
        if stats.topk_idx.shape[0] < data.n_tokens:
            raise EvalError(f"reference stats cover {stats.topk_idx.shape[0]} tokens, {data.n_tokens} needed")
        if stats.meta.get("text_sha256") not in (None, data.text_sha256) or \
                int(stats.meta.get("window", window)) != window:
            raise EvalError("reference stats were computed on another text or window")
        ref_mod = None
    if ref_mod is not None:
        ref_mod.eval()

    nll = 0.0
    ref_nll = 0.0
    kl_sum = 0.0
    kl_max = 0.0
    pos = 0
    t0 = time.perf_counter()
    with torch.inference_mode(), tqdm(total=data.n_tokens, unit="tok", desc=label or "eval",
                                      disable=not progress, dynamic_ncols=True) as bar:
        for w in data.windows:
            lg = _logits(model, w)
            rlg = _logits(ref_mod, w) if ref_mod is not None else None
            if rlg is not None and rlg.shape != lg.shape:
                raise EvalError(f"reference logits {tuple(rlg.shape)} do not match the model's {tuple(lg.shape)}")
            tgt = w[1:]
            for a in range(0, lg.shape[0], ROW_CHUNK):
                b = min(a + ROW_CHUNK, lg.shape[0])
                lq = torch.log_softmax(lg[a:b], dim=-1)
                t = tgt[a:b, None]
                nll -= lq.gather(1, t).double().sum().item()
                if rlg is not None:
                    lp = torch.log_softmax(rlg[a:b], dim=-1)
                    ref_nll -= lp.gather(1, t).double().sum().item()
                    kl = _xdiff(lp, lq).sum(dim=1)
                elif stats is not None:
                    s = slice(pos + a, pos + b)
                    idx = stats.topk_idx[s]
                    lp_k = stats.topk_logp[s]
                    lp_r = stats.rest_logp[s]
                    lq_k = lq.gather(1, idx)
                    lq_r = _rest_logp(lq, idx)
                    kl = _xdiff(lp_k, lq_k).sum(dim=1) + _xdiff(lp_r, lq_r)
                    ref_nll -= stats.target_logp[s].double().sum().item()
                else:
                    kl = None
                if kl is not None:
                    kl_sum += kl.double().sum().item()
                    kl_max = max(kl_max, kl.max().item())
            pos += len(tgt)
            bar.update(len(tgt))
    secs = time.perf_counter() - t0
    n = data.n_tokens
    has_ref = ref_mod is not None or stats is not None
    res = {
        "model": label,
        "split": split,
        "n_tokens": n,
        "n_windows": len(data.windows),
        "window": window,
        "n_bytes": data.n_bytes,
        "nll_sum_nats": nll,
        "nll_mean_nats": nll / n,
        "perplexity": math.exp(nll / n),
        "bits_per_byte": nll / math.log(2) / data.n_bytes,
        "kld_mean": kl_sum / n if has_ref else None,
        "kld_max": kl_max if has_ref else None,
        "kld_method": ("exact" if ref_mod is not None else f"top{stats.k}") if has_ref else None,
        "ref_perplexity": math.exp(ref_nll / n) if has_ref else None,
        "text_sha256": data.text_sha256,
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "seconds": secs,
        "tokens_per_s": n / secs if secs > 0 else None,
    }
    return res


# --------------------------------------------------------------------------- CLI helpers


def _load_archive(path: Path):
    """Decode an .acz archive into ``(model, tokenizer)`` through the streaming loader
    (the model is built from the archive's own config.json and filled tensor by
    tensor; the tokenizer comes from the archive's auxiliary files)."""
    import tempfile

    from transformers import AutoTokenizer

    from aligncodec.archive import extract_aux_files
    from aligncodec.loader import load_hf_model

    model = load_hf_model(path, device="cpu", dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        files = extract_aux_files(path, d)
        if not any(f.name.startswith("tokenizer") for f in files):
            raise ArchiveNotSupportedError(f"{path}: the archive carries no tokenizer files")
        tok = AutoTokenizer.from_pretrained(d)
    return model, tok


def load_model_for_eval(name_or_path: str):
    """``(model, tokenizer)`` from a cached name, a folder, a .safetensors file or an archive."""
    from aligncodec.tools.eval.models import load_causal_lm

    if str(name_or_path).endswith(".acz"):
        return _load_archive(Path(name_or_path))
    return load_causal_lm(name_or_path)


_IGNORED_CONFIG_KEYS = {"_name_or_path", "_model_name_or_path", "dtype", "torch_dtype", "transformers_version",
                        "quantization_config", "architectures", "use_cache"}


def default_reference(name_or_path: str) -> str | None:
    """The unmodified reference model that ``name_or_path`` was derived from, if known
    (:func:`find_reference` without its reason)."""
    return find_reference(name_or_path)[0]


def find_reference(name_or_path: str) -> tuple[str | None, str | None]:
    """``(reference, why none)``: the unmodified reference model that ``name_or_path`` was
    derived from, or None and a reason (None for a reference model itself, which has none).

    An archive: the reference model its writer recorded (metadata ``acz.source_model``: the
    input was a cached reference model or a copy of its weights). A folder or file: safetensors
    metadata key ``aligncodec.base_model`` (or ``base_model``) naming a known model, else the
    one cached reference model whose config.json equals this folder's (ignoring names, dtype
    and versions).
    """
    from aligncodec.tools.eval import models as M

    s = str(name_or_path)
    if s in M.MODELS:
        return None, None
    if s.endswith(".acz"):  # the writer records the reference model it compressed
        from aligncodec.formats.reader import ArchiveReader

        with ArchiveReader(s) as r:
            name = r.metadata.get("acz.source_model")
        if name in M.MODELS:
            return name, None
        if name:
            return None, f"the archive names its source {name!r}, which is not a known reference model"
        return None, ("the archive does not record a reference model (its writer records one when the input is a "
                      "cached reference model or a copy of its weights)")
    path = M.resolve_model(s)
    try:
        from safetensors import safe_open

        with safe_open(str(M.weights_file(path)), "pt") as f:
            meta = f.metadata() or {}
        for key in ("aligncodec.base_model", "base_model"):
            if meta.get(key) in M.MODELS:
                return meta[key], None
    except Exception:  # noqa: BLE001 - metadata is optional
        pass
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return None, "the model has no config.json to match against the cached reference models"
    strip = lambda c: {k: v for k, v in c.items() if k not in _IGNORED_CONFIG_KEYS}  # noqa: E731
    mine = strip(json.loads(cfg_path.read_text()))
    matches = []
    for name, spec in M.MODELS.items():
        cand = M.model_dir(name) / "config.json"
        if spec.causal_lm and cand.is_file() and strip(json.loads(cand.read_text())) == mine:
            matches.append(name)
    if len(matches) == 1:
        return matches[0], None
    if matches:
        return None, f"its config matches several cached reference models ({', '.join(matches)})"
    return None, "no safetensors metadata names its base model and no cached reference model has its config"


def format_table(res: dict) -> str:
    rows = [
        ("model", res.get("model")),
        ("reference", res.get("ref")),
        ("split / tokens", f"{res['split']} / {res['n_tokens']} ({res['n_windows']} windows of {res['window']})"),
        ("UTF-8 bytes scored", res["n_bytes"]),
        ("perplexity", f"{res['perplexity']:.4f}"),
        ("bits per byte", f"{res['bits_per_byte']:.5f}"),
    ]
    if res.get("kld_mean") is not None:
        rows += [
            (f"KLD mean ({res['kld_method']})", f"{res['kld_mean']:.6f} nats"),
            ("KLD max", f"{res['kld_max']:.4f} nats"),
            ("reference perplexity", f"{res['ref_perplexity']:.4f}"),
        ]
    rows += [("threads / dtype", f"{res['threads']} / {res['dtype']}"),
             ("time", f"{res['seconds']:.1f} s ({res['tokens_per_s']:.0f} tok/s)")]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows if v is not None)
