"""Runtime throughput on SmolLM2-135M: ours vs transformers, float32, same text, same machine.

    python bench/bench_runtime.py [--length 1024] [--prompt 256] [--new 128] [--repeats 3] [--exl2 DIR] [--write]

Prefill: both models run a full-row forward over the same rows of fixtures/data/persuasion.txt.
Decode: batch 1, a ``--prompt``-token prompt from the same text, then ``--new`` greedy tokens one at a time
with a KV cache (ours: FP16-mode cache holding fp32 on CPU, and the Q4 cache; transformers: its dynamic
cache); the time counts the decode steps only, and the greedy tokens are compared with transformers'.
With ``--exl2 DIR`` (an EXL2 conversion of the same model, e.g. the demo's ``work/demo/bpw-4.00/model``) its
decode runs too, with the layers packed (the runtime's default) and dense (``--exl2 dense``).
Where llama.cpp's tools are built (``bash bench/peers/setup_llamacpp.sh``, with llama-bench), its batch-1
decode of the same model quantized to Q4_K_M runs in the same run (``llama-bench``, ``--new`` tokens from an
empty context, the same thread count); ``--no-peer`` skips it.
The best of ``--repeats`` runs counts (the minimum is the least disturbed).  ``--write`` replaces this benchmark's section of
BENCHMARKS.md.  A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import header, publish  # noqa: E402
from exl2.runtime.evaluate import load_data_rows  # noqa: E402
from exl2.runtime.loader import load_model  # noqa: E402


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def decode_ours(model, prompt: torch.Tensor, new: int, mode: str):
    """A run: prefill ``prompt`` [1, P] into a fresh ``mode`` cache, then ``new`` greedy tokens one at a
    time; returns (tokens, seconds of the decode steps)."""
    from exl2.runtime.cache import KVCache
    from exl2.runtime.generate import prefill

    def run():
        with torch.inference_mode():
            cache = KVCache(model.cfg, prompt.shape[1] + new, mode=mode, dtype=model.dtype)
            logits = prefill(model, prompt, cache)[0]
            t0 = time.perf_counter()
            out = []
            for _ in range(new):
                tok = int(logits.argmax())
                out.append(tok)
                logits = model(torch.tensor([[tok]]), cache)[0, -1]
        return out, time.perf_counter() - t0
    return run


def decode_hf(hf, prompt: torch.Tensor, new: int):
    def run():
        with torch.inference_mode():
            o = hf(prompt, use_cache=True)
            past, logits = o.past_key_values, o.logits[0, -1]
            t0 = time.perf_counter()
            out = []
            for _ in range(new):
                tok = int(logits.argmax())
                out.append(tok)
                o = hf(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past, logits = o.past_key_values, o.logits[0, -1]
        return out, time.perf_counter() - t0
    return run


def best_decode(run, repeats: int) -> tuple[float, list[int]]:
    """The least decode time of ``repeats`` runs (each run prefills untimed, then decodes) and the tokens."""
    best, toks = float("inf"), None
    for _ in range(repeats):
        toks, secs = run()
        best = min(best, secs)
    return best, toks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256, help="decode: prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="decode: generated tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--exl2", type=Path, default=None, help="an EXL2 model of SmolLM2-135M: its decode too")
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp's decode")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from fixtures.smollm2 import build_smollm2

    src = build_smollm2()
    rows = load_data_rows(src, REPO / "fixtures" / "data" / "persuasion.txt", args.rows, args.length)
    ours = load_model(src)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)

    def run_ours():
        with torch.inference_mode():
            for r in rows:
                ours(r[None])

    def run_hf():
        with torch.inference_mode():
            for r in rows:
                hf(r[None])

    run_ours(), run_hf()                                   # warm-up
    t_ours = best_time(run_ours, args.repeats)
    t_hf = best_time(run_hf, args.repeats)
    tokens = rows.numel()
    prompt = rows[0, :args.prompt][None]                   # [1, P]
    decode = {"ours (fp16 cache)": decode_ours(ours, prompt, args.new, "fp16"),
              "ours (q4 cache)": decode_ours(ours, prompt, args.new, "q4"),
              "transformers": decode_hf(hf, prompt, args.new)}
    if args.exl2 is not None:
        for how in ("packed", "dense"):
            decode[f"ours, EXL2 {how} (fp16 cache)"] = decode_ours(load_model(args.exl2, exl2=how), prompt, args.new,
                                                                  "fp16")
    best = {k: best_decode(run, args.repeats) for k, run in decode.items()}
    times = {k: t for k, (t, _) in best.items()}
    toks = {k: tk for k, (_, tk) in best.items()}
    ref_toks = toks["transformers"]
    lines = header("Runtime throughput (prefill, decode), SmolLM2-135M (bench/bench_runtime.py)",
                   "python bench/bench_runtime.py" + (f" --exl2 {args.exl2}" if args.exl2 else "") + " --write") + [
             f"Full-row forward in float32 over {args.rows} rows x {args.length} tokens of persuasion.txt, best of "
             f"{args.repeats}.", "",
             "| runtime | seconds | tokens/s | ratio |", "|---|---:|---:|---:|",
             f"| exl2 runtime | {t_ours:.2f} | {tokens / t_ours:.0f} | {t_hf / t_ours:.2f}x |",
             f"| transformers | {t_hf:.2f} | {tokens / t_hf:.0f} | 1.00x |", "",
             f"Decode, batch 1: {args.prompt}-token prompt, {args.new} greedy tokens with a KV cache, decode steps "
             f"only (prefill excluded), best of {args.repeats}. Same tokens: greedy tokens equal to transformers' "
             "up to the first difference" + (f" (the EXL2 rows: {args.exl2.name if args.exl2.name != 'model' else args.exl2.parent.name}, "
                                             "a quantized model, so its tokens may differ)" if args.exl2 else "") + ".", "",
             "| runtime | decode seconds | tokens/s | ratio | same tokens |", "|---|---:|---:|---:|---:|"]
    for k, t in times.items():
        same = next((i for i, (a, b) in enumerate(zip(toks[k], ref_toks)) if a != b), len(ref_toks))
        lines.append(f"| {k} | {t:.2f} | {args.new / t:.1f} | {times['transformers'] / t:.2f}x | "
                     f"{same}/{len(ref_toks)} |")
    peer = None
    if not args.no_peer:
        from bench.peers import llamacpp

        why = llamacpp.available()
        if why is None:
            try:
                peer = llamacpp.decode_speed(src, REPO / "work" / "bench-runtime", new=args.new,
                                             repeats=args.repeats)
            except llamacpp.PeerError as e:
                why = str(e)
        if peer is None:
            print(f"llama.cpp decode skipped: {why}", file=sys.stderr)
    if peer is not None:
        lines.append(f"| llama.cpp Q4_K_M ({peer['tool']}, {peer['threads']} threads) | "
                     f"{args.new / peer['tokens_per_s']:.2f} | {peer['tokens_per_s']:.1f} | "
                     f"{times['transformers'] * peer['tokens_per_s'] / args.new:.2f}x | - |")
        exl2_rows = [k for k in times if "EXL2 packed" in k]
        lines += ["", f"llama.cpp ran `{peer['command']}` (mean of {peer['repeats']} runs, standard deviation "
                      f"{peer['stddev_ts']:.1f} tokens/s; GGUF {peer['model_bytes'] / 2**20:.0f} MiB, no importance "
                      "matrix), from an empty context where ours decode after the prompt (llama-bench's prompt and "
                      "depth runs crash in this build); at this model size the attention over a few hundred past "
                      "tokens is a small part of a step."]
        for k in exl2_rows:
            lines.append(f"{k}: {args.new / times[k] / peer['tokens_per_s']:.2f}x llama.cpp Q4_K_M's decode speed, "
                         f"{times['ours (fp16 cache)'] / times[k]:.2f}x our FP16 model's.")
    text = "\n".join(lines)
    return publish('bench_runtime', text, args.write)


if __name__ == "__main__":
    sys.exit(main())
