"""The KV profile's sensitivities from fewer outputs: q4x/q3x's allocation and KL against the noise of the rows.

    python bench/kv_sensitivity.py [--model DIR] [--ref DIR] [--write]

The converter measures each layer's key and value sensitivity (runtime/kv_calib.py ``measure_sensitivity``) on
4 of its calibration rows (256 tokens each), and exl2's own cache modes share their bits out by them.  Here the
sensitivities of ``--model`` (default: the SmolLM2-135M fixture; BENCHMARKS.md's run: its demo preset
conversion, ``exl2-convert -i SMOLLM2 -o JOB -b 4.0 -mr 8 -ml 512 -r 16 -l 512``, with ``--ref SMOLLM2``) are
measured, one after the other in one run, on the converter's rows with the KL at every position, on two other
equally valid choices of 4 rows from the same calibration set (the noise), and on the converter's rows with
cheaper estimates: the KL at every 2nd or 4th position only (``stride``), or 2 rows (the first 2 of the
converter's 4, or 2 spread over the set as ``select_rows`` would take them, at every position and at every
2nd).  The statistics stay the model's own (``exl2_kv.json`` when the folder has one).  Reported per variant: its
seconds, how many of the layers get other (key, value) widths than with the converter's rows, and the KL per
token of q4x and q3x against ``--ref`` on fixtures/data's prose and code (2 rows x 512 tokens each), scored in one
pass (runtime/onepass.py).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import header, publish  # noqa: E402
from bench.scoring import command, load, model_args, reference_log_probs, row_kls, text_rows  # noqa: E402

MODES = ("q4x", "q3x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(ap)
    args = ap.parse_args(argv)

    from exl2.calibration import QUANT_WEIGHTS, default_rows
    from exl2.runtime import kv_calib
    from exl2.runtime.evaluate import EvalConfig
    from exl2.runtime.kv_x import X_MODES

    model, ref, ref_dir, name = load(args)
    base = kv_calib.profile_of(model)
    cfg = model.cfg
    cal = default_rows(ref_dir / "tokenizer.json", 16, 512, seed=0, bos_id=cfg.bos_token_id,
                       vocab_size=cfg.vocab_size, weights=QUANT_WEIGHTS)          # the converter's -r 16 -l 512
    text = [i for i in range(16) if cal.categories[i] not in kv_calib.SKIP_CATEGORIES]
    step = len(text) // kv_calib.SENS_ROWS                                        # select_rows' spacing

    def rows(offset: int, n: int = kv_calib.SENS_ROWS):
        return kv_calib._bos_rows(model, cal.input_ids[text[offset::step][:n], :kv_calib.SENS_LENGTH])

    variants = [("converter's rows, every position", rows(0), 1), ("other rows (offset 1), every position", rows(1), 1),
                ("other rows (offset 2), every position", rows(2), 1), ("converter's rows, stride 2", rows(0), 2),
                ("converter's rows, stride 4", rows(0), 4), ("2 of the converter's rows, every position",
                                                             rows(0, 2), 1)]
    # 2 rows as select_rows spreads them over the calibration set (what SENS_ROWS = 2 would take)
    two = kv_calib._bos_rows(model, kv_calib.select_rows(cal.input_ids, cal.categories, 2, kv_calib.SENS_LENGTH))
    variants += [("2 rows spread over the set, every position", two, 1), ("2 rows spread over the set, stride 2",
                                                                          two, 2)]
    ev = text_rows(ref_dir, 2, 512)
    lps = reference_log_probs(ref, ev)
    results = []
    for label, sens_rows, stride in variants:
        prof = copy.deepcopy(base)
        prof._plans = {}
        t = time.time()
        prof.sensitivity = kv_calib.measure_sensitivity(model, sens_rows, prof, stride=stride)
        rec = {"name": label, "secs": time.time() - t}
        kv_calib.attach(model, prof)
        for mode in MODES:
            rec[mode] = prof.allocation(cfg, X_MODES[mode])
            kl = row_kls(model, ev, lps, EvalConfig("cache", mode, 1, one_pass=True))
            rec[mode + " kl"] = (sum(kl[:2]) / 2, sum(kl[2:]) / 2)
        results.append(rec)
        print(label, {k: v for k, v in rec.items() if k not in MODES}, flush=True)
    fp16 = row_kls(model, ev, lps, EvalConfig("cache", "fp16", 1, one_pass=True))
    first = results[0]
    table = []
    for rec in results:
        moved = [sum(a != b for a, b in zip(rec[m], first[m])) for m in MODES]
        table.append(f"| {rec['name']} | {rec['secs']:.1f} | {moved[0]} | {moved[1]} | " + " | ".join(
            f"{rec[m + ' kl'][i]:.5f}" for m in MODES for i in range(2)) + " |")
    lines = header("The KV profile's sensitivities from fewer outputs (bench/kv_sensitivity.py)",
                   command("kv_sensitivity.py", argv)) + [
        f"{name}; sensitivities on 4 calibration rows x {kv_calib.SENS_LENGTH} tokens (the converter's choice, "
        "two other choices of rows from the same set, and cheaper estimates on the converter's rows); layers of "
        f"{cfg.num_layers} whose (key, value) widths differ from the first row's; KL per token against "
        f"`{ref_dir.name}` of q4x and q3x on 2 rows x 512 tokens of prose (persuasion.txt) and of code "
        f"(stdlib_code.py.txt). The FP16 cache on the same rows: prose {sum(fp16[:2]) / 2:.5f}, code "
        f"{sum(fp16[2:]) / 2:.5f}.", "",
        "| sensitivities | s | q4x layers moved | q3x layers moved | q4x prose | q4x code | q3x prose | q3x code |",
        "|---|---:|---:|---:|---:|---:|---:|---:|", *table]
    return publish("kv_sensitivity", "\n".join(lines), args.write)


if __name__ == "__main__":
    sys.exit(main())
