"""The conversion job: a resumable state machine over a working directory.

    work/
      job.json                 parameters, checkpoint hash, finished stages (rewritten atomically)
      cal/measure.safetensors  measurement rows        cal/quant.safetensors  quantization rows
      measure/                 measurement checkpoints, then measurement.json
      measurement.json         the finished measurement (ExLlamaV2 schema + provenance)
      bpw-4.00/                one folder per target: strategy.json, out_tensor/, model/ (unless -cf),
                               validation.json

Stages run in order: calibration rows -> measurement (skipped with a reused measurement) -> per target:
optimize -> quantize -> compile -> validate.  Each finished stage is recorded in job.json; a rerun with
the same parameters skips it, and a rerun that changes a parameter finished work depends on is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from exl2.calibration import CalibrationRows, default_rows, user_rows
from exl2.calibration.rows import sha256_file
from exl2.measure import measurement as mj
from exl2.measure.measure import preflight, run_measurement
from exl2.measure.optimize import DEFAULT_NORMS, optimize
from exl2.layers.checkpoint import checkpoint_path
from exl2.layers.stream import MODULES, module_specs
from exl2.quant_kernels.codec import padded_columns
from exl2.quant_kernels.qparams import TABLES
from exl2.runtime import kv_calib
from exl2.runtime.arch import ModelConfig
from exl2.runtime.files import write_json_atomic, write_text_atomic
from exl2.runtime.loader import ModelParts

from . import quantize as qpass
from . import validate as val
from . import card, writer

VERSION = "0.1.0"
JOB_FORMAT = 1

Status = Callable[[dict], None]


class ConvertError(RuntimeError):
    """A problem the user can fix (bad input, changed parameters, impossible target); one line."""


@dataclass
class ConvertOptions:
    in_dir: str
    work_dir: str
    bits: list[float] = field(default_factory=lambda: [4.125])
    head_bits: int = 6
    compile_dir: str | None = None        # -cf: final model here (one target) or here/<bpw>bpw (several)
    cal_dataset: str | None = None        # None: the embedded default mix
    rows: int = 100
    length: int = 2048
    measurement_rows: int = 16
    measurement_length: int = 2048
    shard_mib: int = 8192
    measurement: str | None = None        # reuse this measurement.json
    force_measurement: bool = False
    measure_only: bool = False
    output_measurement: str | None = None  # -om: also copy measurement.json here
    fresh: bool = False                   # -nr
    device: str = "cpu"
    seed: int = 0
    validate: bool = True
    validation_rows: int = 4
    tables: str = "exl2"                  # option tables measured: "exl2" (ExLlamaV2's) or "extended"
    norm: float | None = None             # allocation: one fixed norm p, or None for ExLlamaV2's min-max sweep
    asym: float | None = None             # asymmetric calibration's alpha (0: off, GPTQ as ExLlamaV2 runs it;
                                          # None: auto_asym of the quantization tokens)
    plan_check: bool = True               # refuse a job the plan predicts will not fit this machine


# Parameters whose change invalidates finished work, by what they invalidate.
MEASURE_PARAMS = ("checkpoint_sha256", "cal_dataset", "measurement_rows", "measurement_length", "seed", "tables")
QUANT_PARAMS = ("checkpoint_sha256", "cal_dataset", "rows", "length", "head_bits", "seed", "measurement_sha256", "asym")
PARAM_DEFAULTS = {"tables": "exl2", "asym": 0.0}      # what job files written before a parameter existed used
PARAM_FLAGS = {"checkpoint_sha256": "-i (the checkpoint's content changed)", "cal_dataset": "-c", "rows": "-r",
               "length": "-l", "measurement_rows": "-mr", "measurement_length": "-ml", "head_bits": "-hb",
               "seed": "--seed", "tables": "--tables", "asym": "--asym"}
# What a job folder holds at its top level (and the temporary names of its atomic writes).
_JOB_ENTRY = re.compile(r"\.?(job|measurement)\.json(\.tmp(-\d+)?)?|cal|measure|bpw-\d+\.\d\d")


def _is_job_file(path: Path) -> bool:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and isinstance(d.get("params"), dict) and isinstance(d.get("finished_stages"), list)

# Asymmetric calibration's alpha when --asym is not given (BENCHMARKS.md, "Asymmetric calibration"): the
# correction W M H^-1 is estimated from the quantization rows, and on SmolLM2-135M at 4.0 bpw the full
# correction (alpha 1) beat alpha 0.25 with 100 x 512 tokens, while 0.25 did better with 16 x 512 and 48 x 512.
ASYM_AUTO_TOKENS = 50_000
ASYM_FULL, ASYM_FEW_TOKENS = 1.0, 0.25


def auto_asym(rows: int, length: int) -> float:
    """The default alpha: 1 with at least ``ASYM_AUTO_TOKENS`` quantization tokens (the default -r 100 -l 2048
    has 204,800), else 0.25."""
    return ASYM_FULL if rows * length >= ASYM_AUTO_TOKENS else ASYM_FEW_TOKENS


def checkpoint_files(model_dir: Path) -> list[Path]:
    return [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]


def checkpoint_stat(model_dir: Path) -> list:
    """Name, size and modification time of each hashed file: when unchanged, the stored hash is reused."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in checkpoint_files(model_dir)]


