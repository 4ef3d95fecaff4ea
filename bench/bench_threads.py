"""Conversion work on a busy machine: how thread count and OpenMP's wait policy decide the slowdown when two
conversions share the cores, side by side in one run.

    python bench/bench_threads.py [--write] [--repeat N]

The workload is one SmolLM2-135M-shaped layer's measurement work, run in a process of its own: GPTQ of the
attention and MLP projections (576 x 576, 576 x 1536, 1536 x 576) with three options each, and the module
forwards of four combinations over 4 x 512 tokens (random weights and inputs; the same code the converter runs).
Each scenario starts one or two such processes at once and reports each one's wall time against the workload
alone with the default settings.  "Adaptive" is the converter's policy (core/threads.py): torch's default count,
lowered to the CPUs other processes leave free, looked at every 2 s at most.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import header, publish  # noqa: E402


def workload(repeat: int, adaptive: bool) -> float:
    """One layer's measurement work at SmolLM2's shapes; returns its wall seconds.  ``adaptive``: look at the
    load as the converter's loops do (core/threads.py fit_threads) before each GPTQ call and forward."""
    import torch

    from exl2.core.threads import fit_threads
    from exl2.quant_kernels import gptq

    fit = fit_threads if adaptive else (lambda: None)
    from exl2.quant_kernels.qparams import MLP_OPTIONS

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * 512, 576, generator=g)
    mid = torch.randn(4 * 512, 1536, generator=g)
    shapes = {"q": (576, 576), "gate": (1536, 576), "down": (576, 1536)}
    t0 = time.perf_counter()
    for _ in range(repeat):
        prepared = {}
        for name, inp in (("q", x), ("down", mid)):
            h = gptq.Hessian(inp.shape[1])
            h.add(inp)
            prepared[name] = gptq.prepare(h.result())
        prepared["gate"] = prepared["q"]
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, generator=g) * 0.02
            for qp in (MLP_OPTIONS[0][0], MLP_OPTIONS[8][0], MLP_OPTIONS[16][0]):
                fit()
                gptq.quantize(w, qp, prepared[name])
        wg, wd = torch.randn(1536, 576, generator=g), torch.randn(576, 1536, generator=g)
        with torch.no_grad():
            for _ in range(4):
                fit()
                for r in range(4):
                    xr = x[r * 512:(r + 1) * 512]
                    (torch.nn.functional.silu(xr @ wg.T) * (xr @ wg.T)) @ wd.T
    return time.perf_counter() - t0


# (name, processes, threads per process, environment of each process): OMP_WAIT_POLICY=PASSIVE makes an idle
# OpenMP thread sleep at once; GOMP_SPINCOUNT bounds how long libgomp's threads spin before they sleep.
SCENARIOS = [
    ("alone, 2 threads (default)", 1, 2, {}),
    ("alone, 2 threads, passive wait", 1, 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("alone, 2 threads, spin count 10000", 1, 2, {"GOMP_SPINCOUNT": "10000"}),
    ("alone, 1 thread", 1, 1, {}),
    ("two at once, 2 threads each (default)", 2, 2, {}),
    ("two at once, 2 threads each, passive wait", 2, 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("two at once, 2 threads each, spin count 10000", 2, 2, {"GOMP_SPINCOUNT": "10000"}),
    ("two at once, 1 thread each", 2, 1, {}),
    ("alone, adaptive (the converter's policy)", 1, None, {}),
    ("two at once, adaptive (the converter's policy)", 2, None, {}),
]


def run_scenario(procs: int, threads: int | None, extra: dict, repeat: int) -> list[float]:
    """Start ``procs`` workload processes at once; each one's wall seconds."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(key, None)
    if threads is not None:     # a fixed count; None: torch's default count, adapted to the load
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra)
    cmd = [sys.executable, __file__, "--worker", "--repeat", str(repeat)] + ([] if threads else ["--adaptive"])
    ps = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    out = []
    for p in ps:
        text, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed ({p.returncode})")
        out.append(json.loads(text.strip().splitlines()[-1])["seconds"])
    return out


def report(rows: list, command: str, repeat: int) -> str:
    base = rows[0][1][0]
    lines = header("Two conversions on two cores: threads and OpenMP's wait policy (bench/bench_threads.py)",
                   command) + [
        f"Workload: one SmolLM2-135M-shaped layer's measurement work x {repeat} (GPTQ of 576x576, 1536x576 and "
        "576x1536 projections at three options each, with their Hessians and `gptq.prepare`, and 16 MLP forwards "
        "of 512 tokens), one process per copy; all copies of a scenario start together.", "",
        "| scenario | wall s per process | vs alone (default) |", "|---|---|---|"]
    for name, secs in rows:
        lines.append(f"| {name} | {', '.join(f'{s:.1f}' for s in secs)} | "
                     f"{', '.join(f'{s / base:.2f}x' for s in secs)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=8, help="workload repetitions per process (default 8)")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--adaptive", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps({"seconds": workload(args.repeat, args.adaptive)}))
        return 0
    rows = []
    for name, procs, threads, extra in SCENARIOS:
        secs = run_scenario(procs, threads, extra, args.repeat)
        rows.append((name, secs))
        print(name, secs, flush=True)
    text = report(rows, "python bench/bench_threads.py" + (" --write" if args.write else "")
                  + (f" --repeat {args.repeat}" if args.repeat != 8 else ""), args.repeat)
    return publish('bench_threads', text, args.write)


if __name__ == "__main__":
    raise SystemExit(main())
