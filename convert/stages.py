"""The per-target stages of a conversion.  Each reads one artifact and writes one:

    optimize    measurement.json            -> bpw-X.XX/strategy.json
    quantize    strategy.json + rows        -> bpw-X.XX/out_tensor/, quant_report.json
    compile     out_tensor/ + checkpoint    -> the model folder (shards, config.json, tokenizer)
    kv_profile  the model folder + rows     -> exl2_kv.json in it (exl2's own cache modes)
    validate    the model folder + rows     -> validation.json in it
    card        all of the above            -> README.md in it

Each takes the running :class:`~exl2.convert.api.Job` (options, paths, status, memory peaks) and the
target; the job records which stages have finished.
"""
from __future__ import annotations

import json
from pathlib import Path

from exl2.core.files import write_json_atomic, write_text_atomic
from exl2.core.version import VERSION
from exl2.measure.optimize import DEFAULT_NORMS, optimize as solve
from exl2.runtime import kv_calib
from exl2.runtime.kv_x import x_arch_error

from . import card as cards
from . import quantize as qpass
from . import validate as val
from . import writer
from .jobstate import ConvertError
from .options import quantization_config


def optimize(job, bpw: float, data: dict, tdir: Path) -> dict:
    """The strategy for ``bpw`` (strategy.json): one option per module from the measurement."""
    o, tag = job.o, f"{bpw:.2f}"
    strategy_file = tdir / "strategy.json"
    strat = None
    if job.state.done(f"optimize:{tag}") and strategy_file.exists():
        strat = json.loads(strategy_file.read_text())
    if strat is not None and strat.get("norm_fixed") != o.norm:
        if job.state.done(f"quant:{tag}"):
            raise ConvertError(f"{tdir}: finished work used --norm {strat.get('norm_fixed') or '(sweep)'}, this "
                           f"run asks for {o.norm or '(sweep)'}; use -nr to start over or another -o")
        strat = None                      # optimized but not quantized yet: solve again with this norm
    if strat is None:
        numel = job.numel
        try:
            sol = solve(data["measurement"], numel, bpw, norms=DEFAULT_NORMS if o.norm is None else (o.norm,))
        except ValueError as e:
            raise ConvertError(f"--bits {bpw}: {e}") from None
        strat = {"bpw_target": bpw, "bpw": sol.bits / numel, "bits": sol.bits, "budget": sol.budget,
                 "numel": numel, "norm": sol.norm, "norm_fixed": o.norm, "max_err": sol.max_err,
                 "strategy": {k: {"option": i, **data["measurement"][k][i]} for k, i in sol.choice.items()}}
        write_json_atomic(strategy_file, strat)
        job.finish(f"optimize:{tag}")
    return strat


def quantize(job, bpw: float, strat: dict, tdir: Path) -> dict:
    """GPTQ every module with its option (out_tensor/), then the head; quant_report.json."""
    tag = f"{bpw:.2f}"
    if not job.state.done(f"quant:{tag}"):
        rows = job.rows("quant")
        with job.peak(f"quantize:{tag}"):
            report = qpass.run_quantization(job.in_dir, rows.input_ids, strat["strategy"], job.o.head_bits, tdir,
                                            device=job.o.device, status=job.status,
                                            progress=job.progress(f"quantize {bpw} bpw"),
                                            ppl_rows=min(4, rows.input_ids.shape[0]), asym=job.asym)
        write_json_atomic(tdir / "quant_report.json", report)
        job.finish(f"quant:{tag}")
    return json.loads((tdir / "quant_report.json").read_text())


