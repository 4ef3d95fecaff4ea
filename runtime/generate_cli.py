"""`exl2-generate`: parse and check, then `run_generate` (importable); errors as one `error:` line, exit 2."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import click

from exl2.core.cli import Command
from exl2.core.errors import UserError

from .cache import MODES as CACHE_MODES
from .cli_checks import (_cache_list, _caches_fit, _check_profile, _device, _kv_profile, _load, _model_config,
                         _tokenizer_file)

_CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

@dataclass
class GenerateArgs:
    model_dir: Path
    prompt: str
    chat: bool = False
    system: str | None = None
    cache: str = "fp16"
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    device: str = "cpu"
    exl2: str = "packed"


def run_generate(a: GenerateArgs, write=None) -> list[int]:
    """Generate from a.prompt, calling write(text_piece) as text becomes decodable; returns the new ids."""
    from .generate import SamplingParams, TextTokenizer, generate

    model = _load(a.model_dir, a.device, exl2=a.exl2)
    _kv_profile(model, a.model_dir, [a.cache], False)
    tok = TextTokenizer(a.model_dir)
    if a.chat:
        msgs = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
        try:
            text = tok.apply_chat_template(msgs)
        except ValueError as e:
            raise UserError(f"--chat: {e}") from None
        ids = tok.encode(text)  # the template writes the special tokens itself
    else:
        ids = tok.encode(a.prompt, add_special_tokens=True)
    if not ids:
        raise UserError("--prompt: encodes to no tokens")
    stop = set(model.cfg.eos_token_ids)
    if tok.eos_token_id is not None:
        stop.add(tok.eos_token_id)
    params = SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            repetition_penalty=a.repetition_penalty)

    def on_token(_id, piece):
        if write is not None and piece:
            write(piece)

    return generate(model, ids, max_new_tokens=a.max_tokens, params=params, stop_ids=stop, cache_mode=a.cache,
                    seed=a.seed, tokenizer=tok, on_token=on_token)


@click.command("exl2-generate", cls=Command, context_settings=_CTX)
@click.argument("model_dir", type=click.Path())
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message in the model's chat template.")
@click.option("--system", default=None, help="With --chat: a system message.")
@click.option("--cache", default="fp16", show_default=True,
              help=f"KV-cache mode ({', '.join(CACHE_MODES)}); q4x/q3x are exl2's own (see exl2-eval --help).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True,
              help="1 = off.")
@click.option("--repetition-penalty", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
              show_default=True, help="1 = off.")
@click.option("--seed", type=int, default=None, help="Sampling seed  [default: none]")
@click.option("--exl2", "exl2", type=click.Choice(["packed", "dense"]), default="packed", show_default=True,
              help="How EXL2 layers are held: packed (about their stored size, computed by the EXL2 kernels) or "
                   "dense (the weight rebuilt once at load in the compute dtype, 4-8x the memory; the same "
                   "weights, the sums in another order).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def generate_main(model_dir, prompt, chat, system, cache, max_tokens, temperature, top_k, top_p,
                  repetition_penalty, seed, exl2, device):
    """Generate text with MODEL_DIR (FP16 or EXL2), streaming it to stdout."""
    d = Path(model_dir)
    cfg = _model_config(model_dir)
    _tokenizer_file(d)
    if "," in cache or cache.strip().lower() == "all":
        raise UserError(f"--cache {cache}: give one mode")
    (cache,) = _cache_list(cache)
    _caches_fit(cfg, [cache])
    _check_profile(d, cfg, [cache])
    if system is not None and not chat:
        raise UserError("--system needs --chat")
    if not prompt:
        raise UserError("--prompt: empty")
    args = GenerateArgs(model_dir=d, prompt=prompt, chat=chat, system=system, cache=cache, max_tokens=max_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        seed=seed, device=_device(device), exl2=exl2)

    def write(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    run_generate(args, write)
    sys.stdout.write("\n")
    return 0
