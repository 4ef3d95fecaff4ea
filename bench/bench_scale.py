"""The runtime and the validation at the mission's sizes, on this machine: a synthetic Qwen2-7B-shaped model and a
Qwen2-72B-shaped slice, with peak memory against the plan's predictions.

    python bench/bench_scale.py [--parts build7,eval7,kld7,gen7,slice72,smol] [--out work/scale] [--write]

Parts (each writes ``OUT/<part>.json``; ``--write`` composes the BENCHMARKS.md section from every JSON in OUT):

* ``build7``: a Qwen2-7B-shaped FP16 checkpoint (all 28 layers, the real shapes and the real vocabulary of
  152,064, random N(0, 0.02) weights and biases, norms near 1; 15 GB, one shard per layer) and its EXL2 version
  written with this project's codec: every projection and the head round-to-nearest at 4 bits in 128-row
  groups (``gptq.quantize`` with no Hessian), compiled by ``convert.writer``.  The tokenizer is SmolLM2's
  (its ids lie inside the vocabulary).  Built once; later runs reuse it.
* ``eval7``: ``exl2-eval EXL2 --rows 1 --length 256`` (perplexity) in a fresh process: peak RSS and seconds.
* ``kld7``: the same with ``--kld-ref FP16`` (the reference streamed, the EXL2 model resident).
* ``gen7``: ``exl2-generate EXL2`` for 16 tokens; seconds per token of the decode steps.
* ``slice72``: two decoder layers of Qwen2-72B's shape with the real vocabulary, FP16 and EXL2 (as above), and
  the converter's validation stage (``convert.validate.compare``) on them in a fresh process: its peak memory
  against the plan's prediction for that slice, and the plan's prediction for the whole 80-layer model.
* ``smol``: the plan's predictions for SmolLM2-135M at the demo preset beside the peaks a conversion measures.

A benchmark, not a test: hours of CPU for the builds on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import header, write_section  # noqa: E402

SHAPES = {   # Qwen2 config facts (config.json of Qwen/Qwen2-7B and Qwen/Qwen2-72B)
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               num_hidden_layers=28),
    "72b": dict(hidden_size=8192, intermediate_size=29568, num_attention_heads=64, num_key_value_heads=8,
                num_hidden_layers=80),
}
VOCAB = 152064
DATA = REPO / "fixtures" / "data" / "persuasion.txt"


def _smol_tokenizer() -> Path:
    out = subprocess.run([sys.executable, "-m", "fixtures.smollm2"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    return Path(out) / "tokenizer.json"


def build_fp16(out: Path, shape: str, layers: int, seed: int = 0) -> Path:
    """A sharded Qwen2 FP16 checkpoint of ``layers`` layers of ``shape`` (one shard per layer)."""
    from safetensors.torch import save_file

    if (out / "model.safetensors.index.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    s = SHAPES[shape]
    C, I, H, Hkv = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
    D = C // H
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape_):
        return (torch.randn(*shape_, generator=g) * 0.02).half()

    def norm(n):
        return (torch.rand(n, generator=g) * 0.2 + 0.9).half()

    weight_map = {}
    shards = [("model-embed.safetensors", lambda: {"model.embed_tokens.weight": rnd(VOCAB, C)})]
    for i in range(layers):
        def layer(i=i):
            p = f"model.layers.{i}"
            return {f"{p}.input_layernorm.weight": norm(C), f"{p}.post_attention_layernorm.weight": norm(C),
                    f"{p}.self_attn.q_proj.weight": rnd(H * D, C), f"{p}.self_attn.q_proj.bias": rnd(H * D),
                    f"{p}.self_attn.k_proj.weight": rnd(Hkv * D, C), f"{p}.self_attn.k_proj.bias": rnd(Hkv * D),
                    f"{p}.self_attn.v_proj.weight": rnd(Hkv * D, C), f"{p}.self_attn.v_proj.bias": rnd(Hkv * D),
                    f"{p}.self_attn.o_proj.weight": rnd(C, H * D), f"{p}.mlp.gate_proj.weight": rnd(I, C),
                    f"{p}.mlp.up_proj.weight": rnd(I, C), f"{p}.mlp.down_proj.weight": rnd(C, I)}
        shards.append((f"model-layer{i:03d}.safetensors", layer))
    shards.append(("model-head.safetensors", lambda: {"model.norm.weight": norm(C), "lm_head.weight": rnd(VOCAB, C)}))
    for name, make in shards:
        t = make()
        save_file(t, str(out / name))
        weight_map.update({k: name for k in t})
        del t
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **s, "vocab_size": VOCAB,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "hidden_act": "silu",
           "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 151643, "eos_token_id": 151643}
    cfg["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "tokenizer.json").write_bytes(_smol_tokenizer().read_bytes())
    return out


def build_exl2_rtn(src: Path, out: Path) -> Path:
    """The EXL2 version of ``src``: every linear layer round-to-nearest at 4 bits, 128-row groups, written with
    the project's codec and writer."""
    from exl2.convert import writer
    from exl2.layers.checkpoint import save_tensors
    from exl2.quant_kernels import gptq
    from exl2.quant_kernels.qparams import QParams
    from exl2.runtime.arch import TENSOR_NAMES
    from exl2.runtime.loader import ModelParts

    if (out / "config.json").exists():
        return out
    tensors = out.parent / (out.name + "-tensors")
    tensors.mkdir(parents=True, exist_ok=True)
    parts = ModelParts(src)
    qp = QParams.make(128, [4], [1.0])
    prefixes = list(parts.linear_shapes())
    for j, prefix in enumerate(prefixes):
        path = tensors / f"{prefix}.safetensors"
        if path.exists():
            continue
        w = parts.src.get(f"{prefix}.weight").float()
        b = parts.src.get(f"{prefix}.bias").float() if f"{prefix}.bias" in parts.src else None
        rtn = gptq.prepare(None, k=w.shape[1], invert=False)                               # round to nearest
        r = gptq.quantize(w, qp, rtn, b, gptq.GPTQOptions(refine_span=0))
        save_tensors(path, {f"{prefix}.{k}": v for k, v in r.tensors.items()})
        print(f"rtn {j + 1}/{len(prefixes)} {prefix}", file=sys.stderr, flush=True)
        parts.src.release()
    assert TENSOR_NAMES["head"] in prefixes
    writer.compile_model(src, tensors, out, quantization_config={"quant_method": "exl2", "bits": 4.13})
    return out


