"""Validation after compile: reload the written model from disk and compare it with the FP16 source.

Perplexity of both models and the KL divergence of the EXL2 model's next-token distribution from the
source's, on calibration-style rows the quantizer never saw (:func:`held_out_rows`); then a cache check:
the EXL2 model scored with each KV cache mode as token-by-token decoding reads the cache, to recommend one
(:func:`recommend_cache`).  Each mode costs one forward pass over the row (runtime/onepass.py), not one per
token.

Any size: the FP16 source is never loaded whole. It runs one decoder layer at a time over the held-out rows
and the cache check's rows together (runtime/stream.py), keeping only the rows' final states and its head.
The EXL2 model is loaded whole when it fits in free memory (the cache check needs it so); when it does not,
its full-mode scoring is streamed the same way and the cache check is skipped, saying why.
"""
from __future__ import annotations

from pathlib import Path

import torch

from exl2.calibration import default_rows
from exl2.core.files import write_json_atomic
from exl2.core.threads import fit_threads
from exl2.runtime.cache import bytes_per_token
from exl2.runtime.evaluate import EvalConfig, evaluate_rows
from exl2.runtime.loader import ModelParts, load_model
from exl2.runtime.stream import STREAM_CHOICES, LayerProgress, fits, fmt_bytes, head_bytes, stream_forward

CACHE_MODES = ("fp16", "q8", "q6", "q4", "q4x", "q3x")   # q4x/q3x: exl2's own (runtime/kv_x.py)
EXLLAMAV2_CACHE_MODES = ("fp16", "q8", "q6", "q4")      # what ExLlamaV2 and TabbyAPI can run
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
            cache_rows: int = 1, cache_length: int = 256, stream: str = "auto",
            available: int | None = None, progress: LayerProgress | None = None) -> dict:
    """Perplexity of both models, KL(fp || quantized) per predicted token (mean, median, p99, quantiles) and
    top-1 agreement on ``rows``; then the cache check on the first ``cache_rows`` rows cut to
    ``cache_length`` tokens (``cache_rows=0`` skips it).

    The FP16 model is streamed (one decoder layer resident). ``stream`` decides the EXL2 model's full-mode
    scoring: ``auto`` streams it only when it does not fit (``available``: free bytes, default measured),
    ``always``/``never`` force it (``exl2_streamed`` is true when it was streamed); the cache check loads it
    whole (skipped, with ``cache_skipped`` saying why, when ``auto`` found that it does not fit).
    ``progress(layers done, layers)`` follows the streamed passes."""
    if stream not in STREAM_CHOICES:
        raise ValueError(f"stream mode {stream!r}: use one of {', '.join(STREAM_CHOICES)}")
    fp_parts = ModelParts(fp_dir, device=device)
    q_parts = ModelParts(q_dir, device=device)
    crow = rows[:cache_rows, :cache_length]
    sets = [rows] + ([crow] if cache_rows > 0 else [])
    q_fits, q_bytes, avail = fits(q_parts, rows.shape[1], beside=head_bytes(fp_parts), available=available)
    q_stream = stream == "always" or (stream == "auto" and not q_fits)
    # the FP16 source: the held-out rows and the cache rows in one pass over its layers
    ref_full, *ref_cache = stream_forward(fp_parts, sets, progress=progress)
    del fp_parts
    q = None if q_stream and (cache_rows == 0 or stream == "auto") else load_model(q_dir, device=device)
    scored = stream_forward(q_parts, [rows], progress=progress)[0] if q_stream else q
    full = evaluate_rows(scored, rows, [EvalConfig("full")], ref_model=ref_full)[0]
    del scored, ref_full
    kl = torch.tensor(full.kld, dtype=torch.float64)
    out = {"rows": int(rows.shape[0]), "length": int(rows.shape[1]), "tokens": full.tokens,
           "ppl_fp16": full.ref_ppl, "ppl_exl2": full.ppl, "kld_mean": full.kld_mean,
           "kld_median": full.kld_median, "kld_p99": full.kld_p99, "top1_agreement": full.top1,
           "kld_quantiles": torch.quantile(kl, torch.linspace(0, 1, KLD_QUANTILES + 1, dtype=torch.float64)).tolist()}
    if q_stream:                  # absent when the EXL2 model was loaded whole, as before streaming existed
        out["exl2_streamed"] = True
    if cache_rows > 0 and q is None:
        out["cache_skipped"] = (f"the EXL2 model needs about {fmt_bytes(q_bytes)} loaded whole and "
                                f"{fmt_bytes(avail)} is free; the cache check decodes with it resident")
    elif cache_rows > 0:
        out["cache"] = {}
        # exl2's own modes read the KV profile the converter writes before validating (exl2_kv.json); without
        # one they are left out rather than measured here (the profile's measurement is its own stage, with its
        # own memory, in the converter)
        from exl2.runtime.kv_calib import attach
        from exl2.runtime.kv_profile import PROFILE_FILE, KVProfile
        from exl2.runtime.kv_x import X_MODES, x_arch_error

        try:
            prof = KVProfile.load(q_dir, q.cfg)
        except ValueError as e:
            prof, why = None, str(e)
        else:
            why = x_arch_error(q.cfg) or f"no {PROFILE_FILE} in {q_dir}"
        if prof is not None:
            attach(q, prof)
        else:
            out["cache_x_skipped"] = why
        modes = [m for m in CACHE_MODES if m not in X_MODES or prof is not None]
        out["cache"] = _cache_check(q, crow, modes, ref_cache[0])
        out["recommended_cache"] = recommend_cache(out["cache"])
        out["recommended_cache_exllamav2"] = recommend_cache(out["cache"], EXLLAMAV2_CACHE_MODES)
    return out