def checkpoint_sha256(model_dir: Path, known: dict | None = None) -> str:
    """Content hash of config.json and every *.safetensors file (sha256 over "name\0file-sha256" lines).

    ``known`` is an earlier job's ``{"stat": ..., "sha256": ...}``; if the files' names, sizes and times
    are unchanged its hash is returned without reading the files again (a 72B checkpoint is ~145 GB).
    """
    if known and known.get("stat") == checkpoint_stat(model_dir):
        return known["sha256"]
    h = hashlib.sha256()
    for f in checkpoint_files(model_dir):
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


_write_text, _write_json = write_text_atomic, write_json_atomic


def qconf_calibration(o: ConvertOptions, rows: CalibrationRows) -> dict:
    """The ``calibration`` block of quantization_config (EXL2-SPEC.md 2.1): as in ExLlamaV2, the quantization
    rows actually used and their length."""
    return {"rows": int(rows.input_ids.shape[0]), "length": int(rows.input_ids.shape[1]),
            "dataset": "(default)" if not o.cal_dataset else Path(o.cal_dataset).name}


def _read_card(model_dir: Path) -> str | None:
    """The source checkpoint's model card (README.md), if it has one."""
    try:
        return (model_dir / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def decoder_numel(cfg: ModelConfig) -> int:
    """Weights the bpw budget covers: K x padded N of every attention and MLP projection."""
    C, D, H, Hkv, I = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    per_layer = (C * padded_columns(H * D) + 2 * C * padded_columns(Hkv * D) + H * D * padded_columns(C)
                 + 2 * C * padded_columns(I) + I * padded_columns(C))
    return cfg.num_layers * per_layer


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int, bool]]:
    """(in features, out features, has bias) of each decoder projection."""
    h, q, kv, i = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.kv_dim, cfg.intermediate_size
    return {"q_proj": (h, q, cfg.qkv_bias), "k_proj": (h, kv, cfg.qkv_bias), "v_proj": (h, kv, cfg.qkv_bias),
            "o_proj": (q, h, cfg.o_bias), "gate_proj": (h, i, cfg.mlp_bias), "up_proj": (h, i, cfg.mlp_bias),
            "down_proj": (i, h, cfg.mlp_bias)}


def uniform_strategy(cfg: ModelConfig, qp) -> tuple[dict, float]:
    """Every decoder projection with option ``qp``: (strategy for ``run_quantization``, bpw as we count it).

    Baselines and tests use it; the converter's strategies come from :func:`optimize`."""
    shapes = projection_shapes(cfg)
    strat, bits = {}, 0
    for layer in range(cfg.num_layers):
        for spec in MODULES:
            sh = {p: (k, padded_columns(n), b) for p, (k, n, b) in shapes.items() if p in spec.projections}
            e = mj.entry(1.0, {p: qp for p in spec.projections}, sh)
            strat[spec.key(layer)] = e
            bits += e["total_bits"]
    return strat, bits / decoder_numel(cfg)


def target_dir_name(bpw: float) -> str:
    return f"bpw-{bpw:.2f}"


