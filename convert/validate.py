"""Validation after compile: reload the written model from disk and compare it with the FP16 source.

Perplexity of both models and the KL divergence of the EXL2 model's next-token distribution from the
source's, on calibration-style rows the quantizer never saw (:func:`held_out_rows`); then a cache check:
the EXL2 model decoding token by token with each KV cache mode, to recommend one (:func:`recommend_cache`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from exl2.calibration import default_rows
from exl2.runtime.cache import bytes_per_token
from exl2.runtime.evaluate import EvalConfig, evaluate_rows
from exl2.runtime.loader import load_model

CACHE_MODES = ("fp16", "q8", "q6", "q4")
# A cache mode is recommended when the KL divergence it adds on top of the FP16 cache is at most this share
# of what the weight quantization already costs (or CACHE_KL_FLOOR nats/token, whichever is larger).
CACHE_KL_SHARE = 0.1
CACHE_KL_FLOOR = 0.005
KLD_QUANTILES = 20   # the per-token KL distribution is kept as this many + 1 quantiles (for the card's plot)

SKIP_CATEGORIES = ("random", "multilingual_shuffled")   # seeded rows: not guaranteed unseen


def held_out_rows(tokenizer_json: Path, used: torch.Tensor, n: int, length: int, bos_id, vocab_size) -> torch.Tensor:
    """``n`` rows of the default mix that are not among the rows ``used`` for calibration.

    Text rows are consecutive windows of each category's stream, so a larger draw contains the smaller one
    and its extra windows come later in the text; rows equal to a used row are dropped.
    """
    used_set = {tuple(r.tolist()) for r in used}
    total = used.shape[0] + 4 * n
    rows = default_rows(tokenizer_json, rows=total, length=length, bos_id=bos_id, vocab_size=vocab_size)
    out = [r for r, cat in zip(rows.input_ids, rows.categories)
           if cat not in SKIP_CATEGORIES and tuple(r.tolist()) not in used_set]
    if not out:
        raise ValueError("validation: the default mix has no held-out rows at this length")
    # Spread the choice over the categories instead of taking the first n (all prose).
    step = max(1, len(out) // n)
    return torch.stack(out[::step][:n])


def compare(fp_dir: str | Path, q_dir: str | Path, rows: torch.Tensor, device="cpu", *,
            cache_rows: int = 1, cache_length: int = 256) -> dict:
    """Perplexity of both models, KL(fp || quantized) per predicted token (mean, median, p99, quantiles) and
    top-1 agreement on ``rows``; then the cache check on the first ``cache_rows`` rows cut to
    ``cache_length`` tokens (``cache_rows=0`` skips it)."""
    fp = load_model(fp_dir, device=device)
    q = load_model(q_dir, device=device)
    full = evaluate_rows(q, rows, [EvalConfig("full")], ref_model=fp)[0]     # the FP16 model runs once per row
    kl = torch.tensor(full.kld, dtype=torch.float64)
    out = {"rows": int(rows.shape[0]), "length": int(rows.shape[1]), "tokens": full.tokens,
           "ppl_fp16": full.ref_ppl, "ppl_exl2": full.ppl, "kld_mean": full.kld_mean,
           "kld_median": full.kld_median, "kld_p99": full.kld_p99, "top1_agreement": full.top1,
           "kld_quantiles": torch.quantile(kl, torch.linspace(0, 1, KLD_QUANTILES + 1, dtype=torch.float64)).tolist()}
    if cache_rows > 0:
        crow = rows[:cache_rows, :cache_length]
        out["cache"] = {}
        for m in CACHE_MODES:
            rec = {"bytes_per_token": bytes_per_token(q.cfg, m), "rows": int(crow.shape[0]),
                   "length": int(crow.shape[1])}
            try:
                r = evaluate_rows(q, crow, [EvalConfig("cache", m, 1)], ref_model=fp)[0]
                rec.update(ppl=r.ppl, kld_mean=r.kld_mean, kld_p99=r.kld_p99, top1=r.top1)
            except ValueError as e:   # the mode cannot hold this model (head size, fp16 range): say so
                rec["error"] = str(e)
            out["cache"][m] = rec
        out["recommended_cache"] = recommend_cache(out["cache"])
    return out


def recommend_cache(cache: dict) -> str:
    """The smallest cache mode whose added KL divergence over the FP16 cache stays within
    max(CACHE_KL_SHARE x the FP16-cache KL, CACHE_KL_FLOOR); "fp16" when none does."""
    base = cache["fp16"]["kld_mean"]
    allowed = max(CACHE_KL_SHARE * base, CACHE_KL_FLOOR)
    ok = [m for m, r in cache.items() if "error" not in r and r["kld_mean"] - base <= allowed]
    return min(ok, key=lambda m: cache[m]["bytes_per_token"])


def write(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
