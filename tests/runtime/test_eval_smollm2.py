"""Real-model tier: perplexity of SmolLM2-135M on held-out text vs transformers, and the cache sweep."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from exl2.runtime import cli
from exl2.runtime.evaluate import load_data_rows, perplexity
from exl2.runtime.loader import load_model

TEXT = Path(__file__).resolve().parents[2] / "fixtures" / "data" / "persuasion.txt"
ROWS, LENGTH = 2, 512

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    d = Path(smollm2_dir)
    return d, load_data_rows(d, TEXT, ROWS, LENGTH)  # [2, 512], BOS first (Llama requires_bos)


def test_full_mode_perplexity_matches_transformers(smol):
    from transformers import AutoModelForCausalLM

    d, rows = smol
    assert rows[:, 0].tolist() == [1, 1]  # SmolLM2's BOS <|im_start|>... id 1 per config.json
    ours = perplexity(load_model(d), rows)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    nll, n = 0.0, 0
    with torch.inference_mode():
        for r in range(ROWS):
            lp = ref(rows[r:r + 1]).logits[0, :-1].float().log_softmax(-1)  # [L-1, V]
            nll += -lp.gather(-1, rows[r, 1:, None]).double().sum().item()
            n += LENGTH - 1
    ppl_hf = torch.tensor(nll / n).exp().item()
    print(f"\nSmolLM2-135M, persuasion.txt {ROWS} x {LENGTH}: full-mode ppl ours {ours.ppl:.4f}, "
          f"transformers fp32 {ppl_hf:.4f}")
    assert ours.tokens == n
    # the bound; measured identical to ~1e-6 (same fp32 ops)
    assert abs(ours.ppl / ppl_hf - 1) < 1e-3


def test_cache_sweep_table(smol, tmp_path):
    """exl2-eval's cache sweep on the real model. Chunks of 64 tokens keep this test to minutes on 2 CPU
    cores (token by token, --chunk 1, took ~20 min; numbers for both are in the issue). Targets from the
    issue, relative to the FP16 cache: Q8 within 0.2%, Q6 within 1%, Q4 within 8%."""
    d, _ = smol
    t = time.perf_counter()
    args = cli.EvalArgs(model_dir=d, data=TEXT, rows=ROWS, length=LENGTH, caches=("fp16", "q8", "q6", "q4"),
                        modes=("cache",), chunk=64, progress=False)
    recs = cli.run_eval(args)
    print(f"\n{cli.format_table(recs)}\n({time.perf_counter() - t:.0f} s, chunk 64)")
    ppl = {r["cache"]: r["ppl"] for r in recs}
    assert 20 < ppl["fp16"] < 60
    assert abs(ppl["q8"] / ppl["fp16"] - 1) < 0.002
    assert abs(ppl["q6"] / ppl["fp16"] - 1) < 0.01
    assert abs(ppl["q4"] / ppl["fp16"] - 1) < 0.08
