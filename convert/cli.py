"""Command-line entry points of the conversion stage: `exl2-convert` and `exl2-inspect`.

Parsing and validation happen here; the work itself lives in importable functions.
"""
from __future__ import annotations

import json
import sys

import click


def _bits_list(ctx, param, value):
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
    return out


def _asym(ctx, param, value):
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        alpha = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither 'auto' nor a number") from None
    if not 0.0 <= alpha <= 1.0:
        raise click.BadParameter(f"{value!r} is not between 0 (off) and 1")
    return alpha


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


CONVERT_HELP = """Convert a Hugging Face checkpoint (Qwen2, Llama, Mistral) to EXL2.

Measures every layer once, then quantizes to each target in -b (e.g. -b 3.0,4.0,5.0). The working
directory -o holds the job; rerunning the same command resumes it."""


@click.command(help=CONVERT_HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-i", "--in-dir", "in_dir", required=True, type=click.Path(), help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json).")
@click.option("-o", "--out-dir", "out_dir", required=True, type=click.Path(), help="Working directory; an existing job there is resumed.")
@click.option("-cf", "--compile-full", "compile_full", type=click.Path(), default=None, help="Write the finished model here (one folder per target when -b lists several). Default: OUT_DIR/bpw-X.XX/model.")
@click.option("-b", "--bits", "bits", default="4.125", show_default=True, callback=_bits_list, help="Target bits per weight of the decoder layers; a comma-separated list reuses one measurement.")
@click.option("-hb", "--head-bits", "head_bits", default="6", show_default=True, type=click.Choice(["2", "3", "4", "5", "6", "8"]), help="Bits of the output head.")
@click.option("-m", "--measurement", "measurement", type=click.Path(), default=None, help="Reuse this measurement.json instead of measuring.")
@click.option("-om", "--output-measurement", "output_measurement", type=click.Path(), default=None, help="Measure only, and write measurement.json here too.")
@click.option("-c", "--cal-dataset", "cal_dataset", type=click.Path(), default=None, help="Calibration data: parquet, jsonl or text. Default: the embedded mix.")
@click.option("-r", "--dataset-rows", "rows", default=100, show_default=True, type=int, help="Quantization rows.")
@click.option("-l", "--length", "length", default=2048, show_default=True, type=int, help="Tokens per quantization row.")
@click.option("-mr", "--measurement-rows", "measurement_rows", default=16, show_default=True, type=int, help="Measurement rows.")
@click.option("-ml", "--measurement-length", "measurement_length", default=2048, show_default=True, type=int, help="Tokens per measurement row.")
@click.option("-ss", "--shard-size", "shard_size", default=8192, show_default=True, type=int, help="Maximum shard size in MiB; 0 for one file.")
@click.option("-nr", "--no-resume", "fresh", is_flag=True, help="Delete the working directory's contents and start over.")
@click.option("--force-measurement", is_flag=True, help="Use a measurement made on another checkpoint.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]), help="Where the work runs.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random calibration rows.")
@click.option("--tables", default="exl2", show_default=True, type=click.Choice(["exl2", "extended"]), help="Options to measure: ExLlamaV2's tables, or those plus our candidates with 8-bit leading rows (BENCHMARKS.md, option tables). Ignored with -m.")
@click.option("--norm", type=click.FloatRange(1.0, 4.0), default=None, help="Allocate by minimising the sum of module errors to this power (2: squared errors). Default: ExLlamaV2's sweep of norms 1.5-3.5, keeping the one with the smallest maximum module error.")
@click.option("--asym", default="auto", show_default=True, callback=_asym, metavar="ALPHA|auto", help="Asymmetric calibration: GPTQ toward the full-precision model's output instead of the output of the layer's own, already perturbed inputs, the correction scaled by ALPHA (0: off, GPTQ as ExLlamaV2 runs it). auto: 1 with at least 50,000 quantization tokens (-r x -l; the defaults give 204,800), else 0.25. With 100 x 512 tokens (alpha 1) it lowered KL divergence at 4.0 bpw on SmolLM2-135M by 20-29 % (BENCHMARKS.md). Costs one more copy of the calibration states and extra forward passes.")
@click.option("--no-validate", is_flag=True, help="Skip the perplexity/KL check of the written model.")
@click.option("--plan", "plan_only", is_flag=True, help="Print the plan (reachable bpw, memory and disk per stage, model and KV-cache sizes) from config.json and the tensor headers, and exit: status 0 if it fits this machine, 2 if not.")
@click.option("--no-plan-check", is_flag=True, help="Run even where the plan predicts that memory or disk will not suffice.")
@click.option("--status-json", is_flag=True, help="Print one JSON object per line for batch systems (no progress bars).")
def convert_main(in_dir, out_dir, compile_full, bits, head_bits, measurement, output_measurement, cal_dataset, rows,
                 length, measurement_rows, measurement_length, shard_size, fresh, force_measurement, device, seed,
                 tables, norm, asym, no_validate, plan_only, no_plan_check, status_json):
    from exl2.convert.api import ConvertOptions, convert

    opts = ConvertOptions(in_dir=in_dir, work_dir=out_dir, bits=bits, head_bits=int(head_bits),
                          compile_dir=compile_full, cal_dataset=cal_dataset, rows=rows, length=length,
                          measurement_rows=measurement_rows, measurement_length=measurement_length,
                          shard_mib=shard_size, measurement=measurement, force_measurement=force_measurement,
                          measure_only=output_measurement is not None, output_measurement=output_measurement,
                          fresh=fresh, device=device, seed=seed, validate=not no_validate, tables=tables, norm=norm,
                          asym=asym, plan_check=not no_plan_check)
    if plan_only:
        _print_plan(opts, status_json)
        return
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _fail("--device cuda: no CUDA device is available (torch has no CUDA or no GPU is visible)")
    status = (lambda d: click.echo(json.dumps(d, default=str))) if status_json else _log_status
    result = _run(lambda: convert(opts, status=status, progress_factory=_Bars(not status_json)))
    if status_json:
        click.echo(json.dumps({"stage": "done", **result}, default=str))
    else:
        _print_summary(result)


def _print_plan(opts, as_json: bool) -> None:
    from exl2.convert.api import Job
    from exl2.convert.plan import format_plan

    def plan():
        job = Job(opts)
        job._check_inputs()
        return job.make_plan()

    p = _run(plan)
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


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def _run(fn):
    """Run the job; errors a user can act on become one line and exit status 2 (no traceback)."""
    from exl2.calibration import CalibrationError
    from exl2.convert.api import ConvertError
    from exl2.convert.quantize import QuantizeError
    from exl2.measure.measure import MeasureError
    from exl2.measure.measurement import MeasurementError
    from exl2.quant_kernels.gptq import HessianError
    from exl2.runtime.arch import ConfigError
    from exl2.runtime.loader import CheckpointError

    try:
        return fn()
    except (ConvertError, CheckpointError, ConfigError, CalibrationError, MeasurementError, MeasureError,
            HessianError, QuantizeError) as e:
        _fail(str(e))
    except OSError as e:       # disk full, permissions, vanished files
        _fail(f"{e.filename or ''}: {e.strerror or e}" if e.filename else str(e))
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command to resume")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_main(model_dir, as_json):
    """Show the EXL2 layers of MODEL_DIR (widths, groups, bpw) and check each against the format.

    Exits with status 1 if any layer is malformed, 2 if the directory cannot be read."""
    from exl2.convert.inspect import format_report, inspect_dir

    rep = _run(lambda: inspect_dir(model_dir))
    if not rep["layers"]:
        _fail(f"{model_dir}: no EXL2 layers (no *.q_weight tensors)")
    click.echo(json.dumps(rep, indent=2) if as_json else format_report(rep))
    sys.exit(1 if rep["errors"] else 0)
