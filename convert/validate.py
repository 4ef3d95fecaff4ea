"""Validation after compile: reload the written model from disk and compare it with the FP16 source.

Perplexity of both models and the KL divergence of the EXL2 model's next-token distribution from the
source's, on calibration-style rows the quantizer never saw (:func:`held_out_rows`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from exl2.calibration import default_rows
from exl2.runtime.loader import load_model

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


def compare(fp_dir: str | Path, q_dir: str | Path, rows: torch.Tensor, device="cpu") -> dict:
    """Perplexity of both models and KL(fp || quantized), mean over all predicted tokens."""
    fp = load_model(fp_dir, device=device)
    q = load_model(q_dir, device=device)
    nll_fp = nll_q = kl = 0.0
    top1 = count = 0
    with torch.no_grad():
        for ids in rows:
            ids = ids.unsqueeze(0)
            target = ids[0, 1:].to(device)
            lp_fp = F.log_softmax(fp(ids)[0, :-1].float(), dim=-1)     # [L-1, V]
            lp_q = F.log_softmax(q(ids)[0, :-1].float(), dim=-1)
            nll_fp -= float(lp_fp.gather(1, target[:, None]).sum())
            nll_q -= float(lp_q.gather(1, target[:, None]).sum())
            kl += float((lp_fp.exp() * (lp_fp - lp_q)).sum())
            top1 += int((lp_fp.argmax(-1) == lp_q.argmax(-1)).sum())
            count += target.numel()
    return {"rows": int(rows.shape[0]), "length": int(rows.shape[1]), "tokens": count,
            "ppl_fp16": math.exp(nll_fp / count), "ppl_exl2": math.exp(nll_q / count),
            "kld_mean": kl / count, "top1_agreement": top1 / count}


def write(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