def _cache_check(q, rows: torch.Tensor, modes: list[str], ref) -> dict:
    """Each cache mode's scores on ``rows`` as a token-by-token pass gives them (computed in one pass per mode
    and row, runtime/onepass.py); a mode that cannot hold this model (head size, fp16 range) gets ``error``
    instead."""
    from exl2.runtime.cache import mode_error

    fit_threads(force=True)          # a fresh look at the load: the passes below do not look again
    recs = {m: {"bytes_per_token": bytes_per_token(q.cfg, m), "rows": int(rows.shape[0]),
                "length": int(rows.shape[1])} for m in modes}
    ok = []
    for m in modes:
        why = mode_error(q.cfg, m)
        if why:
            recs[m]["error"] = why
        else:
            ok.append(m)
    ref_lps: list = []
    try:
        got = dict(zip(ok, evaluate_rows(q, rows, [EvalConfig("cache", m, 1, one_pass=True) for m in ok],
                                         ref_model=ref, ref_lps=ref_lps)))
    except ValueError:   # a mode failed while running (fp16 range): run them one by one to see which
        if len(ref_lps) != rows.shape[0]:
            ref_lps = []
        got = {}
        for m in ok:
            try:
                got[m] = evaluate_rows(q, rows, [EvalConfig("cache", m, 1, one_pass=True)],
                                       ref_model=None if ref_lps else ref, ref_lps=ref_lps)[0]
            except ValueError as e:
                recs[m]["error"] = str(e)
    for m, r in got.items():
        recs[m].update(ppl=r.ppl, kld_mean=r.kld_mean, kld_p99=r.kld_p99, top1=r.top1)
    return recs


def recommend_cache(cache: dict, modes=None) -> str:
    """The smallest cache mode (of ``modes``, default all in ``cache``) whose added KL divergence over the FP16
    cache stays within max(CACHE_KL_SHARE x the FP16-cache KL, CACHE_KL_FLOOR); "fp16" when none does.  Equal
    sizes: the mode listed first."""
    base = cache["fp16"]["kld_mean"]
    allowed = max(CACHE_KL_SHARE * base, CACHE_KL_FLOOR)
    ok = [m for m, r in cache.items() if (modes is None or m in modes) and "error" not in r
          and r["kld_mean"] - base <= allowed]
    return min(ok, key=lambda m: cache[m]["bytes_per_token"])


def write(path: Path, result: dict) -> None:
    write_json_atomic(path, result, indent=2)
