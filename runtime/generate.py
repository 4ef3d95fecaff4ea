"""Tokenizer, sampling and the generation loop (chunked prefill, then one token per step)."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import KVCache
from .model import Model

# ---------------------------------------------------------------------------------------------- tokenizer

def _token_text(tok) -> str | None:
    """tokenizer_config.json writes special tokens as "text" or {"content": "text", ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class TextTokenizer:
    """tokenizer.json (via `tokenizers`) plus tokenizer_config.json's special tokens and chat template."""

    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer

        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (only tokenizer.json is supported)")
        self.tok = Tokenizer.from_file(str(path))
        tc_path = d / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
        self.bos_token = _token_text(tc.get("bos_token"))
        self.eos_token = _token_text(tc.get("eos_token"))
        self.bos_token_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template = _chat_template(d, tc)

    def encode(self, text: str, *, add_special_tokens: bool = False, add_bos: bool = False) -> list[int]:
        """add_special_tokens runs tokenizer.json's post-processor (e.g. Llama's BOS); add_bos prepends
        bos_token_id unless already first."""
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos: tokenizer_config.json names no bos_token")
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json / chat_template.jinja)")
        return _render(self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
                       bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _chat_template(d: Path, tc: dict) -> str | None:
    jinja_file = d / "chat_template.jinja"  # transformers >= 4.43 may save it separately
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    t = tc.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {x.get("name"): x.get("template") for x in t}
        t = named.get("default") or next(iter(named.values()), None)
    return t


def _render(template: str, **kw) -> str:
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2 (pip install jinja2)") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(**kw)


# ---------------------------------------------------------------------------------------------- sampling

@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; HF rule: logit/p if > 0 else logit*p, over seen tokens

    def check(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"invalid sampling parameters {self}")


def sample_next(logits: torch.Tensor, seen: torch.Tensor | None, params: SamplingParams,
                generator: torch.Generator | None = None) -> int:
    """One token from logits [V] (any float dtype; processed in fp32). seen: 1-D ids for the penalty."""
    if logits.dim() != 1:
        raise ValueError(f"sample_next: logits must be 1-D [V], got {tuple(logits.shape)}")
    x = logits.float().clone()
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        idx = seen.to(x.device).unique()
        vals = x[idx]
        x[idx] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(x))
    x = x / params.temperature
    if params.top_k > 0 and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x[x < kth] = float("-inf")
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        x[order[drop]] = float("-inf")
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


# ---------------------------------------------------------------------------------------------- generation

# on_token(token_id, text_piece) -> True to stop. text_piece is the newly decodable text (may be "").
TokenCallback = Callable[[int, str], "bool | None"]


def prefill(model: Model, ids: torch.Tensor, cache: KVCache, chunk_size: int = 2048) -> torch.Tensor:
    """Feed ids [B, T] through the cache in chunks; returns the last position's logits [B, V] fp32."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    logits = None
    for s in range(0, ids.shape[1], chunk_size):
        logits = model(ids[:, s:s + chunk_size], cache, last_only=True)  # [B, 1, V]
    if logits is None:
        raise ValueError("prefill: empty prompt")
    return logits[:, -1]  # [B, V]


@torch.inference_mode()
def generate(model: Model, prompt_ids: list[int], *, max_new_tokens: int,
             params: SamplingParams | None = None, stop_ids: Iterable[int] = (),
             cache: KVCache | None = None, cache_mode: str = "fp16", chunk_size: int = 2048,
             seed: int | None = None, tokenizer: TextTokenizer | None = None,
             on_token: TokenCallback | None = None) -> list[int]:
    """Generate up to max_new_tokens after prompt_ids (batch 1); returns the new ids, the stop token
    included when one ends generation. A fresh cache is made unless one is passed (it is reset)."""
    params = params or SamplingParams()
    params.check()
    if not prompt_ids:
        raise ValueError("generate: empty prompt")
    stop = set(stop_ids)
    if cache is None:
        cache = KVCache(model.cfg, len(prompt_ids) + max_new_tokens, mode=cache_mode, dtype=model.dtype,
                        device=model.device)
    cache.reset()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)  # [1, T]
    logits = prefill(model, ids, cache, chunk_size)[0]  # [V]
    seen = list(prompt_ids)
    out: list[int] = []
    shown = ""
    for step in range(max_new_tokens):
        seen_t = torch.tensor(seen, dtype=torch.long) if params.repetition_penalty != 1.0 else None
        tok = sample_next(logits, seen_t, params, gen)
        out.append(tok)
        seen.append(tok)
        if on_token is not None:
            piece = ""
            if tokenizer is not None:
                text = tokenizer.decode(out)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    piece, shown = text[len(shown):], text
            if on_token(tok, piece):
                break
        if tok in stop or step == max_new_tokens - 1:
            break
        logits = model(torch.tensor([[tok]], dtype=torch.long, device=model.device), cache)[0, -1]  # [V]
    return out
