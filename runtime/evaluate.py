"""Perplexity and KL divergence of a model on token rows (docs/runtime.md section 3).

Two ways to score a row of L tokens, both predicting tokens 1..L-1 from positions 0..L-2:

- ``mode="full"``: one forward pass per row, no cache (the row's own K/V stay in the compute dtype).
- ``mode="cache"``: the row is fed through a KV cache of ``cache_mode`` in chunks of ``chunk`` tokens
  (default 1: token by token, as ExLlamaV2's ``-eq4/-eq6/-eq8`` evaluation), each chunk's logits scored as
  they come. Every past token then comes from the (possibly quantized) cache; a chunk's own K/V are used
  unquantized for its own attention (the runtime cache's semantics, docs/cache.md section 4), so only ``chunk=1``
  makes *every* attended token a cached one.

Log-probabilities are fp32 ``log_softmax`` of the logits. With a reference model, KL(ref || model) is computed
per predicted token over the whole vocabulary, the reference always run in full mode; the model runs once and
yields perplexity and KL divergence together. Memory: logits are held for one row (or one chunk) at a time,
never ``[R, L, V]``.

``evaluate_rows`` scores several (mode, cache) configurations in one sweep over the rows, so the reference
logits of a row are computed once for all of them.

Models larger than memory: the reference, and the model itself in full mode, can be a
:class:`~exl2.runtime.stream.StreamedModel` (the rows run through the checkpoint one decoder layer at a time
beforehand, see stream.py); its logits are the resident model's. Cache mode needs the model resident.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .cache import MODES as CACHE_MODES
from .cache import KVCache, MixedKVCache
from .model import Model
from .onepass import OnePassCache
from .stream import StreamedModel

MODES = ("full", "cache")

# Progress hook: called once per row and configuration scored, with the number of tokens just scored.
Progress = Callable[[int], None]


@dataclass
class EvalResult:
    """Scores of one (mode, cache_mode) configuration over all rows."""

    mode: str
    cache_mode: str | None  # None in full mode (no cache involved)
    rows: int
    length: int
    nll_sum: float = 0.0  # sum of -log p(token) over all predicted tokens (float64 accumulation)
    tokens: int = 0  # predicted tokens: rows * (length - 1)
    chunk: int | None = None  # cache mode: tokens fed per forward pass
    kld: list[float] | None = field(default=None, repr=False)  # per-token KL(ref || model), with a reference
    top1_hits: int = 0  # tokens where argmax(model) == argmax(ref), with a reference
    ref_nll_sum: float = 0.0  # the reference's own sum of -log p(token) on the same tokens, with a reference

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else float("nan")

    @property
    def ref_ppl(self) -> float | None:
        """The reference model's perplexity on the same tokens (None without a reference)."""
        return None if self.kld is None else (math.exp(self.ref_nll_sum / self.tokens) if self.tokens
                                              else float("nan"))

    def _kld_tensor(self) -> torch.Tensor | None:
        return None if not self.kld else torch.tensor(self.kld, dtype=torch.float64)

    @property
    def kld_mean(self) -> float | None:
        t = self._kld_tensor()
        return None if t is None else float(t.mean())

    @property
    def kld_median(self) -> float | None:
        t = self._kld_tensor()
        return None if t is None else float(t.median())  # lower median for an even count (torch's rule)

    @property
    def kld_p99(self) -> float | None:
        t = self._kld_tensor()
        return None if t is None else float(torch.quantile(t, 0.99))  # linear interpolation

    @property
    def top1(self) -> float | None:
        return None if self.kld is None else self.top1_hits / self.tokens

    def to_dict(self) -> dict:
        """The JSON record of exl2-eval (kld_* and top1 only with a reference)."""
        d = {"cache": self.cache_mode or "none", "mode": self.mode, "rows": self.rows, "length": self.length,
             "tokens": self.tokens, "ppl": self.ppl}
        if self.kld is not None:
            d.update(kld_mean=self.kld_mean, kld_median=self.kld_median, kld_p99=self.kld_p99, top1=self.top1)
        return d


