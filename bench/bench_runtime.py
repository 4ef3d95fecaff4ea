"""Runtime throughput on SmolLM2-135M: our full-row forward vs transformers, float32, same text, same machine.

    python bench/bench_runtime.py [--length 1024] [--repeats 3] [--write]

Both models score the same rows of fixtures/data/persuasion.txt; the best of ``--repeats`` runs counts (the
machine is shared, the minimum is the least disturbed).  ``--write`` replaces this benchmark's section of
BENCHMARKS.md.  A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_section  # noqa: E402
from exl2.runtime.evaluate import load_data_rows  # noqa: E402
from exl2.runtime.loader import load_model  # noqa: E402

def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
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
    lines = ["## Runtime prefill throughput, SmolLM2-135M (bench/bench_runtime.py)", "",
             "Command: `python bench/bench_runtime.py --write`  ",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU only  ",
             f"Date: {datetime.date.today()}", "",
             f"Full-row forward in float32 over {args.rows} rows x {args.length} tokens of persuasion.txt, best of "
             f"{args.repeats}.", "",
             "| runtime | seconds | tokens/s | ratio |", "|---|---:|---:|---:|",
             f"| exl2 runtime | {t_ours:.2f} | {tokens / t_ours:.0f} | {t_hf / t_ours:.2f}x |",
             f"| transformers | {t_hf:.2f} | {tokens / t_hf:.0f} | 1.00x |"]
    text = "\n".join(lines)
    print(text)
    if args.write:
        print(f"wrote {write_section('bench_runtime', text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
