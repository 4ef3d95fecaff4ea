"""What bench/bench_onepass.py and bench/kv_sensitivity.py share: a model against a reference on fixtures/data."""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ("persuasion", "stdlib_code.py")      # fixtures/data: prose, then code


def model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the SmolLM2-135M fixture)")
    ap.add_argument("--ref", type=Path, default=None, help="the KL reference (default: the model itself)")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")


def load(args):
    """(model, reference model, the reference's folder, a short name of the model folder) from ``model_args``;
    the model carries its KV profile (its folder's, else measured at load)."""
    from exl2.runtime.kv_calib import ensure_profile
    from exl2.runtime.loader import load_model

    if args.model is None:
        from fixtures.smollm2 import build_smollm2
        args.model = Path(build_smollm2())
    ref_dir = args.ref or args.model
    model = load_model(args.model)
    ensure_profile(model, args.model)
    ref = model if ref_dir == args.model else load_model(ref_dir)
    return model, ref, ref_dir, describe(args.model)


def describe(model_dir: Path) -> str:
    """The model folder for a section's text: its name, or for a converted model (JOB/bpw-X/model) the job's
    and the target's names with the bits and calibration rows of its quantization_config."""
    import json

    if model_dir.name != "model":
        return f"`{model_dir.name}`"
    q = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    cal = q.get("calibration") or {}
    return (f"`{model_dir.parent.parent.name}/{model_dir.parent.name}` (EXL2, {q.get('bits')} bpw, calibration "
            f"{cal.get('rows')} x {cal.get('length')} rows)")


def row_kls(model, rows, lps: list, config) -> list[float]:
    """The mean KL divergence of each row of ``rows`` under ``config`` (an EvalConfig) against ``lps``."""
    from exl2.runtime.evaluate import evaluate_rows

    return [evaluate_rows(model, rows[r:r + 1], [config], ref_lps=[lps[r]])[0].kld_mean for r in range(rows.shape[0])]


def command(script: str, argv) -> str:
    """The command line a section was made with."""
    import sys

    return " ".join([f"python bench/{script}", *(argv if argv is not None else sys.argv[1:])])


def text_rows(model_dir: Path, rows: int, length: int):
    """``rows`` rows of each of TEXTS, ``length`` tokens, with ``model_dir``'s tokenizer: [2 * rows, length]."""
    import torch

    from exl2.runtime.evaluate import load_data_rows

    return torch.cat([load_data_rows(model_dir, ROOT / "fixtures" / "data" / f"{t}.txt", rows, length)
                      for t in TEXTS])


def reference_log_probs(ref, rows) -> list:
    """The reference's full-mode log-probabilities of each row, for ``evaluate_rows(..., ref_lps=)``."""
    from exl2.runtime.evaluate import EvalConfig, evaluate_rows

    lps: list = []
    evaluate_rows(ref, rows, [EvalConfig("full")], ref_model=ref, ref_lps=lps)
    return lps