@dataclass(frozen=True)
class EvalConfig:
    mode: str = "full"
    cache_mode: str = "fp16"
    chunk: int = 1
    # cache mode, chunk 1: the token-by-token pass computed in one forward pass per row (runtime/onepass.py;
    # the same logits up to rounding)
    one_pass: bool = False

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} not supported; use one of {', '.join(MODES)}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk <= 0:
            raise ValueError(f"chunk must be a positive integer, got {self.chunk!r}")
        if self.one_pass and (self.mode != "cache" or self.chunk != 1):
            raise ValueError(f"one_pass emulates cache mode with chunk 1, not mode {self.mode!r} chunk {self.chunk}")
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"cache mode {self.cache_mode!r} not supported; use one of {', '.join(CACHE_MODES)}")


def _check_rows(rows: torch.Tensor, model: Model | StreamedModel) -> torch.Tensor:
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"rows must be an integer tensor [R, L], got "
                         f"{getattr(rows, 'dtype', type(rows).__name__)} {tuple(getattr(rows, 'shape', ()))}")
    if rows.shape[0] == 0 or rows.shape[1] < 2:
        raise ValueError(f"rows {tuple(rows.shape)}: need at least one row of at least 2 tokens")
    lo, hi = int(rows.min()), int(rows.max())
    if lo < 0 or hi >= model.cfg.vocab_size:
        raise ValueError(f"rows: token id {lo if lo < 0 else hi} outside the model's vocabulary "
                         f"[0, {model.cfg.vocab_size})")
    return rows.long()


# Tokens scored at a time: each token's log-softmax and KL divergence are its own, so cutting a row into
# pieces changes no value and bounds the working set to a few [SCORE_CHUNK, V] fp32 tensors beside the row's
# logits (at a 152,064-token vocabulary a [512, V] tensor is 311 MB).
SCORE_CHUNK = 128


def _score(res: EvalResult, logits: torch.Tensor, targets: torch.Tensor, ref_lp: torch.Tensor | None) -> None:
    """Accumulate logits [N, V] (fp32) predicting targets [N] into res; ref_lp [N, V] reference log-probs."""
    for s in range(0, targets.shape[0], SCORE_CHUNK):
        e = min(s + SCORE_CHUNK, targets.shape[0])
        lp = torch.log_softmax(logits[s:e].float(), dim=-1)  # [n, V]
        nll = -lp.gather(-1, targets[s:e, None].to(lp.device))[:, 0]  # [n]
        res.nll_sum += float(nll.double().sum())
        res.tokens += e - s
        if ref_lp is not None:
            rl = ref_lp[s:e].to(lp.device)
            # KL(ref || model) = sum_v p_ref (log p_ref - log p_model); xlogy-style: p_ref = 0 terms vanish
            kl = (rl.exp() * (rl - lp)).sum(-1)  # [n]
            res.kld.extend(kl.clamp_min(0.0).tolist())  # rounding can give -1e-9 for identical distributions
            res.top1_hits += int((lp.argmax(-1) == rl.argmax(-1)).sum())


def _make_cache(model: Model, cfg: EvalConfig, length: int) -> KVCache:
    # "fp16" is stored in float16 whatever the compute dtype, mirroring ExLlamaV2's FP16 cache; on the fp32
    # CPU reference that makes it (slightly) lossy, like every real FP16 cache.
    store = torch.float16 if cfg.cache_mode == "fp16" else None
    return KVCache(model.cfg, length, mode=cfg.cache_mode, dtype=model.dtype, device=model.device,
                   storage_dtype=store)


def _full_logits(model: Model | StreamedModel, r: int, row: torch.Tensor) -> torch.Tensor:
    """Row r's full-mode logits [L, V] (fp32): a resident model's forward, or a streamed model's stored row."""
    if isinstance(model, StreamedModel):
        return model.logits(r)
    return model(row.to(model.device))[0]


def _one_pass_logits(model: Model, row: torch.Tensor, cache_mode: str) -> torch.Tensor:
    """Row [1, L]'s logits [L-1, V] as a token-by-token pass through a ``cache_mode`` cache gives them (the last
    token is not fed: it predicts nothing)."""
    L = row.shape[1]
    return model(row[:, :-1], OnePassCache(model.cfg, L - 1, mode=cache_mode, dtype=model.dtype,
                                           device=model.device))[0]