def _run(cmd: list[str], log: Path) -> dict:
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    log.write_text(p.stdout + "\n---\n" + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}); see {log}")
    return {"wall_s": round(time.time() - t0, 1), "stdout": p.stdout}


def part_eval(out: Path, kld: bool) -> dict:
    fp, q = out / "qwen2-7b-fp16", out / "qwen2-7b-exl2"
    js = out / ("kld7-records.json" if kld else "eval7-records.json")
    cmd = [shutil.which("exl2-eval") or "exl2-eval", str(q), "--data", str(DATA), "--rows", "1", "--length",
           "256", "-q", "--json", str(js)] + (["--kld-ref", str(fp)] if kld else [])
    r = _run(cmd, out / ("kld7.log" if kld else "eval7.log"))
    rec = json.loads(js.read_text())[0]
    return {"command": " ".join(["exl2-eval"] + cmd[1:]), "wall_s": r["wall_s"], "record": rec}


def part_gen(out: Path) -> dict:
    code = (
        "import time, json, sys\n"
        "from exl2.runtime.loader import load_model\n"
        "from exl2.runtime.generate import generate, TextTokenizer, SamplingParams\n"
        "from exl2.runtime.memory import PeakMemory\n"
        f"d = {str(out / 'qwen2-7b-exl2')!r}\n"
        "t0 = time.time(); m = load_model(d); load = time.time() - t0\n"
        "tok = TextTokenizer(d); ids = tok.encode('It is a truth universally acknowledged that')\n"
        "stamps = []\n"
        "with PeakMemory() as pm:\n"
        "    out = generate(m, ids, max_new_tokens=16, params=SamplingParams(), stop_ids=set(), tokenizer=tok,\n"
        "                   on_token=lambda i, p: stamps.append(time.time()))\n"
        "steps = [b - a for a, b in zip(stamps, stamps[1:])]\n"
        "print(json.dumps({'load_s': load, 'tokens': len(out), 's_per_token': sum(steps) / len(steps),\n"
        "                  **pm.as_dict()}))\n")
    r = _run([sys.executable, "-c", code], out / "gen7.log")
    return json.loads(r["stdout"].strip().splitlines()[-1])


