"""Real-model tier: SmolLM2-135M-Instruct (fixture `smollm2_dir`, tests/conftest.py) vs transformers."""
import time
from pathlib import Path

import pytest
import torch
from exl2.runtime.generate import TextTokenizer, generate
from exl2.runtime.loader import load_model

TEXT = Path(__file__).resolve().parents[2] / "fixtures" / "data" / "persuasion.txt"
N_TOKENS = 1024  # predicted tokens (1025 fed)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return Path(smollm2_dir), load_model(smollm2_dir)


def _nll(logits, ids):
    lp = logits[0, :-1].float().log_softmax(-1)  # [T-1, V]
    return -lp.gather(-1, ids[0, 1:, None]).mean().item()


def test_perplexity_and_speed_vs_transformers(smol):
    from transformers import AutoModelForCausalLM

    d, m = smol
    tok = TextTokenizer(d)
    ids = torch.tensor([tok.encode(TEXT.read_text(encoding="utf-8"))[:N_TOKENS + 1]])  # [1, 1025]
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    t_ours, t_hf = [], []
    with torch.inference_mode():
        for _ in range(2):  # best of 2: the first call warms allocator and thread pool
            t = time.perf_counter()
            ours = m(ids)
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            theirs = ref(ids).logits
            t_hf.append(time.perf_counter() - t)
    ppl_ours, ppl_hf = (torch.tensor(_nll(x, ids)).exp().item() for x in (ours, theirs))
    n = ids.shape[1]
    print(f"\nSmolLM2-135M, {N_TOKENS} tokens of persuasion.txt: ppl ours {ppl_ours:.4f}, transformers {ppl_hf:.4f}; "
          f"max |dlogit| {(ours - theirs).abs().max().item():.3g}; full-row forward ours {n / min(t_ours):.0f} tok/s, "
          f"transformers fp32 {n / min(t_hf):.0f} tok/s (ratio {min(t_hf) / min(t_ours):.2f}, "
          f"{torch.get_num_threads()} threads)")
    # Measured: identical to the last digit (max |dlogit| 0: same fp32 ops in the same order). The bound
    # is the 0.1%, kept loose so a different SDPA/BLAS path on another machine still passes.
    assert abs(ppl_ours / ppl_hf - 1) < 1e-3
    assert 20 < ppl_ours < 50  # ~31 here (FIXTURES.md: 33.2 at ctx 1024 over 20k tokens)


def test_chat_answer(smol):
    d, m = smol
    tok = TextTokenizer(d)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? "
                                                                  "Answer in one sentence."}])
    for mode in ("fp16", "q8", "q4"):
        out = generate(m, tok.encode(prompt), max_new_tokens=30, stop_ids=[tok.eos_token_id], cache_mode=mode)
        assert out[-1] == tok.eos_token_id, mode
        assert tok.decode(out) == "The capital of France is Paris.", mode