def compile(job, bpw: float, strat: dict, data: dict, tdir: Path, out: Path) -> None:
    """The model folder ExLlamaV2 loads: shards, config.json with quantization_config, tokenizer files."""
    if job.state.done(f"compile:{bpw:.2f}") and (out / "config.json").exists():
        return
    qconf = quantization_config(job.o, bpw, calibration=job.qconf_calibration(),
                                provenance={"tool": "exl2", "tool_version": VERSION, "bpw": strat["bpw"],
                                            "checkpoint_sha256": job.state.params["checkpoint_sha256"]},
                                tables=(data.get("exl2") or {}).get("tables", "exl2"))
    try:
        writer.compile_model(job.in_dir, tdir / "out_tensor", out, shard_mib=job.o.shard_mib,
                             quantization_config=qconf, protected={"-o": job.work} if job.o.compile_dir else None,
                             extra_files={"measurement.json": json.dumps(data, indent=4)})
    except writer.OutputDirError as e:
        raise ConvertError(str(e)) from None
    job.finish(f"compile:{bpw:.2f}")


def kv_profile(job, bpw: float, out: Path) -> None:
    """The KV profile of exl2's own cache modes (q4x, q3x; runtime/kv_calib.py) measured on the written model
    with the conversion's rows: exl2_kv.json, which ExLlamaV2 ignores.

    Runs after compile (which replaces the folder), so a job resumed after it writes the file again; a model
    that does not fit in memory gets none, and the runtime derives the profile when it loads the model."""
    if (out / kv_calib.PROFILE_FILE).exists():
        return
    why = x_arch_error(job.cfg)
    if why is not None:
        job.status({"stage": "kv_profile", "bpw_target": bpw, "file": None, "message": f"KV profile: skipped ({why})"})
        return
    rows = job.rows("quant")
    with job.peak(f"kv_profile:{bpw:.2f}"):
        written = kv_calib.calibrate_dir(out, rows.input_ids, rows.categories, device=job.o.device,
                                         progress=job.progress(f"KV profile {bpw} bpw"))
    job.status({"stage": "kv_profile", "bpw_target": bpw, "file": str(written) if written else None,
                "message": f"KV profile: {written}" if written else
                "KV profile: skipped (the model does not fit in free memory; exl2's runtime measures it at load)"})


def validate(job, bpw: float, out: Path) -> dict:
    """Perplexity and KL divergence of the written model against the FP16 checkpoint, on held-out rows
    (validation.json)."""
    vfile = out / "validation.json"
    if not vfile.exists():
        o, rows = job.o, job.rows("quant")
        vrows = val.held_out_rows(job.in_dir / "tokenizer.json", rows.input_ids, o.validation_rows,
                                  min(o.length, 512), job.cfg.bos_token_id, job.cfg.vocab_size)
        with job.peak(f"validate:{bpw:.2f}"):
            v = val.compare(job.in_dir, out, vrows, device=o.device, progress=job.progress(f"validate {bpw} bpw"))
        val.write(vfile, v)
    return json.loads(vfile.read_text())


def card(job, bpw: float, strat: dict, report: dict, validation: dict | None, out: Path) -> None:
    """The model card (README.md), with the KL plot when matplotlib is installed."""
    plot = None
    if validation and "kld_quantiles" in validation:
        others = []
        for s in job.work.glob("bpw-*/strategy.json"):    # earlier targets of this work directory
            other = json.loads(s.read_text())
            f = job.compile_dir(other["bpw_target"]) / "validation.json"
            if other["bpw_target"] != bpw and f.parent != out and f.exists():
                others.append((other["bpw"], json.loads(f.read_text())["kld_mean"]))
        if cards.kld_plot(out / "kld.png", validation, strat["bpw"], others):
            plot = "kld.png"
    text = cards.model_card(base_model=job.in_dir.resolve().name, strat=strat, head=report["head"],
                            head_bits=job.o.head_bits, calibration=job.qconf_calibration(), validation=validation,
                            checkpoint_sha256=job.state.params["checkpoint_sha256"], tool_version=VERSION,
                            plot=plot, asym=job.asym, source_card=_read_card(job.in_dir))
    write_text_atomic(out / "README.md", text)


def _read_card(model_dir: Path) -> str | None:
    """The source checkpoint's model card (README.md), if it has one."""
    try:
        return (model_dir / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
