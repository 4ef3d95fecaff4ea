"""Command-line entry points of the conversion stage: `exl2-convert` and `exl2-inspect`.

Parsing and validation happen here (the converter's options come from convert/options.py); the work itself
lives in importable functions.  Errors a user can fix end in one ``error:`` line and exit 2 (exl2.core.cli).
"""
from __future__ import annotations

import json
import sys

import click

from exl2.core.cli import Command, ResumableCommand, fail
from exl2.convert.options import ConvertOptions, click_options


class _Bars:
    """One tqdm bar per stage, driven by (done, total) callbacks."""

    def __init__(self, enabled: bool):
        self.enabled, self.bars = enabled, {}

    def __call__(self, desc: str):
        if not self.enabled:
            return None
        from tqdm import tqdm

        def update(done, total):
            bar = self.bars.get(desc)
            if bar is None:
                bar = self.bars[desc] = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr)
            bar.update(done - bar.n)
            if done >= total:
                bar.close()
        return update


CONVERT_HELP = """Convert a Hugging Face checkpoint (Qwen2, Qwen3, Llama, Mistral, Mixtral, Qwen3-MoE, Phi-3,
Granite, GLM-4, Gemma, Gemma 2, Gemma 3's text model) to EXL2.

Measures every layer once, then quantizes to each target in -b (e.g. -b 3.0,4.0,5.0). The working
directory -o holds the job; rerunning the same command resumes it."""


@click.command(help=CONVERT_HELP, cls=ResumableCommand,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click_options
@click.option("--plan", "plan_only", is_flag=True, help="Print the plan (reachable bpw, memory and disk per stage, model and KV-cache sizes) from config.json and the tensor headers, and exit: status 0 if it fits this machine, 2 if not.")
@click.option("--status-json", is_flag=True, help="Print one JSON object per line for batch systems (no progress bars).")
def convert_main(plan_only, status_json, **options):
    from exl2.convert.api import convert

    opts = ConvertOptions(**options, measure_only=options["output_measurement"] is not None)
    if plan_only:
        _print_plan(opts, status_json)
        return
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda: no CUDA device is available (torch has no CUDA or no GPU is visible)")
    status = (lambda d: click.echo(json.dumps(d, default=str))) if status_json else _log_status
    result = convert(opts, status=status, progress_factory=_Bars(not status_json))
    if status_json:
        click.echo(json.dumps({"stage": "done", **result}, default=str))
    else:
        _print_summary(result)


def _print_plan(opts, as_json: bool) -> None:
    from exl2.convert.api import Job
    from exl2.convert.plan import format_plan

    job = Job(opts)
    job._check_inputs()
    p = job.make_plan()
    click.echo(json.dumps({"stage": "plan", **p.to_dict()}, default=str) if as_json else format_plan(p))
    sys.exit(2 if p.problems else 0)


def _log_status(d: dict) -> None:
    if d.get("stage") in ("preflight", "plan") or (d.get("stage") == "quant" and d.get("module") == "lm_head"):
        click.echo(d.get("message") or f"head: {d.get('option')} (calibration perplexity {d['calibration_ppl']:.3f})",
                   err=True)
    elif d.get("stage") == "optimize":
        click.echo(f"allocation for {d['bpw_target']} bpw: {d['bpw']:.4f} bpw", err=True)
    elif d.get("stage") == "kv_profile" and not d.get("file"):
        click.echo(d["message"], err=True)


def _print_summary(result: dict) -> None:
    click.echo(f"measurement: {result['measurement']}")
    if not result["targets"]:
        return
    click.echo(f"{'target':>7} {'bpw':>7} {'ppl fp16':>9} {'ppl exl2':>9} {'KLD':>8} {'top-1':>6}  output")
    for t in result["targets"]:
        v = t.get("validation")
        if v:
            click.echo(f"{t['bpw_target']:>7g} {t['bpw']:>7.3f} {v['ppl_fp16']:>9.3f} {v['ppl_exl2']:>9.3f} "
                       f"{v['kld_mean']:>8.4f} {v['top1_agreement']:>6.3f}  {t['output']}")
        else:
            click.echo(f"{t['bpw_target']:>7g} {t['bpw']:>7.3f} {'-':>9} {'-':>9} {'-':>8} {'-':>6}  {t['output']}")


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_main(model_dir, as_json):
    """Show the EXL2 layers of MODEL_DIR (widths, groups, bpw) and check each against the format.

    Exits with status 1 if any layer is malformed, 2 if the directory cannot be read."""
    from exl2.convert.inspect import format_report, inspect_dir

    rep = inspect_dir(model_dir)
    if not rep["layers"]:
        fail(f"{model_dir}: no EXL2 layers (no *.q_weight tensors)")
    click.echo(json.dumps(rep, indent=2) if as_json else format_report(rep))
    sys.exit(1 if rep["errors"] else 0)
