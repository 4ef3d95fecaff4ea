"""Allocation quality on SmolLM2-135M: our per-token metric vs ExLlamaV2's row metric vs uniform options.

One measurement (it records both metrics), then for each strategy: quantize, write, reload from disk and
compare with the FP16 model on held-out rows of the calibration mix (perplexity, KL divergence, top-1).

    python bench/bench_allocation.py [--work DIR] [--bpw 4.0] [--write]

``--write`` replaces this benchmark's section of BENCHMARKS.md.  A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import header, publish  # noqa: E402
from exl2.calibration import CalibrationRows  # noqa: E402
from exl2.convert import quantize as qpass  # noqa: E402
from exl2.convert import validate as val  # noqa: E402
from exl2.convert import writer  # noqa: E402
from exl2.convert.accounting import decoder_numel  # noqa: E402
from exl2.convert.api import ConvertOptions, convert  # noqa: E402
from exl2.measure.optimize import optimize  # noqa: E402
from exl2.runtime.config import ModelConfig# noqa: E402

def strategies(measurement: dict, numel: int, bpw: float) -> dict[str, tuple[dict, float]]:
    """name -> (strategy, achieved bpw)."""
    out = {}
    sol = optimize(measurement, numel, bpw)                       # token_err (ours)
    out["exl2 allocation, per-token metric (ours)"] = ({k: measurement[k][i] for k, i in sol.choice.items()},
                                                       sol.bits / numel)
    legacy = {k: ([{kk: vv for kk, vv in e.items() if kk != "token_err"} for e in v] if v else v)
              for k, v in measurement.items()}
    sol = optimize(legacy, numel, bpw)                            # 1 - accuracy (ExLlamaV2's metric)
    out["exl2 allocation, ExLlamaV2 row metric"] = ({k: measurement[k][i] for k, i in sol.choice.items()},
                                                    sol.bits / numel)
    for name, (ai, mi) in {"uniform 4-bit g128 (attn #6, mlp #7)": (6, 7),
                           "uniform 4-bit g32 (attn #9, mlp #8)": (9, 8)}.items():
        strat = {k: v[ai if k.endswith("self_attn") else mi] for k, v in measurement.items() if v}
        size = sum(e["total_bits"] for e in strat.values()) / numel
        out[name] = (strat, size)
        # Ours at exactly the uniform option's size: the like-for-like comparison.
        sol = optimize(measurement, numel, size)
        out[f"exl2 allocation (ours) at {size:.3f} bpw"] = ({k: measurement[k][i] for k, i in sol.choice.items()},
                                                           sol.bits / numel)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(REPO / "work" / "bench_allocation"))
    ap.add_argument("--bpw", type=float, default=4.0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)

    from fixtures.smollm2 import build_smollm2

    src = build_smollm2()
    work = Path(args.work)
    reused = (work / "measurement.json").exists()
    t0 = time.time()
    convert(ConvertOptions(in_dir=str(src), work_dir=str(work), measurement_rows=8, measurement_length=512,
                           rows=16, length=512, measure_only=True))
    t_measure = time.time() - t0
    data = json.loads((work / "measurement.json").read_text())
    cfg = ModelConfig.from_file(src / "config.json")
    numel = decoder_numel(cfg)
    rows = CalibrationRows.load(work / "cal" / "quant.safetensors") if (work / "cal" / "quant.safetensors").exists() \
        else None
    if rows is None:
        from exl2.calibration import QUANT_WEIGHTS, default_rows

        rows = default_rows(src / "tokenizer.json", 16, 512, bos_id=cfg.bos_token_id, vocab_size=cfg.vocab_size,
                            weights=QUANT_WEIGHTS)
    vrows = val.held_out_rows(src / "tokenizer.json", rows.input_ids, 4, 512, cfg.bos_token_id, cfg.vocab_size)
    results = []
    fp_ppl = None
    for name, (strat, bpw) in strategies(data["measurement"], numel, args.bpw).items():
        tdir = work / ("s" + str(len(results)))
        tdir.mkdir(exist_ok=True)
        t = time.time()
        qpass.run_quantization(src, rows.input_ids, strat, 6, tdir)
        writer.compile_model(src, tdir / "out_tensor", tdir / "model", quantization_config={"quant_method": "exl2"})
        r = val.compare(src, tdir / "model", vrows)
        fp_ppl = r["ppl_fp16"]
        results.append((name, bpw, r, time.time() - t))
        print(f"{name:<42} {bpw:6.3f} bpw  ppl {r['ppl_exl2']:.3f}  KL {r['kld_mean']:.4f}  top-1 {r['top1_agreement']:.4f}",
              flush=True)

    lines = header(f"Bit allocation quality, SmolLM2-135M at {args.bpw} bpw (bench/bench_allocation.py)",
                   "python bench/bench_allocation.py --write") + [
             f"Calibration: embedded default mix, measurement 8 x 512 tokens "
             f"({'reused from an earlier run' if reused else f'{t_measure:.0f} s'}), quantization "
             f"16 x 512; head 6 bits. Scored on {vrows.shape[0]} held-out rows x 512 of the same mix "
             f"({results[0][2]['tokens']} tokens) after reloading each model from disk. FP16 perplexity "
             f"{fp_ppl:.3f}.", "",
             "| strategy | bpw | perplexity | vs FP16 | KL mean | top-1 |", "|---|---:|---:|---:|---:|---:|"]
    for name, bpw, r, _ in results:
        lines.append(f"| {name} | {bpw:.3f} | {r['ppl_exl2']:.3f} | {100 * (r['ppl_exl2'] / fp_ppl - 1):+.1f}% | "
                     f"{r['kld_mean']:.4f} | {r['top1_agreement']:.4f} |")
    lines += ["", "SmolLM2's weights are dequantized Q4_1 (FIXTURES.md), so ~4-bit results flatter every format "
              "a little; the comparison between rows is what this table is for."]
    text = "\n".join(lines)
    return publish('bench_allocation', text, args.write)


if __name__ == "__main__":
    sys.exit(main())
