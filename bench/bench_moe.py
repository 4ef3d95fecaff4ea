"""One full-shape mixture-of-experts layer (Qwen3-30B-A3B's shapes, random weights): time and peak memory of
measuring and quantizing it on this machine, and what that projects for the whole model.

    python bench/bench_moe.py [--write] [--layers N] [-- EXTRA exl2-convert ARGS]

The checkpoint is Qwen3-30B-A3B's decoder layer as its config states it (hidden 2048, 32 query and 4 KV heads of
128, q/k norms, 128 experts of width 768, top 8, renormalised router weights), with transformers' random
initialisation, stored bf16, ``--layers`` layers (default 1) and the test tokenizer's 512-token vocabulary, so the
embedding and head are negligible and the layer is what is timed.  It is converted by ``exl2-convert`` in a process
of its own at the demo preset (`-b 4.0 -mr 8 -ml 512 -r 16 -l 512`, no validation) with ``--status-json``; the
report takes the per-layer times the job reports, the largest anonymous memory of each stage, and the plan's
estimate for the same checkpoint beside them (how far the plan is from the
measured peak).  The whole-model projection is 48 times the measured per-layer time (the embedding, the real
151,936-token head and the disk reads are not in it) and the plan's memory and disk for the real config.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import header, publish  # noqa: E402
from fixtures.tiny import train_tokenizer  # noqa: E402

PRESET = ["-b", "4.0", "-mr", "8", "-ml", "512", "-r", "16", "-l", "512", "--no-validate"]

# Qwen/Qwen3-30B-A3B's config.json (the shapes and options that matter to a conversion)
QWEN3_30B_A3B = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                     norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
                     rope_theta=1e6, max_position_embeddings=40960, vocab_size=151936, tie_word_embeddings=False,
                     hidden_act="silu", attention_bias=False, torch_dtype="bfloat16")


def build(out: Path, layers: int, vocab: int) -> Path:
    """The synthetic checkpoint: the real config with ``layers`` layers and a ``vocab``-token vocabulary."""
    import torch
    import transformers as tf

    keys = {k: v for k, v in QWEN3_30B_A3B.items() if k not in ("architectures", "model_type", "torch_dtype")}
    cfg = tf.Qwen3MoeConfig(**dict(keys, num_hidden_layers=layers, vocab_size=vocab, bos_token_id=1,
                                   eos_token_id=2, pad_token_id=None))
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


def convert(src: Path, work: Path, extra: list[str]) -> dict:
    """Run exl2-convert on src; its events with their arrival times, and its wall time."""
    cmd = [sys.executable, "-c", "from exl2.convert.cli import convert_main; convert_main()", "-i", str(src),
           "-o", str(work), *PRESET, *extra, "--status-json"]
    t0 = time.perf_counter()
    events = []
    with open(work.parent / "convert.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        for line in proc.stdout:
            if line.startswith("{"):
                events.append((time.perf_counter() - t0, json.loads(line)))
        status = proc.wait()
    if status != 0:
        tail = (work.parent / "convert.err").read_text().splitlines()[-15:]
        raise SystemExit("exl2-convert failed:\n" + "\n".join(tail))
    return {"seconds": time.perf_counter() - t0, "events": events}


def summarise(run: dict) -> dict:
    ev = [e for _, e in run["events"]]
    peaks = {}
    for e in ev:       # stage names: measure, quantize:4.00, ... (one per target)
        if e.get("stage") == "memory":
            k = e["of"].split(":")[0]
            peaks[k] = max(peaks.get(k, 0), e["peak_anon_bytes"])
    measure = [e["seconds"] for e in ev if e.get("stage") == "measure" and "layer" in e]
    quant = [e["seconds"] for e in ev if e.get("stage") == "quant" and "layer" in e]
    # the sparse block's combinations: its first event comes after combination 0, the layer's after the last
    moe_start = next((t for t, e in run["events"] if e.get("stage") == "measure"
                      and "block_sparse_moe" in str(e.get("module", ""))), None)
    layer_end = next((t for t, e in run["events"] if e.get("stage") == "measure" and "layer" in e), None)
    return {"peaks": peaks, "measure_layer_s": measure, "quant_layer_s": quant, "seconds": run["seconds"],
            "moe_combinations_s": (layer_end - moe_start) if moe_start else None}


def plans(src: Path, tmp: Path) -> tuple:
    """The plan for the synthetic checkpoint and for the real model's config (nothing of it read)."""
    from exl2.convert.plan import make_plan
    from exl2.runtime.config import ModelConfig

    kw = dict(bits=[4.0], head_bits=6, rows=16, length=512, measurement_rows=8, measurement_length=512,
              validation_rows=0)
    here = make_plan(src, **kw)
    real = tmp / "qwen3-30b-a3b"
    real.mkdir()
    (real / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    full = make_plan(real, cfg=ModelConfig.from_file(real / "config.json"), **kw)
    return here, full


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(s: dict, here, full, layers: int, command: str) -> str:
    m, q = s["measure_layer_s"], s["quant_layer_s"]
    per_layer = sum(m) / len(m) + sum(q) / len(q)
    n = QWEN3_30B_A3B["num_hidden_layers"]
    lines = header("One Qwen3-30B-A3B layer, full shape, random weights", command) + [
        f"Synthetic checkpoint: {layers} decoder layer(s) of Qwen3-30B-A3B's shapes (128 experts of 2048 x 768, "
        "top 8, attention 32/4 heads of 128), vocabulary 512; demo preset, no validation.", "",
        "| stage | per layer | largest anonymous memory (measured) | plan's estimate (same checkpoint) |",
        "|---|---|---|---|",
        f"| measure | {sum(m) / len(m):.0f} s | {gib(s['peaks'].get('measure', 0))} | {gib(here.ram['measure'].bytes)} |",
        f"| quantize | {sum(q) / len(q):.0f} s | {gib(s['peaks'].get('quantize', 0))} | "
        f"{gib(here.ram['quantize'].bytes)} |",
        "", f"Whole job {s['seconds']:.0f} s (with the KV profile of the written model)."]
    if s["moe_combinations_s"] is not None:
        lines.append(f"Of the measured layer, {s['moe_combinations_s']:.0f} s went to 16 of the sparse block's 17 "
                     "combinations (each applied to all experts and run over the rows with the real routing); the "
                     "rest is the attention's measurement, the per-expert Hessians, the 5,120 GPTQ runs of the "
                     "variants (40 options x 128 experts) and the first combination.")
    lines += ["", f"Projection for Qwen3-30B-A3B ({n} layers) at this preset on this machine: {n} x "
              f"{per_layer:.0f} s = {n * per_layer / 3600:.1f} h for the layers (head, embedding and reads not "
              f"counted); the plan's memory for the real config: measure {gib(full.ram['measure'].bytes)}, "
              f"quantize {gib(full.ram['quantize'].bytes)}; job disk {gib(full.disk['job'].bytes)}, "
              f"output {gib(full.disk['output'].bytes)}.  Measurement time grows with the calibration tokens "
              "only in the Hessian and combination passes; the GPTQ runs are per expert and option."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1, help="decoder layers in the synthetic checkpoint (default 1)")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    ap.add_argument("extra", nargs="*", help="more exl2-convert arguments, after --")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=os.environ.get("EXL2_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        tok = train_tokenizer(tmp / "tokenizer.json")
        vocab = len(json.loads(tok.read_text())["model"]["vocab"])
        t0 = time.perf_counter()
        src = build(tmp / "src", args.layers, vocab)
        (src / "tokenizer.json").write_bytes(tok.read_bytes())
        print(f"built {src} in {time.perf_counter() - t0:.0f} s", flush=True)
        here, full = plans(src, tmp)
        s = summarise(convert(src, tmp / "job", args.extra))
        print(json.dumps({k: v for k, v in s.items()}, default=str), flush=True)
    command = "python bench/bench_moe.py" + (" --write" if args.write else "") + \
        (f" --layers {args.layers}" if args.layers != 1 else "") + (" -- " + " ".join(args.extra) if args.extra else "")
    text = report(s, here, full, args.layers, command)
    return publish('bench_moe', text, args.write)


if __name__ == "__main__":
    raise SystemExit(main())
