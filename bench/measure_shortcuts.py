"""Measuring less: does the sampled measurement choose what the full one does, within the calibration seed's noise?

    python bench/measure_shortcuts.py [--variants orig,jitter0] [--stride 4] [--seeds 0,1,2] [--kl] [--write]

For SmolLM2-135M and its jittered copy (fixtures/smollm2.py), at the demo preset's measurement rows (8 x 512), one
after the other in one run: the full measurement (every token's error) with each calibration seed, and the sampled
one (``--measure-stride``, seed 0).  Reported: each measurement's wall time; the allocations at 3.0, 4.0 and 5.0
bpw (measure/optimize.py) compared module by module, sampled against full (seed 0) and full against full across
seeds (the run-to-run noise a shortcut must stay within).  With ``--kl`` every allocation is also quantized
(``-r 16 -l 512``, with its run's own seed) and its held-out KL divergence against its FP16 model taken on
fixtures/data's prose and code (``exl2-eval --rows 4 --length 512 --mode full``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import header, publish  # noqa: E402
from bench.scoring import ROOT, TEXTS  # noqa: E402

TARGETS = (3.0, 4.0, 5.0)
DATA = ROOT / "fixtures" / "data"


def rows_for(model: Path, n: int, length: int, seed: int = 0):
    """The measurement rows the converter makes for this model (convert/api.py Job.rows)."""
    from exl2.calibration import MEASURE_WEIGHTS, default_rows
    from exl2.runtime.config import ModelConfig

    cfg = ModelConfig.from_file(model / "config.json")
    return default_rows(model / "tokenizer.json", n, length, seed=seed, bos_id=cfg.bos_token_id,
                        vocab_size=cfg.vocab_size, weights=MEASURE_WEIGHTS).input_ids, cfg


def held_out_kl(model: Path, measurement: Path, seed: int, work: Path) -> dict[float, dict[str, float]]:
    """Quantize ``measurement``'s allocations at TARGETS; per target, the KL divergence on each text."""
    from exl2.convert.api import convert
    from exl2.convert.options import ConvertOptions

    convert(ConvertOptions(in_dir=str(model), work_dir=str(work), measurement=str(measurement), bits=list(TARGETS),
                           seed=seed, rows=16, length=512, validate=False))
    out = {}
    for bpw in TARGETS:
        out[bpw] = {}
        for text in TEXTS:
            js = work / f"kl-{bpw:.2f}-{text}.json"
            subprocess.run(["exl2-eval", str(work / f"bpw-{bpw:.2f}" / "model"), "--data", str(DATA / f"{text}.txt"),
                            "--rows", "4", "--length", "512", "--kld-ref", str(model), "--mode", "full", "--json",
                            str(js)], check=True, stdout=subprocess.DEVNULL)
            out[bpw][text] = json.loads(js.read_text())[0]["kld_mean"]
    return out


def main(argv=None) -> int:
    from exl2.convert.accounting import decoder_numel
    from exl2.measure.measure import run_measurement
    from exl2.measure.optimize import optimize
    from fixtures.smollm2 import build_smollm2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="orig,jitter0")
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds of the full measurements (the first is "
                                                    "the sampled one's)")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--kl", action="store_true", help="quantize every allocation and measure its KL divergence")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [(f"full, seed {s}", s, 1) for s in seeds] + [(f"stride {args.stride}, seed {seeds[0]}", seeds[0],
                                                          args.stride)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            model = Path(build_smollm2(jitter_seed=None if variant == "orig" else int(variant.removeprefix("jitter"))))
            numel = None
            done = {}
            for i, (name, seed, stride) in enumerate(runs):
                ids, cfg = rows_for(model, args.rows, args.length, seed)
                numel = decoder_numel(cfg)
                work = Path(tmp) / f"{variant}-{i}"
                t0 = time.perf_counter()
                m = run_measurement(model, ids, work, stride=stride, provenance={})
                seconds = time.perf_counter() - t0
                alloc = {bpw: optimize(m["measurement"], numel, bpw).choice for bpw in TARGETS}
                kl = held_out_kl(model, work / "measurement.json", seed, Path(tmp) / f"q-{variant}-{i}") \
                    if args.kl else None
                done[name] = {"seconds": seconds, "alloc": alloc, "kl": kl}
                print(variant, name, f"{seconds:.1f} s", json.dumps(kl) if kl else "", flush=True)
            results.append((variant, done))
    text = report(results, runs, args)
    return publish('measure_shortcuts', text, args.write)


def differ(a: dict, b: dict) -> int:
    return sum(a[k] != b[k] for k in a)


def report(results, runs, args) -> str:
    full = [name for name, _, stride in runs if stride == 1]
    sampled = runs[-1][0]
    lines = header("Measuring less: sampled errors against the calibration seed's noise (bench/measure_shortcuts.py)",
                   "python bench/measure_shortcuts.py" + (" --kl" if args.kl else "") + (" --write" if args.write
                                                                                          else "")) + [
        f"SmolLM2-135M (orig) and its jittered copy (jitter0), measurement rows {args.rows} x {args.length} (the "
        f"demo preset's). Full: every token's error (`--measure-stride 1`); sampled: estimated from the first and "
        f"every {args.stride}th token (`--measure-stride {args.stride}`). Modules: of the {len(results[0][1][full[0]]['alloc'][TARGETS[0]])} "
        "(each layer's attention and MLP), those whose option differs between two allocations of the same target.",
        "",
        f"| variant | measurement | wall | modules differing from full seed {full[0].split()[-1]} at 3.0 / 4.0 / "
        "5.0 bpw |",
        "|---|---|---:|---|"]
    for variant, done in results:
        ref = done[full[0]]
        for name, d in done.items():
            diffs = " / ".join(str(differ(ref["alloc"][b], d["alloc"][b])) for b in TARGETS)
            lines.append(f"| {variant} | {name} | {d['seconds']:.0f} s | {'-' if name == full[0] else diffs} |")
    lines += ["", "The noise: modules differing between the full measurements of two seeds (every pair), and the "
              "sampled one's count against full seed " + full[0].split()[-1] + ":", "",
              "| variant | bpw | full vs full, each pair of seeds | sampled vs full |", "|---|---|---|---|"]
    for variant, done in results:
        for b in TARGETS:
            pairs = [differ(done[x]["alloc"][b], done[y]["alloc"][b]) for x, y in itertools.combinations(full, 2)]
            lines.append(f"| {variant} | {b:.1f} | {', '.join(map(str, pairs))} | "
                         f"{differ(done[full[0]]['alloc'][b], done[sampled]['alloc'][b])} |")
    if args.kl:
        lines += ["", "Held-out KL divergence (nats/token) of each allocation quantized with `-r 16 -l 512` and its "
                  "run's seed, against its FP16 model, on fixtures/data prose / code (4 x 512 tokens each):", "",
                  "| variant | bpw | " + " | ".join(done_name for done_name in results[0][1]) + " |",
                  "|---|---|" + "---|" * len(results[0][1])]
        for variant, done in results:
            for b in TARGETS:
                cells = [f"{d['kl'][b][TEXTS[0]]:.4f} / {d['kl'][b][TEXTS[1]]:.4f}" for d in done.values()]
                lines.append(f"| {variant} | {b:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
