"""One Qwen2-7B-shaped decoder layer's measurement at the default rows (16 x 2048), every token against sampled.

    python bench/bench_measure_layer.py [--shape 7b] [--options 4b_128g] [--out DIR] [--write]

In one run, on a synthetic one-layer checkpoint (bench/bench_scaling.py's builder and timer): Hessian collection,
a module forward over all tokens and one at the measurement's default stride (errors on every 4th token),
``gptq.prepare`` per Hessian and GPTQ per projection shape (``--options``: which of bench_scaling's options to
time; their mean stands for every option of that shape).  The layer's measurement is then projected twice, as in
bench_scaling's "Time per decoder layer": every combination pass over all tokens (``--measure-stride 1``), and
over the sampled ones (the default).  CPU seconds are the steadier number on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import header, publish  # noqa: E402


def main(argv=None) -> int:
    from bench.bench_scaling import part_time, project

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="7b", choices=("7b", "72b"))
    ap.add_argument("--options", default="4b_128g", help="';'-separated bench_scaling option names to time")
    ap.add_argument("--time-length", type=int, default=512, help="tokens of the timed row")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_measure_layer"))
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t = part_time(argparse.Namespace(time_length=args.time_length, gptq_shapes="", gptq_options=args.options),
                  args.out, args.shape)
    (args.out / "timing.json").write_text(json.dumps(t, indent=1))
    full, sampled = project(t, args.shape)["cpu_s"], project(t, args.shape, sampled=True)["cpu_s"]
    lines = header(f"One Qwen2-{args.shape.upper()}-shaped layer's measurement, every token against sampled "
                   "(bench/bench_measure_layer.py)",
                   "python bench/bench_measure_layer.py" + (" --write" if args.write else "")) + [
        f"A synthetic one-layer checkpoint (random weights); forward and Hessian collection timed on 1 row x "
        f"{t['tokens']} tokens and scaled per token to the default 16 x 2048 measurement rows (19 attention and 17 MLP "
        "combination passes); GPTQ timed with "
        f"{args.options.replace(';', ', ')} per projection shape, the mean standing for every distinct option of that "
        "shape; one `gptq.prepare` per Hessian.", "",
        "| step | CPU s |", "|---|---:|"]
    for k, v in t["modules"].items():
        lines += [f"| {k}: collect (forward + Hessians), {t['tokens']} tokens | {v['collect_cpu_s']:.2f} |",
                  f"| {k}: forward, every token's output | {v['forward_cpu_s']:.2f} |",
                  f"| {k}: forward, the sampled outputs (first and every 4th token) | {v['sampled_cpu_s']:.2f} |"]
    for k, v in t["prepare"].items():
        lines.append(f"| prepare {k} | {v['cpu_s']:.1f} |")
    for key, o in t["gptq"].items():
        for name, v in o.items():
            lines.append(f"| GPTQ {key}, {name} | {v['cpu_s']:.1f} |")
    lines += ["", "| measurement of one layer (CPU s, projected) | Hessian collection and combination passes | GPTQ "
              "| all (with prepare) |", "|---|---:|---:|---:|"]
    for name, p in (("`--measure-stride 1` (every token)", full), ("default (`--measure-stride 4`)", sampled)):
        lines.append(f"| {name} | {p['forward_measure_layer_s']:.0f} | {p['gptq_measure_layer_s']:.0f} | "
                     f"{p['measure_layer_s']:.0f} |")
    lines += ["", f"Sampled / every token: {sampled['measure_layer_s'] / full['measure_layer_s']:.2f}x of the "
              "layer's measurement CPU seconds."]
    text = "\n".join(lines)
    return publish('measure_layer', text, args.write)


if __name__ == "__main__":
    raise SystemExit(main())
