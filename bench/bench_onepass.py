"""Cache-mode scoring token by token against the one-pass emulation (runtime/onepass.py), side by side in one run.

    python bench/bench_onepass.py [--model DIR] [--ref DIR] [--rows 2] [--length 256] [--write]

``--model`` (default: the SmolLM2-135M fixture, FP16; BENCHMARKS.md's run: its demo preset conversion,
``exl2-convert -i SMOLLM2 -o JOB -b 4.0 -mr 8 -ml 512 -r 16 -l 512``, with ``--ref SMOLLM2``) is scored under every cache mode it can use on ``--rows``
rows of fixtures/data's prose and as many of its code, each ``--length`` tokens, twice: decoding token by token
through a real cache (``exl2-eval --chunk 1``) and in one pass per row (``--one-pass``, what the converter's cache
check does).  KL divergence per token against ``--ref`` (default: the model itself) in full mode.  Reported per
mode: the mean KL both ways, the largest difference of one row's KL, and the seconds each way.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import header, publish  # noqa: E402

TEXTS = ("persuasion", "stdlib_code.py")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--ref", type=Path, default=None)
    ap.add_argument("--rows", type=int, default=2, help="rows per text")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from exl2.runtime.cache import MODES, mode_error
    from exl2.runtime.evaluate import EvalConfig, evaluate_rows, load_data_rows
    from exl2.runtime.kv_calib import ensure_profile
    from exl2.runtime.loader import load_model

    if args.model is None:
        from fixtures.smollm2 import build_smollm2
        args.model = Path(build_smollm2())
    ref_dir = args.ref or args.model
    model = load_model(args.model)
    modes = [m for m in MODES if mode_error(model.cfg, m) is None]
    ensure_profile(model, args.model)
    ref = model if ref_dir == args.model else load_model(ref_dir)
    rows = torch.cat([load_data_rows(args.model, ROOT / "fixtures" / "data" / f"{t}.txt", args.rows, args.length)
                      for t in TEXTS])
    lps: list = []
    evaluate_rows(ref, rows, [EvalConfig("full")], ref_model=ref, ref_lps=lps)   # the reference's log-probs, once
    table = []
    for mode in modes:
        got, secs = {}, {}
        for one in (False, True):
            per_row = []
            t = time.time()
            for r in range(rows.shape[0]):
                (res,) = evaluate_rows(model, rows[r:r + 1], [EvalConfig("cache", mode, 1, one_pass=one)],
                                       ref_lps=[lps[r]])
                per_row.append(res.kld_mean)
            secs[one], got[one] = time.time() - t, per_row
        mean = {k: sum(v) / len(v) for k, v in got.items()}
        worst = max(abs(a - b) / a for a, b in zip(got[False], got[True]))
        table.append(f"| {mode} | {mean[False]:.5f} | {mean[True]:.5f} | {100 * worst:.1f} % | {secs[False]:.1f} | "
                     f"{secs[True]:.1f} |")
        print(table[-1], flush=True)
    name = args.model.name if args.model.name != "model" else f"{args.model.parent.parent.name}/{args.model.parent.name}"
    cmd = " ".join(["python bench/bench_onepass.py", *(argv if argv is not None else sys.argv[1:])])
    lines = header("Cache-mode scoring: token by token against one pass (bench/bench_onepass.py)", cmd) + [
        f"`{name}`, {rows.shape[0]} rows x {args.length} tokens ({args.rows} of fixtures/data/persuasion.txt, "
        f"{args.rows} of stdlib_code.py.txt), KL per token against {ref_dir.name} in full mode; every mode once "
        "token by token through a real cache (`exl2-eval --chunk 1`) and once in one pass per row (`--one-pass`, "
        "the converter's cache check).  Worst row: the largest relative difference of one row's mean KL.", "",
        "| mode | KL, token by token | KL, one pass | worst row | token by token s | one pass s |",
        "|---|---:|---:|---:|---:|---:|", *table]
    return publish("onepass", "\n".join(lines), args.write)


if __name__ == "__main__":
    sys.exit(main())