def part_slice72(out: Path) -> dict:
    from exl2.convert.plan import make_plan

    fp = build_fp16(out / "qwen2-72b-slice-fp16", "72b", 2)
    q = build_exl2_rtn(fp, out / "qwen2-72b-slice-exl2")
    code = (
        "import json, torch\n"
        "from exl2.convert import validate as val\n"
        "from exl2.runtime.memory import PeakMemory\n"
        f"rows = val.held_out_rows({str(fp / 'tokenizer.json')!r}, torch.zeros(1, 8, dtype=torch.long), 4, 512, "
        "151643, 152064)\n"
        "with PeakMemory() as pm:\n"
        f"    v = val.compare({str(fp)!r}, {str(q)!r}, rows)\n"
        "print(json.dumps({**pm.as_dict(), 'kld_mean': v['kld_mean']}))\n")
    r = _run([sys.executable, "-c", code], out / "slice72.log")
    measured = json.loads(r["stdout"].strip().splitlines()[-1])
    from exl2.convert.inspect import inspect_dir

    bpw = inspect_dir(q)["decoder_bpw"]      # the round-to-nearest model's own bpw, head at 4 bits as built
    slice_plan = make_plan(fp, bits=[bpw], head_bits=4, rows=100, length=2048, measurement_rows=16,
                           measurement_length=2048)
    full_cfg = dict(json.loads((fp / "config.json").read_text()), num_hidden_layers=80)
    return {"measured": measured, "predicted_validate": slice_plan.ram["validate"].to_dict(), "full_cfg": full_cfg}