class Job:
    def __init__(self, opts: ConvertOptions, status: Status | None = None, progress_factory=None):
        self.o = opts
        self.status = status or (lambda d: None)
        self.progress_factory = progress_factory     # (description, total) -> callable(done, total)
        self.in_dir = Path(opts.in_dir)
        self.work = Path(opts.work_dir)
        self.job_file = self.work / "job.json"
        self.asym = auto_asym(opts.rows, opts.length) if opts.asym is None else opts.asym
        self.peaks: dict[str, dict] = {}

    # -- set-up -----------------------------------------------------------------------------------

    def _check_inputs(self) -> None:
        o = self.o
        for name in ("config.json",):
            if not (self.in_dir / name).is_file():
                raise ConvertError(f"{self.in_dir / name}: not found (is -i a Hugging Face model directory?)")
        if not (self.in_dir / "tokenizer.json").is_file():
            raise ConvertError(f"{self.in_dir / 'tokenizer.json'}: not found (a tokenizer.json is required)")
        if o.head_bits not in (2, 3, 4, 5, 6, 8):
            raise ConvertError(f"--head-bits {o.head_bits}: must be one of 2, 3, 4, 5, 6, 8")
        for name, flag, least in (("rows", "-r", 1), ("length", "-l", 2), ("measurement_rows", "-mr", 1),
                                  ("measurement_length", "-ml", 2), ("validation_rows", "validation_rows", 1)):
            if getattr(o, name) < least:     # a row of one token predicts nothing (no perplexity, no KL)
                raise ConvertError(f"{flag} {getattr(o, name)}: must be at least {least}")
        if o.shard_mib < 0:
            raise ConvertError(f"--shard-size {o.shard_mib}: must be >= 0")
        if o.tables not in TABLES:
            raise ConvertError(f"--tables {o.tables}: must be one of {', '.join(TABLES)}")
        if o.norm is not None and not 1.0 <= o.norm <= 4.0:
            raise ConvertError(f"--norm {o.norm}: must be between 1 and 4")
        if not 0.0 <= self.asym <= 1.0:
            raise ConvertError(f"--asym {self.asym}: must be between 0 (off) and 1")
        if not o.measure_only and not o.bits:
            raise ConvertError("--bits: give at least one target")
        for b in o.bits:
            if not 1.5 <= b <= 9.0:
                raise ConvertError(f"--bits {b}: outside any model's feasible range (about 2 to 8 bits per weight)")

    def _check_folders(self) -> None:
        """Before anything is written: the job folder and every output folder are ours to write, and no flag
        makes the job delete or replace a folder it did not create (EXL2-SPEC.md differs here from ExLlamaV2,
        whose -nr empties whatever -o names)."""
        o, work, src = self.o, self.work, self.in_dir
        w, i = work.resolve(), src.resolve()
        if w == i or i in w.parents or w in i.parents:
            where = "is the same folder as" if w == i else "lies inside" if i in w.parents else "contains"
            raise ConvertError(f"-o {work}: {where} -i {src}; the job folder must be a folder of its own")
        if work.exists() and not work.is_dir():
            raise ConvertError(f"-o {work}: exists and is not a folder")
        if work.is_dir():
            entries = sorted(work.iterdir())
            job_file = work / "job.json"
            if job_file.exists() and not _is_job_file(job_file):
                raise ConvertError(f"{job_file}: not a job file of this tool; choose another -o")
            strangers = [e.name + ("/" if e.is_dir() else "") for e in entries if not _JOB_ENTRY.fullmatch(e.name)]
            if strangers and (o.fresh or not job_file.exists()):
                shown = ", ".join(strangers[:4]) + (f" and {len(strangers) - 4} more" if len(strangers) > 4 else "")
                what = ("-nr deletes a job folder's own files only" if o.fresh
                        else "it is not a job folder of this tool")
                raise ConvertError(f"-o {work}: holds files that are not part of a job ({shown}); {what}: move them "
                                   f"away or choose a new or empty folder")
        if o.compile_dir:
            for bpw in ([] if o.measure_only else o.bits):
                out = self._compile_dir(bpw)
                try:
                    writer.check_output_dir(out, "-cf", {"-i": src, "-o": work})
                except writer.OutputDirError as e:
                    raise ConvertError(str(e)) from None

    def _load_job(self) -> dict:
        if self.o.fresh and self.work.exists():
            for e in self.work.iterdir():           # _check_folders made sure every entry is the job's
                if e.is_dir() and not e.is_symlink():
                    shutil.rmtree(e)
                else:
                    e.unlink()
        self.work.mkdir(parents=True, exist_ok=True)
        if not os.access(self.work, os.W_OK):
            raise ConvertError(f"{self.work}: output directory is not writable")
        previous = json.loads(self.job_file.read_text()) if self.job_file.exists() else {}
        stat = checkpoint_stat(self.in_dir)
        known = {"stat": previous.get("checkpoint_stat"),
                 "sha256": (previous.get("params") or {}).get("checkpoint_sha256")}
        params = {
            "checkpoint_sha256": checkpoint_sha256(self.in_dir, known),
            "cal_dataset": str(Path(self.o.cal_dataset).resolve()) if self.o.cal_dataset else None,
            "rows": self.o.rows, "length": self.o.length, "measurement_rows": self.o.measurement_rows,
            "measurement_length": self.o.measurement_length, "head_bits": self.o.head_bits, "seed": self.o.seed,
            "tables": self.o.tables, "measurement_sha256": None, "asym": self.asym,
        }
        if previous:
            job = previous
            if job.get("finished_stages") is None or job.get("params") is None:
                raise ConvertError(f"{self.job_file}: not a job file of this tool; use -nr to start over")
            old = job["params"]
            done = job["finished_stages"]
            # Work killed part-way counts as done work: a checkpoint holds layers made with the old values.
            measured = "measure" in done or checkpoint_path(self.work / "measure", "measure").exists()
            quantized = self._quantized(done)
            for k in MEASURE_PARAMS + QUANT_PARAMS:
                if k == "measurement_sha256":
                    continue
                if (old.get(k, PARAM_DEFAULTS.get(k)) != params[k]
                        and ((k in MEASURE_PARAMS and measured) or (k in QUANT_PARAMS and quantized))):
                    flag = PARAM_FLAGS[k]
                    was = old.get(k, PARAM_DEFAULTS.get(k))
                    # --asym's default changed (auto); a job started before can go on with its own value
                    keep = f"rerun with --asym {was:g} to go on, or " if k == "asym" else ""
                    raise ConvertError(f"{self.work}: finished work used {flag} = {was}, this run asks for "
                                       f"{params[k]}; {keep}use -nr to start over or another -o")
            params["measurement_sha256"] = old.get("measurement_sha256")
            job["params"] = params
        else:
            job = {"format": JOB_FORMAT, "tool_version": VERSION, "in_dir": str(self.in_dir.resolve()),
                   "params": params, "finished_stages": []}
        job["checkpoint_stat"] = stat
        self.job = job
        self._save()
        return job

    def _quantized(self, done: list[str] | None = None) -> bool:
        """Whether any target has quantized layers, finished or checkpointed part-way."""
        done = self.job["finished_stages"] if done is None else done
        return (any(s.startswith("quant:") for s in done)
                or any(checkpoint_path(d, "quant").exists() for d in self.work.glob("bpw-*")))

    def make_plan(self):
        from .plan import make_plan

        o = self.o
        return make_plan(self.in_dir, bits=[] if o.measure_only else o.bits, head_bits=o.head_bits, rows=o.rows,
                         length=o.length, measurement_rows=o.measurement_rows,
                         measurement_length=o.measurement_length, tables=o.tables, asym=self.asym, device=o.device,
                         measure=o.measurement is None, validation_rows=o.validation_rows if o.validate else 0,
                         validation_length=min(o.length, 512), work_dir=self.work,
                         out_dir=o.compile_dir)

    def _check_plan(self) -> None:
        """Print the plan; refuse, before any work, a target the tables cannot reach, and (unless plan_check is
        off) a job the plan predicts will not fit this machine's memory or disk."""
        from .plan import format_plan

        self.plan = self.make_plan()
        self.status({"stage": "plan", "message": format_plan(self.plan), **self.plan.to_dict()})
        for problem in self.plan.problems:
            certain = problem.startswith("--bits")
            if certain or self.o.plan_check:
                hint = "" if certain else "; use fewer rows (-r/-mr) or --no-plan-check to try anyway"
                raise ConvertError(f"the plan says this does not fit: {problem}{hint}")

    @contextlib.contextmanager
    def _peak(self, stage: str):
        """Measure a stage's peak memory; reported with the plan's prediction beside it."""
        from exl2.runtime.memory import PeakMemory

        with PeakMemory() as m:
            yield
        est = self.plan.ram.get(stage.split(":")[0]) if getattr(self, "plan", None) else None
        self.peaks[stage] = {**m.as_dict(), "predicted_bytes": est.bytes if est else None}
        self.status({"stage": "memory", "of": stage, **self.peaks[stage]})

    def _check_weights(self) -> list:
        """Every weight finite (each tensor read once); skipped when an earlier run of this job checked the same
        files (names, sizes and times, kept in job.json).  Returns that file list."""
        stat = checkpoint_stat(self.in_dir)
        try:
            previous = json.loads(self.job_file.read_text())
        except (OSError, ValueError):
            previous = {}
        if not isinstance(previous, dict) or previous.get("weights_finite") != stat:
            self.parts.check_finite(self._progress("check weights"))
        return stat

    def _save(self) -> None:
        _write_json(self.job_file, self.job)

    def _done(self, stage: str) -> bool:
        return stage in self.job["finished_stages"]

    def _finish(self, stage: str) -> None:
        if stage not in self.job["finished_stages"]:
            self.job["finished_stages"].append(stage)
        self._save()
        self.status({"stage": stage, "state": "finished"})

    def _progress(self, desc: str):
        return self.progress_factory(desc) if self.progress_factory else None

    # -- stages -----------------------------------------------------------------------------------

    def _rows(self, which: str) -> CalibrationRows:
        o, cfg = self.o, self.cfg
        path = self.work / "cal" / f"{which}.safetensors"
        n, length = (o.measurement_rows, o.measurement_length) if which == "measure" else (o.rows, o.length)
        if path.exists():
            rows = CalibrationRows.load(path)
            p = rows.provenance
            source = Path(o.cal_dataset).name if o.cal_dataset else "default"
            if (p.get("rows"), p.get("length"), p.get("seed"), p.get("source")) == (n, length, o.seed, source):
                return rows
            # made with other values and no work depends on them yet (_load_job refuses otherwise): make anew
        tok = self.in_dir / "tokenizer.json"
        if o.cal_dataset:
            rows = user_rows(o.cal_dataset, tok, n, length, seed=o.seed, vocab_size=cfg.vocab_size)
        else:
            from exl2.calibration import MEASURE_WEIGHTS, QUANT_WEIGHTS

            rows = default_rows(tok, n, length, seed=o.seed, bos_id=cfg.bos_token_id, vocab_size=cfg.vocab_size,
                                weights=MEASURE_WEIGHTS if which == "measure" else QUANT_WEIGHTS)
        path.parent.mkdir(exist_ok=True)
        rows.save(path)
        return rows

    def measure(self) -> dict:
        o = self.o
        if o.measurement:
            data = mj.load(o.measurement, checkpoint_sha256=self.job["params"]["checkpoint_sha256"],
                           force=o.force_measurement)
            missing = [f"model.layers.{i}.{m}" for i in range(self.cfg.num_layers) for m in ("self_attn", "mlp")
                       if f"model.layers.{i}.{m}" not in data["measurement"]]
            if missing:
                raise ConvertError(f"{o.measurement}: no measurement for {missing[0]} (another model's file?)")
        elif self._done("measure"):
            data = mj.load(self.work / "measurement.json")
        else:
            rows = self._rows("measure")
            pf = preflight(self.parts, rows.input_ids[0], device=o.device)
            self.status({"stage": "preflight", "message": pf.report(), "max_abs": pf.max_abs})
            prov = {"tool_version": VERSION, "checkpoint_sha256": self.job["params"]["checkpoint_sha256"],
                    "calibration_sha256": rows.sha256, "rows": int(rows.input_ids.shape[0]),
                    "length": int(rows.input_ids.shape[1]),
                    "calibration": "(default)" if not o.cal_dataset else Path(o.cal_dataset).name,
                    "tables": o.tables}
            with self._peak("measure"):
                data = run_measurement(self.in_dir, rows.input_ids, self.work / "measure", device=o.device,
                                       provenance=prov, status=self.status, progress=self._progress("measure"),
                                       modules=module_specs(o.tables))
            shutil.copyfile(self.work / "measure" / "measurement.json", self.work / "measurement.json")
            self._finish("measure")
        text = json.dumps(data, indent=4)
        sha = hashlib.sha256(json.dumps(data["measurement"], sort_keys=True).encode()).hexdigest()
        old = self.job["params"].get("measurement_sha256")
        if old and old != sha:
            # the strategies of this job were chosen from another measurement (another -m)
            if self._quantized():
                raise ConvertError(f"{self.work}: finished work used another measurement than "
                                   f"{o.measurement or self.work / 'measurement.json'}; use -nr to start over or "
                                   f"another -o")
            self.job["finished_stages"] = [s for s in self.job["finished_stages"] if not s.startswith("optimize:")]
        self.job["params"]["measurement_sha256"] = sha
        self._save()
        if o.output_measurement:
            dest = Path(o.output_measurement)
            if dest.is_dir():
                dest = dest / "measurement.json"
            _write_text(dest, text)
        return data

    def target(self, bpw: float, data: dict) -> dict:
        o = self.o
        tdir = self.work / target_dir_name(bpw)
        tdir.mkdir(exist_ok=True)
        tag = f"{bpw:.2f}"
        numel = decoder_numel(self.cfg)
        strategy_file = tdir / "strategy.json"
        strat = None
        if self._done(f"optimize:{tag}") and strategy_file.exists():
            strat = json.loads(strategy_file.read_text())
        if strat is not None and strat.get("norm_fixed") != o.norm:
            if self._done(f"quant:{tag}"):
                raise ConvertError(f"{tdir}: finished work used --norm {strat.get('norm_fixed') or '(sweep)'}, this "
                                   f"run asks for {o.norm or '(sweep)'}; use -nr to start over or another -o")
            strat = None                      # optimized but not quantized yet: solve again with this norm
        if strat is None:
            try:
                sol = optimize(data["measurement"], numel, bpw, norms=DEFAULT_NORMS if o.norm is None else (o.norm,))
            except ValueError as e:
                raise ConvertError(f"--bits {bpw}: {e}") from None
            strat = {"bpw_target": bpw, "bpw": sol.bits / numel, "bits": sol.bits, "budget": sol.budget,
                     "numel": numel, "norm": sol.norm, "norm_fixed": o.norm, "max_err": sol.max_err,
                     "strategy": {k: {"option": i, **data["measurement"][k][i]} for k, i in sol.choice.items()}}
            _write_json(strategy_file, strat)
            self._finish(f"optimize:{tag}")
        self.status({"stage": "optimize", "bpw_target": bpw, "bpw": strat["bpw"]})
        if not self._done(f"quant:{tag}"):
            rows = self._rows("quant")
            with self._peak(f"quantize:{tag}"):
                report = qpass.run_quantization(self.in_dir, rows.input_ids, strat["strategy"], o.head_bits, tdir,
                                                device=o.device, status=self.status,
                                                progress=self._progress(f"quantize {bpw} bpw"),
                                                ppl_rows=min(4, rows.input_ids.shape[0]), asym=self.asym)
            _write_json(tdir / "quant_report.json", report)
            self._finish(f"quant:{tag}")
        report = json.loads((tdir / "quant_report.json").read_text())
        out = self._compile_dir(bpw)
        calibration = qconf_calibration(o, self._rows("quant"))
        if not self._done(f"compile:{tag}") or not (out / "config.json").exists():
            # ExLlamaV2's "version" is the version of ExLlamaV2 that wrote the files: ours lives in our block
            qconf = {"quant_method": "exl2", "bits": bpw, "head_bits": o.head_bits, "calibration": calibration,
                     "exl2": {"tool": "exl2", "tool_version": VERSION, "bpw": strat["bpw"],
                              "checkpoint_sha256": self.job["params"]["checkpoint_sha256"],
                              "tables": (data.get("exl2") or {}).get("tables", "exl2"), "norm": o.norm,
                              "asym": self.asym}}
            try:
                writer.compile_model(self.in_dir, tdir / "out_tensor", out, shard_mib=o.shard_mib,
                                     quantization_config=qconf, protected={"-o": self.work} if o.compile_dir else None,
                                     extra_files={"measurement.json": json.dumps(data, indent=4)})
            except writer.OutputDirError as e:
                raise ConvertError(str(e)) from None
            self._finish(f"compile:{tag}")
        # The KV profile of exl2's own cache modes (q4x, q3x; runtime/kv_calib.py), measured on the written model
        # with the conversion's rows: exl2_kv.json, which ExLlamaV2 ignores.  Written after the compile step (which
        # replaces the folder), so a job resumed after it writes the file again; a model that does not fit in
        # memory gets none, and the runtime derives the profile when it loads the model.
        if not (out / kv_calib.PROFILE_FILE).exists():
            rows = self._rows("quant")
            with self._peak(f"kv_profile:{tag}"):
                written = kv_calib.calibrate_dir(out, rows.input_ids, rows.categories, device=o.device)
            self.status({"stage": "kv_profile", "bpw_target": bpw, "file": str(written) if written else None,
                         "message": f"KV profile: {written}" if written else
                         "KV profile: skipped (the model does not fit in free memory; exl2's runtime measures it "
                         "at load)"})
        result = {"bpw_target": bpw, "bpw": strat["bpw"], "output": str(out), "head": report["head"]}
        if o.validate:
            vfile = out / "validation.json"
            if not vfile.exists():
                rows = self._rows("quant")
                vrows = val.held_out_rows(self.in_dir / "tokenizer.json", rows.input_ids, o.validation_rows,
                                          min(o.length, 512), self.cfg.bos_token_id, self.cfg.vocab_size)
                with self._peak(f"validate:{tag}"):
                    v = val.compare(self.in_dir, out, vrows, device=o.device,
                                    progress=self._progress(f"validate {bpw} bpw"))
                val.write(vfile, v)
            result["validation"] = json.loads(vfile.read_text())
            self.status({"stage": "validate", "bpw_target": bpw, **result["validation"]})
        plot = None
        v = result.get("validation")
        if v and "kld_quantiles" in v:
            others = []
            for s in self.work.glob("bpw-*/strategy.json"):    # earlier targets of this work directory
                other = json.loads(s.read_text())
                f = self._compile_dir(other["bpw_target"]) / "validation.json"
                if other["bpw_target"] != bpw and f.parent != out and f.exists():
                    others.append((other["bpw"], json.loads(f.read_text())["kld_mean"]))
            if card.kld_plot(out / "kld.png", v, strat["bpw"], others):
                plot = "kld.png"
        text = card.model_card(base_model=self.in_dir.resolve().name, strat=strat, head=report["head"],
                               head_bits=o.head_bits, calibration=calibration, validation=v,
                               checkpoint_sha256=self.job["params"]["checkpoint_sha256"], tool_version=VERSION,
                               plot=plot, asym=self.asym, source_card=_read_card(self.in_dir))
        _write_text(out / "README.md", text)
        return result

    def _compile_dir(self, bpw: float) -> Path:
        if self.o.compile_dir:
            base = Path(self.o.compile_dir)
            return base if len(self.o.bits) == 1 else base / f"{bpw:g}bpw"
        return self.work / target_dir_name(bpw) / "model"

    def run(self) -> dict:
        self._check_inputs()
        try:
            self.cfg = ModelConfig.from_file(self.in_dir / "config.json")
        except (ValueError, OSError) as e:      # ConfigError names the file already
            named = str(self.in_dir) in str(e)
            raise ConvertError(str(e) if named else f"{self.in_dir / 'config.json'}: {e}") from None
        # checks every tensor's shape; fp32 as the measurement and quantization passes compute (preflight)
        self.parts = ModelParts(self.in_dir, device=self.o.device, dtype=torch.float32)
        self._check_folders()
        self._check_plan()
        finite = self._check_weights()      # before the job folder is made: a refused checkpoint leaves nothing
        self._load_job()
        self.job["weights_finite"] = finite
        self._save()
        data = self.measure()
        results = {"work_dir": str(self.work), "measurement": str(self.work / "measurement.json"), "targets": [],
                   "memory": self.peaks}
        if self.o.measure_only:
            return results
        for bpw in self.o.bits:
            results["targets"].append(self.target(bpw, data))
        return results


def convert(opts: ConvertOptions, status: Status | None = None, progress_factory=None) -> dict:
    """Run (or resume) a conversion; returns a summary with one entry per target bpw."""
    return Job(opts, status, progress_factory).run()
