"""Quantizer levers on SmolLM2-135M: what moves KL divergence at 4.0 bpw, one change at a time.

Every run quantizes with one fixed 4.0 bpw strategy (the one ``bench/quality.py`` chose from its
measurement; run that first) on the same held-out prose and code, and changes one thing from GPTQ as the
converter ran it before asymmetric calibration became its default (``asym`` 0 below):

* ``refine span``: :func:`gptq.refine_codes`' span; 0 keeps ExLlamaV2's scale codes as they are
  (the default is 2);
* ``damping``: :func:`gptq.prepare`'s damping fraction (default 0.12, ExLlamaV2's; GPTQ's usual is 0.01);
* ``rows``: quantization calibration rows of 512 tokens (default 16; 48, 64 and 100 draw more rows of the same mix);
* ``sequential``: o_proj's and down_proj's Hessians collected after q/k/v and gate/up are quantized;
* ``polish``: sweeps of coordinate descent on GPTQ's objective after GPTQ (:func:`gptq.polish`);
* ``refine weighted``: :func:`gptq.refine_codes` weighs each row's squared error by GPTQ's row weight;
* ``asymmetric``: asymmetric calibration (:func:`gptq.asymmetric_targets`, alpha 1 and 0.25): each projection
  is quantized toward the full-precision model's output, not its own perturbed inputs' (sequential Hessians);
* the uniform GPTQ 4-bit g128 baseline with and without refined codes (is the gain ours or the quantizer's?).

    python bench/levers.py [--variants orig,jitter0] [--runs 'label part;...'] [--bpw B] [--write]

``--bpw`` takes another of bench/quality.py's EXL2 targets as the fixed strategy (labels then say that bpw;
models and scores go to ``WORK/<variant>-bpw<B>/``); ``--write`` is for the 4.0 bpw section only.

Models go to ``WORK/<variant>/<run>/`` and scores to ``WORK/<variant>/scores.json`` (cached). A benchmark,
not a test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peers import load_cal_ids, make_cal_dir  # noqa: E402
from bench.quality import TEXTS, Scorer, add_follow_up_args, run_follow_up  # noqa: E402
from bench.report import header  # noqa: E402
from exl2.convert.accounting import uniform_strategy  # noqa: E402

DEFAULTS = {"refine_span": 2, "percdamp": 0.12, "rows": 16, "sequential": False, "polish": 0,
            "refine_weighted": False, "asym": 0.0}
# (label, strategy: "exl2" = the 4.0 bpw allocation or "g128" = uniform 4-bit g128, changes from DEFAULTS)
RUNS = [("EXL2 4.0, defaults", "exl2", {}),
        ("EXL2 4.0, refine span 0 (ExLlamaV2's codes)", "exl2", {"refine_span": 0}),
        ("EXL2 4.0, refine span 1", "exl2", {"refine_span": 1}),
        ("EXL2 4.0, refine span 3", "exl2", {"refine_span": 3}),
        ("EXL2 4.0, damping 0.01", "exl2", {"percdamp": 0.01}),
        ("EXL2 4.0, 64 quantization rows", "exl2", {"rows": 64}),
        ("EXL2 4.0, sequential Hessians", "exl2", {"sequential": True}),
        ("EXL2 4.0, polish 1 sweep", "exl2", {"polish": 1}),
        ("EXL2 4.0, refine weighted by GPTQ row weights", "exl2", {"refine_weighted": True}),
        ("EXL2 4.0, sequential Hessians + polish 1 sweep", "exl2", {"sequential": True, "polish": 1}),
        ("EXL2 4.0, asymmetric calibration", "exl2", {"asym": 1.0}),
        ("EXL2 4.0, asymmetric calibration, alpha 0.25", "exl2", {"asym": 0.25}),
        ("EXL2 4.0, 100 quantization rows", "exl2", {"rows": 100}),
        ("EXL2 4.0, 100 quantization rows, asymmetric calibration, alpha 0.25", "exl2", {"rows": 100, "asym": 0.25}),
        ("EXL2 4.0, 100 quantization rows, asymmetric calibration, alpha 1", "exl2", {"rows": 100, "asym": 1.0}),
        ("EXL2 4.0, 48 quantization rows, asymmetric calibration, alpha 0.25", "exl2", {"rows": 48, "asym": 0.25}),
        ("EXL2 4.0, 48 quantization rows, asymmetric calibration, alpha 1", "exl2", {"rows": 48, "asym": 1.0}),
        ("GPTQ 4-bit g128, defaults", "g128", {}),
        ("GPTQ 4-bit g128, refine span 0", "g128", {"refine_span": 0}),
        ("GPTQ 4-bit g128, asymmetric calibration", "g128", {"asym": 1.0}),
        ("GPTQ 4-bit g128, asymmetric calibration, alpha 0.25", "g128", {"asym": 0.25}),
        ("GPTQ 4-bit g128, 100 quantization rows", "g128", {"rows": 100})]
JITTER_RUNS = {"EXL2 4.0, defaults", "EXL2 4.0, refine span 0 (ExLlamaV2's codes)", "GPTQ 4-bit g128, defaults",
               "GPTQ 4-bit g128, refine span 0", "EXL2 4.0, asymmetric calibration",
               "EXL2 4.0, asymmetric calibration, alpha 0.25", "GPTQ 4-bit g128, asymmetric calibration",
               "GPTQ 4-bit g128, asymmetric calibration, alpha 0.25", "EXL2 4.0, 100 quantization rows",
               "EXL2 4.0, 100 quantization rows, asymmetric calibration, alpha 0.25",
               "EXL2 4.0, 100 quantization rows, asymmetric calibration, alpha 1", "GPTQ 4-bit g128, 100 quantization rows"}


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def run_variant(v: str, args) -> list[dict]:
    from fixtures.smollm2 import build_smollm2

    from exl2.convert import quantize as qpass
    from exl2.convert import writer
    from exl2.quant_kernels.gptq import GPTQOptions
    from exl2.quant_kernels.qparams import QParams
    from exl2.runtime.evaluate import load_data_rows
    from exl2.runtime.loader import load_config

    seed = None if v == "orig" else int(v.removeprefix("jitter"))
    src = build_smollm2(jitter_seed=seed)
    qwork = Path(args.quality_work) / v
    strat_file = qwork / "exl2" / f"bpw-{args.bpw:.2f}" / "strategy.json"
    if not strat_file.exists():
        raise SystemExit(f"levers: {strat_file} not found: run `python bench/quality.py` first (variant {v})")
    strategies = {"exl2": json.loads(strat_file.read_text()),
                  "g128": dict(zip(("strategy", "bpw"), uniform_strategy(load_config(src),
                                                                           QParams.make(128, [4], [1.0]))))}
    work = Path(args.work) / (v if args.bpw == 4.0 else f"{v}-bpw{args.bpw:g}")
    work.mkdir(parents=True, exist_ok=True)
    texts = {t: load_data_rows(src, REPO / p, args.eval_rows, args.eval_length) for t, p in TEXTS.items()}
    scorer = Scorer(src, texts, work / "scores.json", args.rescore)
    out = []
    for base, which, change in RUNS:
        if seed is not None and base not in JITTER_RUNS:
            continue
        if args.runs and not any(x in base for x in args.runs.split(";")):
            continue
        label = base.replace("EXL2 4.0", f"EXL2 {args.bpw:.1f}")
        cfg = {**DEFAULTS, **change}
        run_dir = work / slug(label)
        model = run_dir / "model"
        meta = run_dir / "meta.json"
        if not meta.exists():
            cal = qwork / "cal" if cfg["rows"] == 16 else work / f"cal{cfg['rows']}"
            if not (cal / "input_ids.safetensors").exists():
                make_cal_dir(src, cal, cfg["rows"], 512)
            t0 = time.time()
            opts = GPTQOptions(percdamp=cfg["percdamp"], refine_span=cfg["refine_span"], sequential=cfg["sequential"],
                               polish_sweeps=cfg["polish"], refine_weighted=cfg["refine_weighted"])
            qpass.run_quantization(src, load_cal_ids(cal), strategies[which]["strategy"], 6, run_dir, opts=opts,
                                   asym=cfg["asym"])
            writer.compile_model(src, run_dir / "out_tensor", model, quantization_config={"quant_method": "exl2"})
            meta.write_text(json.dumps({"quant_wall_s": time.time() - t0, **cfg}))
        s = {t: scorer.score(label, model, t) for t in TEXTS}
        row = {"label": label, "bpw": strategies[which]["bpw"], **json.loads(meta.read_text()), "scores": s}
        print(f"[{v}] {label:<46} " + "  ".join(f"{t}: ppl {s[t]['ppl']:.3f} KL {s[t]['kld_mean']:.4f}"
                                                for t in TEXTS), flush=True)
        out.append(row)
    return out


def report(results: dict[str, list[dict]], args) -> str:
    cmd = " ".join(["python bench/levers.py", *args.argv])
    lines = header(f"Quantizer levers at {args.bpw:g} bpw, SmolLM2-135M (bench/levers.py)", cmd) + [
             "One change at a time from the converter's GPTQ without asymmetric calibration (refine span 2, "
             "damping 0.12, 16 x 512 "
             f"quantization rows), same strategy (bench/quality.py's {args.bpw:g} bpw allocation; the GPTQ rows use "
             "uniform 4-bit g128), head 6 bits, scored on bench/quality.py's held-out rows (4 x 512 tokens "
             "each of prose and code). KL: mean KL divergence from the FP16 model; change: against the "
             "defaults row of the same strategy.", ""]
    for v, rows in results.items():
        lines += [f"### {'fixture' if v == 'orig' else 'jittered copy (seed ' + v.removeprefix('jitter') + ')'}", "",
                  "| run | bpw | prose ppl | prose KL | change | code ppl | code KL | change | quantize s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        base = {}
        for r in rows:
            kind = r["label"].split(",")[0]
            base.setdefault(kind, r["scores"])
            b = base[kind]
            cells = []
            for t in TEXTS:
                s = r["scores"][t]
                ch = s["kld_mean"] / b[t]["kld_mean"] - 1
                cells += [f"{s['ppl']:.3f}", f"{s['kld_mean']:.4f}", "" if s is b[t] else f"{ch:+.1%}"]
            lines.append(f"| {r['label']} | {r['bpw']:.3f} | " + " | ".join(cells) + f" | {r['quant_wall_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_follow_up_args(ap, "levers")
    ap.add_argument("--runs", default="", help="';'-separated label parts: only the runs whose label has one")
    ap.add_argument("--bpw", type=float, default=4.0, help="the EXL2 target whose strategy every EXL2 run uses")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.write and args.runs:
        ap.error("--write replaces the whole section: run it without --runs")
    if args.write and args.bpw != 4.0:
        ap.error("--write replaces the 4.0 bpw section: run other --bpw values without it")
    return run_follow_up(args, run_variant, report, "quality_levers")


if __name__ == "__main__":
    sys.exit(main())