def part_smol(out: Path) -> dict:
    """The demo preset on SmolLM2-135M with --status-json: the plan's prediction and the measured peak per stage."""
    src = _smol_tokenizer().parent
    job = out / "smol-demo"
    if job.exists():
        shutil.rmtree(job)
    cmd = [shutil.which("exl2-convert") or "exl2-convert", "-i", str(src), "-o", str(job), "-b", "4.0", "-mr", "8",
           "-ml", "512", "-r", "16", "-l", "512", "--status-json"]
    r = _run(cmd, out / "smol.log")
    events = [json.loads(line) for line in r["stdout"].splitlines() if line.startswith("{")]
    return {"command": "exl2-convert -i SmolLM2-135M -o JOB -b 4.0 -mr 8 -ml 512 -r 16 -l 512 --status-json",
            "wall_s": r["wall_s"], "memory": {e["of"]: e for e in events if e.get("stage") == "memory"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="build7,eval7,kld7,gen7,slice72,smol")
    ap.add_argument("--out", default=str(REPO / "work" / "scale"))
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for part in [p for p in a.parts.split(",") if p]:
        if part == "build7":
            fp = build_fp16(out / "qwen2-7b-fp16", "7b", 28)
            build_exl2_rtn(fp, out / "qwen2-7b-exl2")
            res = {"fp16_bytes": sum(f.stat().st_size for f in fp.glob("*.safetensors")),
                   "exl2_bytes": sum(f.stat().st_size for f in (out / "qwen2-7b-exl2").glob("*.safetensors"))}
        elif part in ("eval7", "kld7"):
            res = part_eval(out, part == "kld7")
        elif part == "gen7":
            res = part_gen(out)
        elif part == "slice72":
            res = part_slice72(out)
        elif part == "smol":
            res = part_smol(out)
        else:
            raise SystemExit(f"unknown part {part!r}")
        (out / f"{part}.json").write_text(json.dumps(res, indent=1))
        print(part, json.dumps(res)[:400], flush=True)
    if a.write:
        write_section("bench_scale", report(out))
    return 0


def report(out: Path) -> str:
    """The BENCHMARKS.md section from the JSON files the parts wrote."""
    from exl2.convert.plan import make_plan

    def load(name):
        f = out / f"{name}.json"
        return json.loads(f.read_text()) if f.exists() else None

    gib = lambda n: f"{n / 2**30:.2f}"      # noqa: E731
    lines = header("Runtime and validation at scale: synthetic Qwen2-7B and a Qwen2-72B slice (bench/bench_scale.py)",
                   "python bench/bench_scale.py --parts build7,eval7,kld7,gen7,slice72,smol --write")
    b = load("build7")
    if b:
        lines += ["Synthetic Qwen2-7B-shaped checkpoint: 28 layers, hidden 3584, intermediate 18944, 28/4 heads, vocabulary "
                  "152,064, random N(0, 0.02) fp16 weights; its EXL2 version is round-to-nearest 4-bit g128 for every "
                  "projection and the head, written with this project's codec and writer (random weights: the perplexity "
                  "and KL numbers say nothing about quality, only that the path runs).",
                  "", f"FP16 files {gib(b['fp16_bytes'])} GiB, EXL2 files {gib(b['exl2_bytes'])} GiB.", "",
                  "| run | command | peak RSS GiB | target GiB | wall s |", "|---|---|---:|---:|---:|"]
        for name, target in (("eval7", 8), ("kld7", 10)):
            r = load(name)
            if r:
                rec = r["record"]
                lines.append(f"| {name} (model {rec.get('model_run')}, reference {rec.get('ref_run') or '-'}) | "
                             f"`{r['command'].replace(str(out) + '/', '')}` | {gib(rec['peak_rss_bytes'])} | {target} | "
                             f"{r['wall_s']} |")
        g = load("gen7")
        if g:
            lines += ["", f"`exl2-generate`-style greedy decode of the EXL2 model (packed path, fp32 compute, 2 threads): "
                          f"{g['s_per_token']:.2f} s per token over {g['tokens']} tokens after a {g['load_s']:.0f} s load; "
                          f"peak anonymous memory while decoding {gib(g['peak_anon_bytes'])} GiB."]
    sm = load("smol")
    if sm:
        lines += ["", f"Plan against measurement, SmolLM2-135M at the demo preset (`{sm['command']}`, one fresh process, "
                      f"{sm['wall_s']:.0f} s): the peak anonymous memory of each stage, sampled every 20 ms (a "
                      "peak shorter than that can be missed), beside `--plan`'s prediction.", "",
                  "| stage | predicted GiB | measured GiB | measured / predicted |", "|---|---:|---:|---:|"]
        for stage, e in sm["memory"].items():
            if not e.get("predicted_bytes"):       # a stage the plan does not predict
                lines.append(f"| {stage} | - | {gib(e['peak_anon_bytes'])} | - |")
                continue
            lines.append(f"| {stage} | {gib(e['predicted_bytes'])} | {gib(e['peak_anon_bytes'])} | "
                         f"{e['peak_anon_bytes'] / e['predicted_bytes']:.2f} |")
    sl = load("slice72")
    if sl:
        m, pred = sl["measured"], sl["predicted_validate"]
        diff = m["peak_anon_bytes"] - pred["bytes"]
        from exl2.runtime.config import ModelConfig

        whole = make_plan(out, bits=[4.0], head_bits=6, rows=100, length=2048, measurement_rows=16,
                          measurement_length=2048, asym=1.0, cfg=ModelConfig.from_dict(sl["full_cfg"]))
        lines += ["", "Qwen2-72B-shaped slice (2 decoder layers, hidden 8192, intermediate 29568, 64/8 heads, the real "
                      "vocabulary), FP16 and round-to-nearest EXL2 as above; the converter's validation stage "
                      "(`convert.validate.compare`, 4 held-out rows x 512 tokens) in a fresh process:", "",
                  "| | GiB |", "|---|---:|",
                  f"| measured peak anonymous memory | {gib(m['peak_anon_bytes'])} |",
                  f"| measured peak RSS (with reclaimable file pages) | {gib(m['peak_rss_bytes'])} |",
                  f"| the plan's prediction (`--plan`, validate) | {gib(pred['bytes'])} |",
                  f"| difference, peak RSS (target: within 1.5) | {(m['peak_rss_bytes'] - pred['bytes']) / 2**30:+.2f} |",
                  f"| difference, peak anonymous memory | {diff / 2**30:+.2f} |", "",
                  "(The validation code of this run, before commit 6f8d784, also derived the KV profile of the q4x/q3x "
                  "cache modes at load, inside the measured stage; validation now reads the profile the converter "
                  "wrote in a stage of its own.)", "",
                  f"The plan's prediction is {pred['how']}.", "",
                  "The plan for the whole 80-layer Qwen2-72B at 4.0 bpw, default rows and asymmetric calibration "
                  "(`--plan` arithmetic, not run): "
                  + ", ".join(f"{k} {gib(v.bytes)} GiB" for k, v in whole.ram.items())
                  + f"; EXL2 model {gib(whole.targets[4.0]['model_bytes'])} GiB."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
