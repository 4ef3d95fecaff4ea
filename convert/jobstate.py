"""The job folder's own state: ``job.json`` (parameters, checkpoint hash, finished stages) and the rules that
decide whether a rerun may resume it.

A stage is finished when its name is in ``finished_stages``; work killed part-way (a layer loop's checkpoint
file) counts as started work too.  A rerun that changes a parameter which finished or started work depends
on is refused with a message naming the flag (the parameters and what each invalidates come from
convert/options.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from exl2.calibration.textrows import sha256_file
from exl2.core.errors import UserError
from exl2.core.files import write_json_atomic
from exl2.core.version import VERSION
from exl2.layers.checkpoint import checkpoint_path

from .options import DEFAULT_CHANGED, LEGACY, MEASURE_PARAMS, QUANT_PARAMS, flag_of, resolved_asym, resolved_stride

JOB_FORMAT = 1

# What a job folder holds at its top level (and the temporary names of its atomic writes).
JOB_ENTRY = re.compile(r"\.?(job|measurement)\.json(\.tmp(-\d+)?)?|cal|measure|bpw-\d+\.\d\d")


class ConvertError(UserError, RuntimeError):
    """The job folder cannot be used as asked (changed parameters, not a job folder, not writable)."""


def target_dir_name(bpw: float) -> str:
    return f"bpw-{bpw:.2f}"


def is_job_file(path: Path) -> bool:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and isinstance(d.get("params"), dict) and isinstance(d.get("finished_stages"), list)


def checkpoint_files(model_dir: Path) -> list[Path]:
    return [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]


def checkpoint_stat(model_dir: Path) -> list:
    """Name, size and modification time of each hashed file: when unchanged, the stored hash is reused."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in checkpoint_files(model_dir)]


def checkpoint_sha256(model_dir: Path, known: dict | None = None) -> str:
    """Content hash of config.json and every *.safetensors file (sha256 over "name\\0file-sha256" lines).

    ``known`` is an earlier job's ``{"stat": ..., "sha256": ...}``; if the files' names, sizes and times
    are unchanged its hash is returned without reading the files again (a 72B checkpoint is ~145 GB).
    """
    if known and known.get("stat") == checkpoint_stat(model_dir):
        return known["sha256"]
    h = hashlib.sha256()
    for f in checkpoint_files(model_dir):
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def read_job_file(path: Path) -> dict:
    """An earlier run's job.json as a dict ({} if there is none or it is unreadable)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


class JobState:
    """job.json of one working directory: what the job was asked for and what it has finished."""

    def __init__(self, work: Path):
        self.work = work
        self.file = work / "job.json"
        self.data: dict = {}

    @property
    def params(self) -> dict:
        return self.data["params"]

    def open(self, opts, in_dir: Path) -> dict:
        """Create or resume the job of ``opts`` (after -nr has emptied the folder, if asked); refuse a resume
        whose parameters differ from those that finished or started work used."""
        if opts.fresh and self.work.exists():
            for e in self.work.iterdir():       # the job checked that every entry is the job's
                if e.is_dir() and not e.is_symlink():
                    shutil.rmtree(e)
                else:
                    e.unlink()
        self.work.mkdir(parents=True, exist_ok=True)
        if not os.access(self.work, os.W_OK):
            raise ConvertError(f"{self.work}: output directory is not writable")
        previous = json.loads(self.file.read_text()) if self.file.exists() else {}
        stat = checkpoint_stat(in_dir)
        known = {"stat": previous.get("checkpoint_stat"),
                 "sha256": (previous.get("params") or {}).get("checkpoint_sha256")}
        params = {name: None for name in dict.fromkeys(MEASURE_PARAMS + QUANT_PARAMS)}
        params.update({name: getattr(opts, name) for name in params if hasattr(opts, name)})
        # asym and the stride as the run will use them: "auto" and a stride that short rows lower are not changes
        params.update(checkpoint_sha256=checkpoint_sha256(in_dir, known), asym=resolved_asym(opts),
                      measure_stride=resolved_stride(opts),
                      cal_dataset=str(Path(opts.cal_dataset).resolve()) if opts.cal_dataset else None)
        if previous:
            job = previous
            if job.get("finished_stages") is None or job.get("params") is None:
                raise ConvertError(f"{self.file}: not a job file of this tool; use -nr to start over")
            self._refuse_changes(job["params"], params, job["finished_stages"])
            params["measurement_sha256"] = job["params"].get("measurement_sha256")
            job["params"] = params
        else:
            job = {"format": JOB_FORMAT, "tool_version": VERSION, "in_dir": str(in_dir.resolve()),
                   "params": params, "finished_stages": []}
        job["checkpoint_stat"] = stat
        self.data = job
        self.save()
        return job

    def _refuse_changes(self, old: dict, new: dict, done: list[str]) -> None:
        # Work killed part-way counts as done work: a checkpoint holds layers made with the old values.
        # (Ray runs keep theirs per layer range, measure/split.py part-*/)
        measured = ("measure" in done or checkpoint_path(self.work / "measure", "measure").exists()
                    or any((self.work / "measure").glob("part-*")))
        quantized = self.quantized(done)
        for k in dict.fromkeys(MEASURE_PARAMS + QUANT_PARAMS):
            if k == "measurement_sha256":
                continue
            was = old.get(k, LEGACY.get(k))
            if was != new[k] and ((k in MEASURE_PARAMS and measured) or (k in QUANT_PARAMS and quantized)):
                # an option whose default changed since the job started: it can go on with its own value
                value = format(was, "g") if isinstance(was, float) else was
                keep = f"rerun with {flag_of(k)} {value} to go on, or " if k in DEFAULT_CHANGED else ""
                raise ConvertError(f"{self.work}: finished work used {flag_of(k)} = {was}, this run asks for "
                               f"{new[k]}; {keep}use -nr to start over or another -o")

    def quantized(self, done: list[str] | None = None) -> bool:
        """Whether any target has quantized layers, finished or checkpointed part-way."""
        done = self.data["finished_stages"] if done is None else done
        return (any(s.startswith("quant:") for s in done)
                or any(checkpoint_path(d, "quant").exists() for d in self.work.glob("bpw-*")))

    def save(self) -> None:
        write_json_atomic(self.file, self.data)

    def done(self, stage: str) -> bool:
        return stage in self.data["finished_stages"]

    def finish(self, stage: str) -> None:
        if stage not in self.data["finished_stages"]:
            self.data["finished_stages"].append(stage)
        self.save()

    def forget(self, prefix: str) -> None:
        """Mark every finished stage whose name starts with ``prefix`` as not finished."""
        self.data["finished_stages"] = [s for s in self.data["finished_stages"] if not s.startswith(prefix)]
