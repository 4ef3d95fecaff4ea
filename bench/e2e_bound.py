"""The KL divergence of the slow tier's end-to-end SmolLM2 conversion (tests/convert/test_convert_smollm2.py's
preset: -b 4.0 -mr 4 -ml 256 -r 8 -l 256), with today's defaults and with each quality lever switched off, so the
test's bound can sit between them.

    python bench/e2e_bound.py            # about 3 conversions of SmolLM2-135M at a tiny preset

Prints one line per variant: validation KL and perplexities.  Not a test; its numbers go into the test's comment
and docs/decisions/0012-e2e-kl-bound.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exl2.convert import quantize as qpass  # noqa: E402
from exl2.convert.api import ConvertOptions, convert  # noqa: E402
from exl2.quant_kernels.gptq import GPTQOptions  # noqa: E402

PRESET = dict(bits=[4.0], measurement_rows=4, measurement_length=256, rows=8, length=256)


def run(model: str, work: Path, *, refine: bool = True, asym: float | None = None) -> dict:
    original = qpass.run_quantization

    def without_refined_codes(*a, **kw):
        return original(*a, **kw, opts=GPTQOptions(refine_span=0))

    if not refine:
        qpass.run_quantization = without_refined_codes
    try:
        r = convert(ConvertOptions(in_dir=model, work_dir=str(work), asym=asym, **PRESET))
    finally:
        qpass.run_quantization = original
    return r["targets"][0]["validation"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="SmolLM2-135M folder (default: python -m fixtures.smollm2)")
    args = ap.parse_args()
    if args.model is None:
        from fixtures.smollm2 import build_smollm2

        args.model = str(build_smollm2())
    variants = [("today's defaults (refined codes, asym auto = 0.25)", {}),
                ("without asymmetric calibration (--asym 0)", {"asym": 0.0}),
                ("without refined scale codes", {"refine": False})]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, kw) in enumerate(variants):
            v = run(args.model, Path(tmp) / f"w{i}", **kw)
            print(json.dumps({"variant": label, "kld_mean": round(v["kld_mean"], 4),
                              "ppl_fp16": round(v["ppl_fp16"], 3), "ppl_exl2": round(v["ppl_exl2"], 3)}), flush=True)


if __name__ == "__main__":
    main()
