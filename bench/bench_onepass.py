"""Cache-mode scoring token by token against the one-pass emulation (runtime/onepass.py), side by side in one run.

    python bench/bench_onepass.py [--model DIR] [--ref DIR] [--rows 2] [--length 256] [--write]

``--model`` (default: the SmolLM2-135M fixture, FP16; BENCHMARKS.md's run: its demo preset conversion,
``exl2-convert -i SMOLLM2 -o JOB -b 4.0 -mr 8 -ml 512 -r 16 -l 512``, with ``--ref SMOLLM2``) is scored under
every cache mode it can use on ``--rows`` rows of fixtures/data's prose and as many of its code, each
``--length`` tokens, twice: decoding token by token through a real cache (``exl2-eval --chunk 1``) and in one
pass per row (``--one-pass``, what the converter's cache check does).  KL divergence per token against ``--ref``
(default: the model itself) in full mode.  Reported per mode: the mean KL both ways, the largest difference of
one row's KL, and the seconds each way.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import header, publish  # noqa: E402
from bench.scoring import command, load, model_args, reference_log_probs, row_kls, text_rows  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(ap)
    ap.add_argument("--rows", type=int, default=2, help="rows per text")
    ap.add_argument("--length", type=int, default=256)
    args = ap.parse_args(argv)

    from exl2.runtime.cache import MODES, mode_error
    from exl2.runtime.evaluate import EvalConfig

    model, ref, ref_dir, name = load(args)
    modes = [m for m in MODES if mode_error(model.cfg, m) is None]
    rows = text_rows(args.model, args.rows, args.length)
    lps = reference_log_probs(ref, rows)
    table = []
    for mode in modes:
        got, secs = {}, {}
        for one in (False, True):
            t = time.time()
            got[one] = row_kls(model, rows, lps, EvalConfig("cache", mode, 1, one_pass=one))
            secs[one] = time.time() - t
        mean = {k: sum(v) / len(v) for k, v in got.items()}
        worst = max(abs(a - b) / a for a, b in zip(got[False], got[True]))
        table.append(f"| {mode} | {mean[False]:.5f} | {mean[True]:.5f} | {100 * worst:.1f} % | {secs[False]:.1f} | "
                     f"{secs[True]:.1f} |")
        print(table[-1], flush=True)
    lines = header("Cache-mode scoring: token by token against one pass (bench/bench_onepass.py)",
                   command("bench_onepass.py", argv)) + [
        f"{name}, {rows.shape[0]} rows x {args.length} tokens ({args.rows} of fixtures/data/persuasion.txt, "
        f"{args.rows} of stdlib_code.py.txt), KL per token against {ref_dir.name} in full mode; every mode once "
        "token by token through a real cache (`exl2-eval --chunk 1`) and once in one pass per row (`--one-pass`, "
        "the converter's cache check).  Worst row: the largest relative difference of one row's mean KL.", "",
        "| mode | KL, token by token | KL, one pass | worst row | token by token s | one pass s |",
        "|---|---:|---:|---:|---:|---:|", *table]
    return publish("onepass", "\n".join(lines), args.write)


if __name__ == "__main__":
    sys.exit(main())
