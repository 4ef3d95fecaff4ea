"""Measuring less: does a cheaper measurement choose the same bits?  Side by side in one run, per fixture variant.

    python bench/measure_shortcuts.py [--variants orig,jitter0] [--rows 8] [--length 512] [--write]

For SmolLM2-135M and its jittered copy (fixtures/smollm2.py), the measurement at the demo preset's rows is run
twice: as the converter ran it (GPTQ variants with refined scale codes), and with the shortcut (variants without
the refinement; the quantization pass keeps it).  Each measurement's wall time, and the allocation each gives at
3.0, 4.0 and 5.0 bpw (measure/optimize.py) compared module by module; where the allocations are equal the
quantized models are the same bytes, so their KL divergence is too.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import header, write_section  # noqa: E402

TARGETS = (3.0, 4.0, 5.0)


def rows_for(model: Path, n: int, length: int):
    """The measurement rows the converter makes for this model (convert/api.py Job.rows, seed 0)."""
    from exl2.calibration import MEASURE_WEIGHTS, default_rows
    from exl2.runtime.config import ModelConfig

    cfg = ModelConfig.from_file(model / "config.json")
    return default_rows(model / "tokenizer.json", n, length, seed=0, bos_id=cfg.bos_token_id,
                        vocab_size=cfg.vocab_size, weights=MEASURE_WEIGHTS).input_ids, cfg


def main(argv=None) -> int:
    from exl2.convert.accounting import decoder_numel
    from exl2.measure.measure import run_measurement
    from exl2.measure.optimize import optimize
    from exl2.quant_kernels.gptq import GPTQOptions
    from fixtures.smollm2 import build_smollm2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="orig,jitter0")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    settings = {"as the converter ran it (refined codes)": GPTQOptions(),
                "shortcut: variants without refined codes": GPTQOptions(refine_span=0)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            model = Path(build_smollm2(jitter_seed=None if variant == "orig" else int(variant.removeprefix("jitter"))))
            ids, cfg = rows_for(model, args.rows, args.length)
            numel = decoder_numel(cfg)
            done = {}
            for name, opts in settings.items():
                t0 = time.perf_counter()
                m = run_measurement(model, ids, Path(tmp) / f"{variant}-{len(done)}", gptq_opts=opts)
                done[name] = (time.perf_counter() - t0, m["measurement"])
                print(variant, name, f"{done[name][0]:.1f} s", flush=True)
            (base_s, base_m), (short_s, short_m) = done.values()
            for bpw in TARGETS:
                a, b = optimize(base_m, numel, bpw).choice, optimize(short_m, numel, bpw).choice
                differ = [k for k in a if a[k] != b[k]]
                rows.append({"variant": variant, "bpw": bpw, "differ": differ, "slots": len(a),
                             "base_s": base_s, "short_s": short_s})
                print(json.dumps(rows[-1]), flush=True)
    lines = header("Measuring less: the same allocation from a cheaper measurement (bench/measure_shortcuts.py)",
                   "python bench/measure_shortcuts.py" + (" --write" if args.write else "")) + [
        f"SmolLM2-135M and its jittered copy, measurement rows {args.rows} x {args.length} (the demo preset's); "
        "each measurement as the converter ran it and with the shortcut, one after the other in one run.", "",
        "| variant | bpw | modules whose option differs | measurement (as ran) | with the shortcut | ratio |",
        "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['bpw']:.1f} | {len(r['differ'])} of {r['slots']}"
                     f"{' (' + ', '.join(r['differ'][:3]) + ')' if r['differ'] else ''} | {r['base_s']:.0f} s | "
                     f"{r['short_s']:.0f} s | {r['short_s'] / r['base_s']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        print(f"wrote {write_section('measure_shortcuts', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
