"""Conversion time and peak memory per architecture, on each architecture's tiny random checkpoint, at the demo
preset (`-b 4.0 -mr 8 -ml 512 -r 16 -l 512`, validation included), side by side in one run.

    python bench/bench_arch.py [--write] [--kinds llama3,qwen2,...]

Each conversion runs in a process of its own (`exl2-convert ... --status-json`); the table gives its wall time,
the ratio to Llama's in the same run, the largest stage peak (anonymous memory, as the job reports it) and the
process's maximum resident set.  The checkpoints are the test suite's (fixtures/tiny.py: hidden 128, 2 layers,
vocabulary 512), so the numbers show what each architecture adds to the same tiny work, not real model costs.
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
from fixtures.tiny import KINDS, build_tiny, train_tokenizer  # noqa: E402

PRESET = ["-b", "4.0", "-mr", "8", "-ml", "512", "-r", "16", "-l", "512"]


def convert_once(src: Path, work: Path) -> dict:
    cmd = [sys.executable, "-c", "from exl2.convert.cli import convert_main; convert_main()", "-i", str(src),
           "-o", str(work), *PRESET, "--status-json"]
    t0 = time.perf_counter()
    with open(work.parent / f"{work.name}.out", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{src.name}: exl2-convert failed (see {work.parent / work.name}.out)")
    events = [json.loads(line) for line in (work.parent / f"{work.name}.out").read_text().splitlines()
              if line.startswith("{")]
    stages = {e["of"]: e["peak_anon_bytes"] for e in events if e.get("stage") == "memory"}
    done = next(e for e in events if e.get("stage") == "done")
    v = done["targets"][0].get("validation") or {}
    return {"seconds": seconds, "peak_stage": max(stages.values()), "max_rss": usage.ru_maxrss * 1024,
            "kld": v.get("kld_mean"), "bpw": done["targets"][0]["bpw"]}


def report(rows: dict, command: str) -> str:
    base = rows.get("llama3", {}).get("seconds")
    lines = header("Conversion per architecture (tiny checkpoints, demo preset)", command) + [
        "| architecture | layers | time | vs Llama | largest stage peak | process max RSS | bpw | KL |",
        "|---|---|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        ratio = f"{r['seconds'] / base:.2f}x" if base else "-"
        kld = f"{r['kld']:.4f}" if r["kld"] is not None else "-"
        lines.append(f"| {KINDS[kind]} | {r['layers']} | {r['seconds']:.1f} s | {ratio} | {r['peak_stage'] / 2**20:.0f} MiB | "
                     f"{r['max_rss'] / 2**20:.0f} MiB | {r['bpw']:.3f} | {kld} |")
    lines += ["", "Tiny random checkpoints (fixtures/tiny.py): the KL column says the conversion worked, not how "
              "well a real model of the architecture quantizes."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated (default: all)")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = train_tokenizer(tmp / "tokenizer.json")
        for kind in kinds:
            src = build_tiny(kind, tmp / f"src-{kind}")
            (src / "tokenizer.json").write_bytes(tok.read_bytes())
            cfg = json.loads((src / "config.json").read_text())
            rows[kind] = {"layers": (cfg.get("text_config") or cfg)["num_hidden_layers"],
                          **convert_once(src, tmp / f"job-{kind}")}
            print(kind, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[kind].items()}),
                  flush=True)
    text = report(rows, "python bench/bench_arch.py" + (" --write" if args.write else ""))
    return publish('bench_arch', text, args.write)


if __name__ == "__main__":
    raise SystemExit(main())