@torch.inference_mode()
def evaluate_rows(model: Model | StreamedModel, rows: torch.Tensor, configs: Sequence[EvalConfig] = (EvalConfig(),),
                  *, ref_model: Model | StreamedModel | None = None, ref_lps: list[torch.Tensor] | None = None,
                  progress: Progress | None = None) -> list[EvalResult]:
    """Score rows [R, L] under each configuration; with ref_model also KL(ref || model) and top-1 agreement.

    Rows are the outer loop: the reference's log-probs of a row are computed once (full mode) and shared by
    all configurations. ``ref_lps``: the reference's log-probs per row ([L-1, V] each, fp32) from an earlier
    call; an empty list is filled with them (so a caller can score several models, or the reference's own
    perplexity, without running the reference again); a full one replaces ``ref_model``.
    ``model`` and ``ref_model`` may be :class:`StreamedModel` s of these very rows (the model only for
    full-mode configurations). Returns one EvalResult per configuration, in order."""
    rows = _check_rows(rows, model)
    configs = list(configs)
    for c in configs:
        c.check()
    if isinstance(model, StreamedModel):
        model.check_rows(rows, "model")
        if any(c.mode == "cache" for c in configs):
            raise ValueError("cache mode needs the model resident (loaded whole); a streamed model scores full "
                             "mode only")
    given = bool(ref_lps)
    if given:
        if len(ref_lps) != rows.shape[0] or any(t.shape[0] != rows.shape[1] - 1 for t in ref_lps):
            raise ValueError(f"ref_lps: {len(ref_lps)} rows of {[tuple(t.shape) for t in ref_lps[:1]]} do not "
                             f"match rows {tuple(rows.shape)}")
        if ref_lps[0].shape[-1] != model.cfg.vocab_size:
            raise ValueError(f"reference vocabulary {ref_lps[0].shape[-1]} != model vocabulary {model.cfg.vocab_size}")
        ref_model = None
    elif ref_model is not None:
        _check_rows(rows, ref_model)
        if isinstance(ref_model, StreamedModel):
            ref_model.check_rows(rows, "reference")
        if ref_model.cfg.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"reference vocabulary {ref_model.cfg.vocab_size} != model vocabulary "
                             f"{model.cfg.vocab_size}")
    R, L = rows.shape
    results = [EvalResult(c.mode, c.cache_mode if c.mode == "cache" else None, R, L,
                          chunk=c.chunk if c.mode == "cache" else None,
                          kld=[] if ref_model is not None or given else None) for c in configs]
    caches: dict = {}
    groups = _cache_groups(model, configs, results)
    for r in range(R):
        row = rows[r:r + 1].to(model.device)  # [1, L]
        targets = rows[r, 1:]  # [L-1]
        ref_lp = ref_lps[r] if given else None
        if ref_model is not None:
            ref_lp = torch.log_softmax(_full_logits(ref_model, r, row)[:-1].float(), dim=-1)  # [L-1, V]
            if ref_lps is not None:
                ref_lps.append(ref_lp)
        if ref_lp is not None:
            ref_nll = -float(ref_lp.gather(-1, targets[:, None].to(ref_lp.device)).double().sum())
            for res in results:
                res.ref_nll_sum += ref_nll
        for c, res in zip(configs, results):
            if c.mode == "full" or c.one_pass:
                logits = _one_pass_logits(model, row, c.cache_mode) if c.one_pass else _full_logits(model, r, row)[:-1]
                _score(res, logits, targets, ref_lp)  # logits [L-1, V]
                del logits
                if progress is not None:
                    progress(L - 1)
        for group in groups:
            key = tuple(c for c, _ in group)
            cache = caches.get(key)
            if cache is None:
                made = [_make_cache(model, c, L) for c, _ in group]
                cache = caches[key] = made[0] if len(made) == 1 else MixedKVCache(made)
            cache.reset()
            chunk = group[0][0].chunk
            batch = row.expand(len(group), -1)  # one batch row per cache mode (MixedKVCache)
            for s in range(0, L - 1, chunk):  # the last token is never fed: it predicts nothing
                e = min(s + chunk, L - 1)
                logits = model(batch[:, s:e], cache)  # [modes, e-s, V]
                for b, (_, res) in enumerate(group):
                    _score(res, logits[b], targets[s:e], None if ref_lp is None else ref_lp[s:e])
                del logits
            if progress is not None:
                for _ in group:
                    progress(L - 1)
        del ref_lp
    return results


