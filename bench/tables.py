"""Option tables and the allocation's norm at 4.0 bpw, SmolLM2-135M: candidate options beyond ExLlamaV2's.

ExLlamaV2's attention combinations give every q/k/v/o row group at most one bit more than the bulk of the
matrix (``0.1:4b/0.9:3b`` and so on).  The candidates (``qparams.CANDIDATE_*``, the converter's
``--tables extended``) give the first 32 rows in act-order, the inputs with the largest Hessian diagonal,
8 bits instead, as ExLlamaV2's tables already do for down_proj.  They are measured on their own
(``run_measurement(modules=...)``) on the same rows as ``bench/quality.py``'s measurement and appended to
it: every module is measured on the FP16 path's states, so entries of the two runs concatenate.
Then 4.0 bpw strategies are quantized and scored:

* ExLlamaV2's tables or the tables plus the candidates, and
* the converter's outer criterion (the norm, 1.5 to 3.5, whose solution has the smallest maximum module
  error, as ExLlamaV2 does) or one fixed norm 2 (sum of squared module errors);
* two of them again with asymmetric calibration (``--asym 0.25``): do the levers add up?

Scored like ``bench/quality.py`` (same held-out rows), against its uniform GPTQ 4-bit g128 model.

    python bench/tables.py [--variants orig,jitter0] [--write]

Needs ``bench/quality.py --bpw 4 --jitter-bpw 4 --quick --no-peers`` (or a full run) first.  A benchmark, not a
test.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.levers import slug  # noqa: E402
from bench.peers import load_cal_ids  # noqa: E402
from bench.quality import TEXTS, Scorer, add_follow_up_args, run_follow_up  # noqa: E402
from bench.report import header  # noqa: E402
from exl2.quant_kernels.qparams import (ATTN_OPTIONS, CANDIDATE_ATTN_OPTIONS, CANDIDATE_MLP_OPTIONS,  # noqa: E402
                                        MLP_OPTIONS)

DECISION = "docs/decisions/0006-extended-option-tables-and-norm.md"   # the reading and the decision, by hand
# (label, tables, norms, asym): norms None = the converter's default sweep; asym = --asym's alpha
RUNS = [("ExLlamaV2 tables, min-max norm (the converter's allocation)", "exl2", None, 0.0),
        ("ExLlamaV2 tables, norm 2", "exl2", (2.0,), 0.0),
        ("tables + candidates, min-max norm", "extended", None, 0.0),
        ("tables + candidates, norm 2", "extended", (2.0,), 0.0),
        ("ExLlamaV2 tables, min-max norm, asym 0.25", "exl2", None, 0.25),
        ("tables + candidates, norm 2, asym 0.25", "extended", (2.0,), 0.25)]


def base_count(key: str) -> int:
    return len(ATTN_OPTIONS) if key.endswith("self_attn") else len(MLP_OPTIONS)


def measurements(src: Path, qwork: Path, work: Path) -> dict[str, dict]:
    """{"exl2": quality.py's measurement cut to ExLlamaV2's tables, "extended": the same + the candidates}."""
    from exl2.calibration import CalibrationRows
    from exl2.measure import measurement as mj
    from exl2.measure.measure import run_measurement
    from exl2.layers.stream import ATTN, MLP

    base_file = qwork / "exl2" / "measurement.json"
    if not base_file.exists():
        raise SystemExit(f"tables: {base_file} not found: run `python bench/quality.py --bpw 4 --jitter-bpw 4 --quick --no-peers` first")
    base = mj.load(base_file, force=True)["measurement"]
    cand_file = work / "candidates" / "measurement.json"
    if cand_file.exists():
        cand = mj.load(cand_file, force=True)["measurement"]
    else:
        rows = CalibrationRows.load(qwork / "exl2" / "cal" / "measure.safetensors")
        t0 = time.time()
        specs = (replace(ATTN, options=CANDIDATE_ATTN_OPTIONS), replace(MLP, options=CANDIDATE_MLP_OPTIONS))
        cand = run_measurement(src, rows.input_ids, work / "candidates", modules=specs)["measurement"]
        print(f"candidates measured in {time.time() - t0:.0f} s", flush=True)
    out = {"exl2": {}, "extended": {}}
    for k, entries in base.items():
        if entries is None:
            out["exl2"][k] = out["extended"][k] = None
            continue
        out["exl2"][k] = entries[:base_count(k)]
        out["extended"][k] = entries[:base_count(k)] + cand[k]
    return out


def run_variant(v: str, args) -> dict:
    from fixtures.smollm2 import build_smollm2

    from exl2.convert import quantize as qpass
    from exl2.convert import writer
    from exl2.convert.accounting import decoder_numel
    from exl2.measure.optimize import DEFAULT_NORMS, optimize
    from exl2.runtime.evaluate import load_data_rows
    from exl2.runtime.loader import load_config

    seed = None if v == "orig" else int(v.removeprefix("jitter"))
    src = build_smollm2(jitter_seed=seed)
    qwork, work = Path(args.quality_work) / v, Path(args.work) / v
    work.mkdir(parents=True, exist_ok=True)
    g128 = qwork / "gptq4g128" / "model"
    if not (g128 / "config.json").exists():
        raise SystemExit(f"tables: {g128} not found: run `python bench/quality.py` first (variant {v})")
    tables = measurements(src, qwork, work)
    numel = decoder_numel(load_config(src))
    texts = {t: load_data_rows(src, REPO / p, args.eval_rows, args.eval_length) for t, p in TEXTS.items()}
    scorer = Scorer(src, texts, work / "scores.json", args.rescore)
    rows = [{"label": "GPTQ 4-bit g128 (bench/quality.py)", "bpw": None, "picked": None,
             "scores": {t: scorer.score("g128", g128, t) for t in TEXTS}}]
    for label, which, norms, asym in RUNS:
        m = tables[which]
        sol = optimize(m, numel, 4.0, norms=norms or DEFAULT_NORMS)
        run_dir = work / slug(label)
        model = run_dir / "model"
        if not (model / "config.json").exists():
            strategy = {k: {"option": i, **m[k][i]} for k, i in sol.choice.items()}
            qpass.run_quantization(src, load_cal_ids(qwork / "cal"), strategy, 6, run_dir, asym=asym)
            writer.compile_model(src, run_dir / "out_tensor", model, quantization_config={"quant_method": "exl2"})
        picked = {"self_attn": 0, "mlp": 0}
        for k, i in sol.choice.items():
            if i >= base_count(k):
                picked[k.rsplit(".", 1)[1]] += 1
        s = {t: scorer.score(label, model, t) for t in TEXTS}
        rows.append({"label": label, "bpw": sol.bits / numel, "norm": sol.norm, "picked": picked, "scores": s})
        print(f"[{v}] {label:<48} norm {sol.norm:<4} " +
              "  ".join(f"{t}: ppl {s[t]['ppl']:.3f} KL {s[t]['kld_mean']:.4f}" for t in TEXTS), flush=True)
    return {"rows": rows, "layers": len([k for k in tables["exl2"] if k.endswith(".mlp")])}


def report(results: dict[str, dict], args) -> str:
    cmd = " ".join(["python bench/tables.py", *args.argv])
    lines = header("Option tables and the allocation's norm at 4.0 bpw, SmolLM2-135M (bench/tables.py)", cmd) + [
        f"Candidates (appended to ExLlamaV2's {len(ATTN_OPTIONS)} attention and {len(MLP_OPTIONS)} MLP combinations): "
        + "; ".join(r[0].desc() for r in CANDIDATE_ATTN_OPTIONS) + " (attention, the same option on q/k/v/o); "
        + "; ".join(" + ".join(qp.desc() for qp in r) for r in CANDIDATE_MLP_OPTIONS) + " (MLP, gate + up + down). "
        "Measured on bench/quality.py's measurement rows (8 x 512) and appended to its measurement; quantized "
        "with its 16 x 512 rows, head 6 bits; scored on its held-out rows (4 x 512 tokens each of prose and "
        "code). KL: mean KL divergence from the FP16 model; ratio: against uniform GPTQ 4-bit g128 (4.08 bpw) "
        "on the same text; chosen: modules (attention / MLP) whose option is a candidate.", ""]
    for v, res in results.items():
        rows = res["rows"]
        ref = rows[0]["scores"]
        lines += [f"### {'fixture' if v == 'orig' else 'jittered copy (seed ' + v.removeprefix('jitter') + ')'}", "",
                  "| run | bpw | norm | chosen | prose ppl | prose KL | ratio | code ppl | code KL | ratio |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            s = r["scores"]
            bpw = "4.080" if r["bpw"] is None else f"{r['bpw']:.3f}"
            norm = "" if r["picked"] is None else f"{r['norm']:g}"
            chosen = "" if r["picked"] is None else (f"{r['picked']['self_attn']} / {r['picked']['mlp']} "
                                                     f"of {res['layers']} / {res['layers']}")
            cells = []
            for t in TEXTS:
                cells += [f"{s[t]['ppl']:.3f}", f"{s[t]['kld_mean']:.4f}",
                          f"{s[t]['kld_mean'] / ref[t]['kld_mean']:.2f}"]
            lines.append(f"| {r['label']} | {bpw} | {norm} | {chosen} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Reading and decision: {DECISION}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_follow_up_args(ap, "tables")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_follow_up(args, run_variant, report, "quality_tables")


if __name__ == "__main__":
    sys.exit(main())
