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
import shutil
from pathlib import Path
from typing import Callable

import torch

from exl2.calibration import CalibrationRows, default_rows, user_rows
from exl2.core.files import write_text_atomic
from exl2.core.threads import fit_threads
from exl2.core.version import VERSION
from exl2.layers.stream import module_specs
from exl2.measure import measurement as mj
from exl2.measure.measure import effective_stride, preflight, run_measurement
from exl2.runtime.config import ModelConfig
from exl2.runtime.loader import ModelParts

from . import stages, writer
from .accounting import decoder_numel
from .jobstate import JOB_ENTRY, ConvertError, JobState, checkpoint_stat, is_job_file, read_job_file, target_dir_name
from .options import ConvertOptions, check_options, resolved_asym

Status = Callable[[dict], None]


class Job:
    """One conversion: set-up checks, the calibration rows, the measurement, then the stages of each target
    (convert/stages.py), recorded in job.json (convert/jobstate.py)."""

    def __init__(self, opts: ConvertOptions, status: Status | None = None, progress_factory=None):
        self.o = opts
        self.status = status or (lambda d: None)
        self.progress_factory = progress_factory     # (description, total) -> callable(done, total)
        self.in_dir = Path(opts.in_dir)
        self.work = Path(opts.work_dir)
        self.state = JobState(self.work)
        self.asym = resolved_asym(opts)
        self.peaks: dict[str, dict] = {}

    # -- set-up -----------------------------------------------------------------------------------

    def _check_inputs(self) -> None:
        for name, why in (("config.json", "is -i a Hugging Face model directory?"),
                          ("tokenizer.json", "a tokenizer.json is required")):
            if not (self.in_dir / name).is_file():
                raise ConvertError(f"{self.in_dir / name}: not found ({why})")
        check_options(self.o)
        if self.o.ray and self.o.ray not in ("local", "auto"):
            from .split import check_address

            check_address(self.o.ray)       # before any work: nothing answers there

    def _check_folders(self) -> None:
        """Before anything is written: the job folder and every output folder are ours to write, and no flag
        makes the job delete or replace a folder it did not create (unlike ExLlamaV2, whose -nr empties
        whatever -o names)."""
        o, work, src = self.o, self.work, self.in_dir
        w, i = work.resolve(), src.resolve()
        if w == i or i in w.parents or w in i.parents:
            where = "is the same folder as" if w == i else "lies inside" if i in w.parents else "contains"
            raise ConvertError(f"-o {work}: {where} -i {src}; the job folder must be a folder of its own")
        if work.exists() and not work.is_dir():
            raise ConvertError(f"-o {work}: exists and is not a folder")
        if work.is_dir():
            entries = sorted(work.iterdir())
            job_file = self.state.file
            if job_file.exists() and not is_job_file(job_file):
                raise ConvertError(f"{job_file}: not a job file of this tool; choose another -o")
            strangers = [e.name + ("/" if e.is_dir() else "") for e in entries if not JOB_ENTRY.fullmatch(e.name)]
            if strangers and (o.fresh or not job_file.exists()):
                shown = ", ".join(strangers[:4]) + (f" and {len(strangers) - 4} more" if len(strangers) > 4 else "")
                what = ("-nr deletes a job folder's own files only" if o.fresh
                        else "it is not a job folder of this tool")
                raise ConvertError(f"-o {work}: holds files that are not part of a job ({shown}); {what}: move them "
                                   f"away or choose a new or empty folder")
        if o.compile_dir:
            for bpw in ([] if o.measure_only else o.bits):
                writer.check_output_dir(self.compile_dir(bpw), "-cf", {"-i": src, "-o": work})

    def make_plan(self):
        from .plan import make_plan

        o = self.o
        return make_plan(self.in_dir, bits=[] if o.measure_only else o.bits, head_bits=o.head_bits, rows=o.rows,
                         length=o.length, measurement_rows=o.measurement_rows,
                         measurement_length=o.measurement_length, measure_stride=o.measure_stride, tables=o.tables,
                         asym=self.asym, device=o.device,
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

    def _check_weights(self) -> list:
        """Every weight finite (each tensor read once); skipped when an earlier run of this job checked the same
        files (names, sizes and times, kept in job.json).  Returns that file list."""
        stat = checkpoint_stat(self.in_dir)
        if read_job_file(self.state.file).get("weights_finite") != stat:
            self.parts.check_finite(self.progress("check weights"))
        return stat

    # -- what the stages share ----------------------------------------------------------------------

    @contextlib.contextmanager
    def peak(self, stage: str):
        """Measure a stage's peak memory; reported with the plan's prediction beside it.  The stage starts with a
        fresh look at the machine's load (``core.threads.fit_threads``), so no thread count an earlier stage
        lowered carries over."""
        from exl2.runtime.memory import PeakMemory

        fit_threads(force=True)
        with PeakMemory() as m:
            yield
        est = self.plan.ram.get(stage.split(":")[0]) if getattr(self, "plan", None) else None
        self.peaks[stage] = {**m.as_dict(), "predicted_bytes": est.bytes if est else None}
        self.status({"stage": "memory", "of": stage, **self.peaks[stage]})

    def finish(self, stage: str) -> None:
        self.state.finish(stage)
        self.status({"stage": stage, "state": "finished"})

    def progress(self, desc: str):
        """The ``(done, total)`` callback of a stage's loop: its progress bar, if any, and a look at the machine's
        load (``core.threads.fit_threads``), so the runtime loops the converter drives (the KV profile, the
        validation's streamed passes) adapt their thread count as the measurement and quantization loops do."""
        bar = self.progress_factory(desc) if self.progress_factory else None

        def update(done, total):
            fit_threads()
            if bar is not None:
                bar(done, total)
        return update

    @property
    def numel(self) -> int:
        return decoder_numel(self.cfg)

    def compile_dir(self, bpw: float) -> Path:
        if self.o.compile_dir:
            base = Path(self.o.compile_dir)
            return base if len(self.o.bits) == 1 else base / f"{bpw:g}bpw"
        return self.work / target_dir_name(bpw) / "model"

    def rows(self, which: str) -> CalibrationRows:
        """The measurement ("measure") or quantization ("quant") rows, made once and kept in cal/."""
        o, cfg = self.o, self.cfg
        path = self.work / "cal" / f"{which}.safetensors"
        n, length = (o.measurement_rows, o.measurement_length) if which == "measure" else (o.rows, o.length)
        if path.exists():
            rows = CalibrationRows.load(path)
            p = rows.provenance
            source = Path(o.cal_dataset).name if o.cal_dataset else "default"
            if (p.get("rows"), p.get("length"), p.get("seed"), p.get("source")) == (n, length, o.seed, source):
                return rows
            # made with other values and no work depends on them yet (the job state refuses otherwise): anew
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

    def qconf_calibration(self) -> dict:
        """The ``calibration`` block of quantization_config: as in ExLlamaV2, the quantization rows actually
        used and their length."""
        rows = self.rows("quant")
        return {"rows": int(rows.input_ids.shape[0]), "length": int(rows.input_ids.shape[1]),
                "dataset": "(default)" if not self.o.cal_dataset else Path(self.o.cal_dataset).name}

    # -- the measurement ----------------------------------------------------------------------------

    def measure(self) -> dict:
        """measurement.json: reused (-m), finished earlier, or measured now."""
        o, params = self.o, self.state.params
        if o.measurement:
            data = mj.load(o.measurement, checkpoint_sha256=params["checkpoint_sha256"], force=o.force_measurement)
            mlp = "block_sparse_moe" if self.cfg.arch.moe else "mlp"
            missing = [f"model.layers.{i}.{m}" for i in range(self.cfg.num_layers) for m in ("self_attn", mlp)
                       if f"model.layers.{i}.{m}" not in data["measurement"]]
            if missing:
                raise ConvertError(f"{o.measurement}: no measurement for {missing[0]} (another model's file?)")
        elif self.state.done("measure"):
            data = mj.load(self.work / "measurement.json")
        else:
            rows = self.rows("measure")
            pf = preflight(self.parts, rows.input_ids[0], device=o.device)
            self.status({"stage": "preflight", "message": pf.report(), "max_abs": pf.max_abs})
            prov = {"tool_version": VERSION, "checkpoint_sha256": params["checkpoint_sha256"],
                    "calibration_sha256": rows.sha256, "rows": int(rows.input_ids.shape[0]),
                    "length": int(rows.input_ids.shape[1]),
                    "calibration": "(default)" if not o.cal_dataset else Path(o.cal_dataset).name,
                    "tables": o.tables, "measure_stride": effective_stride(*rows.input_ids.shape, o.measure_stride)}
            with self.peak("measure"):
                if o.ray:       # layer ranges on Ray workers (convert/split.py)
                    from .split import measure_on_ray

                    data = measure_on_ray(self.in_dir, rows.input_ids, self.work / "measure", address=o.ray,
                                          workers=o.ray_workers, threads=o.ray_threads, provenance=prov,
                                          device=o.device, tables=o.tables, stride=o.measure_stride,
                                          status=self.status,
                                          progress=self.progress("states"))
                else:
                    data = run_measurement(self.in_dir, rows.input_ids, self.work / "measure", device=o.device,
                                           provenance=prov, status=self.status, progress=self.progress("measure"),
                                           modules=module_specs(o.tables), stride=o.measure_stride)
            shutil.copyfile(self.work / "measure" / "measurement.json", self.work / "measurement.json")
            self.finish("measure")
        text = json.dumps(data, indent=4)
        sha = hashlib.sha256(json.dumps(data["measurement"], sort_keys=True).encode()).hexdigest()
        old = params.get("measurement_sha256")
        if old and old != sha:
            # the strategies of this job were chosen from another measurement (another -m)
            if self.state.quantized():
                raise ConvertError(f"{self.work}: finished work used another measurement than "
                                   f"{o.measurement or self.work / 'measurement.json'}; use -nr to start over or "
                                   f"another -o")
            self.state.forget("optimize:")
        params["measurement_sha256"] = sha
        self.state.save()
        if o.output_measurement:
            dest = Path(o.output_measurement)
            if dest.is_dir():
                dest = dest / "measurement.json"
            write_text_atomic(dest, text)
        return data

    # -- one target ---------------------------------------------------------------------------------

    def target(self, bpw: float, data: dict) -> dict:
        tdir = self.work / target_dir_name(bpw)
        tdir.mkdir(exist_ok=True)
        out = self.compile_dir(bpw)
        strat = stages.optimize(self, bpw, data, tdir)
        self.status({"stage": "optimize", "bpw_target": bpw, "bpw": strat["bpw"]})
        report = stages.quantize(self, bpw, strat, tdir)
        stages.compile(self, bpw, strat, data, tdir, out)
        stages.kv_profile(self, bpw, out)
        result = {"bpw_target": bpw, "bpw": strat["bpw"], "output": str(out), "head": report["head"]}
        if self.o.validate:
            result["validation"] = stages.validate(self, bpw, out)
            self.status({"stage": "validate", "bpw_target": bpw, **result["validation"]})
        stages.card(self, bpw, strat, report, result.get("validation"), out)
        return result

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
        self.state.open(self.o, self.in_dir)
        self.state.data["weights_finite"] = finite
        self.state.save()
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
