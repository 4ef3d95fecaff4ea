"""Sampling, the generation loop, tokenizer and chat template."""
import json

import pytest
import torch
from exl2.runtime.generate import (
    SamplingParams,
    TextTokenizer,
    generate,
    prefill,
    sample_next,
)
from exl2.runtime.loader import load_model

PROMPT = [5, 17, 250, 3, 99, 400, 12]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, tiny_builder):
    d = tiny_builder("qwen2", tmp_path_factory.mktemp("gen") / "qwen2", seed=3)
    return d, load_model(d)


def test_greedy_matches_transformers(qwen2):
    from transformers import AutoModelForCausalLM

    d, m = qwen2
    ours = generate(m, PROMPT, max_new_tokens=24)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        hf = ref.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    assert ours == hf[0, len(PROMPT):].tolist()


def test_chunked_prefill_same_tokens(qwen2):
    _, m = qwen2
    a = generate(m, PROMPT * 5, max_new_tokens=12)
    b = generate(m, PROMPT * 5, max_new_tokens=12, chunk_size=4)
    assert a == b


def test_prefill_chunks_equal_one_pass(qwen2):
    from exl2.runtime.cache import KVCache

    _, m = qwen2
    ids = torch.tensor([PROMPT * 3])
    with torch.no_grad():
        full = m(ids)[:, -1]
        c = KVCache(m.cfg, 32)
        last = prefill(m, ids, c, chunk_size=5)
    assert c.past_len == 21
    assert (last - full).abs().max().item() < 5e-5  # same bound as test_runtime_model.CACHE_ATOL


def test_stop_token_and_callback(qwen2):
    _, m = qwen2
    free = generate(m, PROMPT, max_new_tokens=10)
    stop = free[4]
    k = free.index(stop)  # first occurrence
    assert generate(m, PROMPT, max_new_tokens=10, stop_ids=[stop]) == free[:k + 1]
    seen = []
    out = generate(m, PROMPT, max_new_tokens=10, on_token=lambda t, s: seen.append(t) or len(seen) == 3)
    assert out == free[:3] and seen == free[:3]


def test_quantized_cache_generation_runs(qwen2):
    _, m = qwen2
    out = generate(m, PROMPT, max_new_tokens=8, cache_mode="q8")
    assert len(out) == 8


def test_sampling_seeded_and_degenerate_cases(qwen2):
    _, m = qwen2
    greedy = generate(m, PROMPT, max_new_tokens=10)
    p = SamplingParams(temperature=1.0)
    a = generate(m, PROMPT, max_new_tokens=10, params=p, seed=1)
    assert a == generate(m, PROMPT, max_new_tokens=10, params=p, seed=1)
    assert a != greedy  # near-uniform-ish random model: sampling at T=1 departs from greedy
    assert generate(m, PROMPT, max_new_tokens=10, params=SamplingParams(temperature=1.0, top_k=1), seed=2) == greedy
    assert generate(m, PROMPT, max_new_tokens=10, params=SamplingParams(temperature=1.0, top_p=1e-6),
                    seed=3) == greedy


def _freqs(logits, params, n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(logits))
    for _ in range(n):
        counts[sample_next(torch.tensor(logits), None, params, g)] += 1
    return counts / n


def test_temperature_distribution():
    logits = [1.0, 0.0, -1.0, 0.5]
    for temp in (0.5, 2.0):
        f = _freqs(logits, SamplingParams(temperature=temp))
        p = torch.softmax(torch.tensor(logits) / temp, 0)
        # binomial std at n=4000 is <= 0.008; 5 sigma
        assert (f - p).abs().max().item() < 0.04, (temp, f, p)


def test_top_k_top_p_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).tolist()
    assert set(_freqs(logits, SamplingParams(temperature=1.0, top_k=2), n=500).nonzero().flatten().tolist()) == {0, 1}
    # top_p: smallest prefix whose mass reaches p. 0.79 -> {0, 1}; 0.81 -> {0, 1, 2}
    assert set(_freqs(logits, SamplingParams(temperature=1.0, top_p=0.79), n=500).nonzero().flatten().tolist()) == {0, 1}
    assert set(_freqs(logits, SamplingParams(temperature=1.0, top_p=0.81), n=800).nonzero().flatten().tolist()) == {0, 1, 2}
    f = _freqs(logits, SamplingParams(temperature=1.0, top_p=0.79))
    assert abs(f[0].item() - 0.5 / 0.8) < 0.04  # renormalised over the kept set


def test_repetition_penalty():
    logits = torch.tensor([3.0, 2.0, -1.0, -1.5])
    assert sample_next(logits, None, SamplingParams()) == 0
    # seen token 0: 3.0 / 2 = 1.5 < 2.0 -> token 1 wins
    assert sample_next(logits, torch.tensor([0]), SamplingParams(repetition_penalty=2.0)) == 1
    # negative logits are multiplied: -1.0 * 2 = -2 < -1.5
    assert sample_next(torch.tensor([-1.0, -1.5]), torch.tensor([0]), SamplingParams(repetition_penalty=2.0)) == 1


def test_invalid_params(qwen2):
    _, m = qwen2
    with pytest.raises(ValueError, match="invalid sampling"):
        generate(m, PROMPT, max_new_tokens=2, params=SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="empty prompt"):
        generate(m, [], max_new_tokens=2)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The capital of France is Paris. Hello world, héllo wörld! 你好"] * 50
    tok.train_from_iterator(text, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": {"content": "<|im_end|>"}, "chat_template": CHATML}))
    return d


def test_tokenizer_roundtrip_and_specials(tok_dir):
    t = TextTokenizer(tok_dir)
    ids = t.encode("Hello world, 你好")
    assert t.decode(ids) == "Hello world, 你好"
    assert t.eos_token == "<|im_end|>" and t.eos_token_id == 2
    assert t.bos_token_id is None
    with pytest.raises(ValueError, match="bos_token"):
        t.encode("x", add_bos=True)


def test_chat_template(tok_dir):
    t = TextTokenizer(tok_dir)
    s = t.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert s == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = t.encode(s)
    assert ids[0] == 1 and 2 in ids  # special tokens recognised as single ids


def test_chat_template_jinja_file_and_missing(tok_dir, tmp_path):
    import shutil

    d = tmp_path / "t"
    shutil.copytree(tok_dir, d)
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] | upper }}")
    assert TextTokenizer(d).apply_chat_template([{"role": "user", "content": "hi"}]) == "HI"
    (d / "chat_template.jinja").unlink()
    (d / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no chat template"):
        TextTokenizer(d).apply_chat_template([])


def test_streaming_pieces_concatenate_to_decode(qwen2, tok_dir):
    _, m = qwen2
    t = TextTokenizer(tok_dir)  # vocab 400 < model vocab 512: ids >= 400 decode to nothing
    pieces = []
    out = generate(m, PROMPT, max_new_tokens=16, tokenizer=t, on_token=lambda tok, s: pieces.append(s),
                   params=SamplingParams(temperature=1.0), seed=0)
    assert "".join(pieces) == t.decode(out)