# Cache modes with the same chunk are scored in one batched pass (one batch row per mode) while their logits
# for one chunk stay under this many bytes: the modes share each step's weight reads and per-call overhead
# (each mode's own cache work remains; docs/decisions/0016 has the measured gain).
BATCH_LOGITS_BYTES = 256 << 20


def _cache_groups(model, configs: list[EvalConfig], results: list[EvalResult]) -> list[list]:
    """The cache-mode configurations as groups of (config, result) to run as one batch: same chunk, at most
    as many as BATCH_LOGITS_BYTES allows."""
    groups: list[list] = []
    for c, res in zip(configs, results):
        if c.mode != "cache" or c.one_pass:
            continue
        cap = max(1, BATCH_LOGITS_BYTES // (c.chunk * model.cfg.vocab_size * 4))
        g = next((g for g in groups if g[0][0].chunk == c.chunk and len(g) < cap), None)
        if g is None:
            groups.append([(c, res)])
        else:
            g.append((c, res))
    return groups


def perplexity(model: Model | StreamedModel, rows: torch.Tensor, mode: str = "full", cache_mode: str = "fp16",
               chunk: int = 1, *, progress: Progress | None = None) -> EvalResult:
    """Perplexity of rows [R, L]: exp of the mean NLL of tokens 1..L-1 over all rows (result.ppl,
    result.nll_sum, result.tokens)."""
    return evaluate_rows(model, rows, [EvalConfig(mode, cache_mode, chunk)], progress=progress)[0]


def kl_divergence(model: Model | StreamedModel, ref_model: Model | StreamedModel, rows: torch.Tensor,
                  mode: str = "full", cache_mode: str = "fp16", chunk: int = 1, *,
                  progress: Progress | None = None) -> EvalResult:
    """KL(ref || model) per predicted token (result.kld_mean / kld_median / kld_p99), top-1 agreement
    (result.top1) and the model's perplexity, from one pass of the model (the reference runs in full mode)."""
    return evaluate_rows(model, rows, [EvalConfig(mode, cache_mode, chunk)], ref_model=ref_model,
                         progress=progress)[0]


def prepend_bos(rows: torch.Tensor, bos_id: int) -> torch.Tensor:
    """ExLlamaV2's rows for `requires_bos` architectures: BOS, then the row's first L-1 tokens ([R, L])."""
    bos = torch.full((rows.shape[0], 1), bos_id, dtype=rows.dtype)  # [R, 1]
    return torch.cat([bos, rows[:, :-1]], dim=1)  # [R, L]


# ---------------------------------------------------------------------------------------------- whole run


def load_data_rows(model_dir, data, rows: int, length: int, *, bos: bool | None = None,
                   text_column: str | None = None) -> torch.Tensor:
    """Token rows [rows, length] of a txt/jsonl/parquet file with MODEL's tokenizer.json (the first
    rows x length tokens, as ExLlamaV2). bos None: a BOS starts every row when the architecture requires
    one (docs/runtime.md section 3: the row's first length-1 tokens follow it)."""
    from pathlib import Path

    from .loader import load_config
    from exl2.calibration.textrows import file_rows

    cfg = load_config(model_dir)
    r = file_rows(data, Path(model_dir) / "tokenizer.json", rows, length, text_column=text_column,
                  vocab_size=cfg.vocab_size)
    ids = r.input_ids
    if bos is None:
        bos = cfg.arch.requires_bos
    if bos:
        if cfg.bos_token_id is None:
            raise ValueError(f"{Path(model_dir) / 'config.json'}: no bos_token_id, but a BOS was asked for")
        ids = prepend_bos(ids, cfg.bos_token_id)
    return ids
