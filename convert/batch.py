"""`exl2-batch SPEC.toml`: convert many checkpoints to many bpw targets on a Ray cluster.

The spec (TOML)::

    output = "/shared/exl2"               # relative paths resolve against the spec file's folder
    [defaults]
    bpw = [3.0, 4.0]
    head_bits = 6
    rows = 100                            # also: length, measurement_rows, measurement_length,
    cal_dataset = "/data/cal.parquet"     #       validation_rows, seed (the ConvertOptions defaults),
    tables = "exl2"                       #       tables ("exl2" or "extended"), norm (1 to 4) and
                                          #       asym (0 to 1, or "auto"), as exl2-convert's --tables, --norm,
                                          #       --asym
    [resources]                           # per task
    num_cpus = 1
    num_gpus = 0                          # > 0: the task gets that share of a GPU and runs with device cuda
    max_retries = 3                       # retries after a worker or node dies
    memory_gb = 16                        # optional: RAM Ray reserves per task
    [[model]]
    path = "/models/Qwen2-7B"
    name = "qwen2-7b"                     # default: the folder name
    bpw = [4.0, 5.0]                      # any key of [defaults] may be overridden
    [model.resources]                     # and any key of [resources], for this model's tasks
    num_gpus = 1

The plan is a graph: per model one measurement task, then one quantization task per bpw that takes the
measurement's path from it (a Ray ObjectRef argument, so Ray starts it when the measurement exists)::

    <output>/<name>/measurement.json      the measurement (copied in atomically when it is finished)
    <output>/<name>/<bpw>bpw/             the compiled model, validation.json and model card
    <output>/<name>/.work/measure/        the measurement's converter work dir
    <output>/<name>/.work/bpw-X.XX/       one converter work dir per target

The output folder must be on storage that the driver and every worker see (a shared file system).
A task whose output is complete is skipped without launching anything; a task whose worker dies is
retried by Ray and the converter resumes from its work dir; a failed measurement makes its targets
"skipped" and leaves the other models alone.

Without --address a local Ray instance is started that stays on 127.0.0.1 and opens no connection to
other machines (no cloud metadata probe, no usage report; see ``local_ray_settings``).

Ray is optional (``pip install exl2[cluster]``) and imported only inside the functions that need it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import click

from exl2.quant_kernels.qparams import TABLES

# The calibration and target keys of [defaults] / [[model]], with the converter's defaults.
DEFAULTS = {"bpw": [4.125], "head_bits": 6, "rows": 100, "length": 2048, "measurement_rows": 16,
            "measurement_length": 2048, "cal_dataset": None, "validation_rows": 4, "seed": 0, "tables": "exl2",
            "norm": None, "asym": None}          # asym None: "auto", the converter's choice from rows x length
RESOURCE_DEFAULTS = {"num_cpus": 1, "num_gpus": 0, "max_retries": 3, "memory_gb": None}
TOP_KEYS = {"output", "defaults", "resources", "model"}
INT_KEYS = ("head_bits", "rows", "length", "measurement_rows", "measurement_length", "validation_rows", "seed")

INSTALL_HINT = "exl2-batch needs Ray: pip install 'exl2[cluster]' (or: pip install ray)"

Emit = Callable[[dict], None]


class SpecError(ValueError):
    """The spec file is wrong; the message names the file, the model and the key."""


class BatchError(RuntimeError):
    """The batch cannot start (Ray missing, no cluster at --address, infeasible resources)."""


class TaskError(RuntimeError):
    """One task failed with an error a user can act on; the message is one line."""


# ------------------------------------------------------------------------------------------------
# Spec
# ------------------------------------------------------------------------------------------------

@dataclass
class Model:
    name: str
    path: str
    bpw: list[float]
    head_bits: int
    rows: int
    length: int
    measurement_rows: int
    measurement_length: int
    cal_dataset: str | None
    validation_rows: int
    seed: int
    tables: str
    norm: float | None
    asym: float | None
    resources: "Resources"


@dataclass
class Resources:
    num_cpus: float = 1
    num_gpus: float = 0
    max_retries: int = 3
    memory_gb: float | None = None


@dataclass
class Spec:
    output: str
    resources: Resources
    models: list[Model] = field(default_factory=list)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_settings(where: str, table: dict, base: Path) -> dict:
    """Type-check the [defaults]-style keys of one table; returns them normalised."""
    out = {}
    for key, value in table.items():
        if key == "bpw":
            if _is_number(value):
                value = [value]
            if not isinstance(value, list) or not value or not all(_is_number(b) for b in value):
                raise SpecError(f"{where}: bpw = {value!r}: must be a non-empty list of numbers, e.g. [3.0, 4.0]")
            for b in value:
                if not 1.5 <= b <= 9.0:
                    raise SpecError(f"{where}: bpw {b}: outside any model's feasible range (about 2 to 8 bits per weight)")
            if len({f"{b:g}" for b in value}) != len(value):
                raise SpecError(f"{where}: bpw = {value!r}: lists a target twice")
            out[key] = [float(b) for b in value]
        elif key == "cal_dataset":
            if value is not None and not isinstance(value, str):
                raise SpecError(f"{where}: cal_dataset = {value!r}: must be a path (string)")
            out[key] = str((base / value)) if value else None
        elif key in INT_KEYS:
            if not isinstance(value, int) or isinstance(value, bool):
                raise SpecError(f"{where}: {key} = {value!r}: must be an integer")
            if key == "head_bits" and value not in (2, 3, 4, 5, 6, 8):
                raise SpecError(f"{where}: head_bits = {value}: must be one of 2, 3, 4, 5, 6, 8")
            if key != "seed" and key != "head_bits" and value <= 0:
                raise SpecError(f"{where}: {key} = {value}: must be positive")
            out[key] = value
        elif key == "tables":
            if value not in TABLES:
                raise SpecError(f"{where}: tables = {value!r}: must be one of {', '.join(map(repr, TABLES))}")
            out[key] = value
        elif key == "norm":
            if not _is_number(value) or not 1.0 <= value <= 4.0:
                raise SpecError(f"{where}: norm = {value!r}: must be a number between 1 and 4")
            out[key] = float(value)
        elif key == "asym":
            if value == "auto":
                out[key] = None
                continue
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise SpecError(f"{where}: asym = {value!r}: must be \"auto\" or a number between 0 (off) and 1")
            out[key] = float(value)
        else:
            raise SpecError(f"{where}: unknown key {key!r} (known: {', '.join(DEFAULTS)})")
    return out


def _check_resources(where: str, table, base: dict) -> Resources:
    if not isinstance(table, dict):
        raise SpecError(f"{where}: must be a table")
    res = dict(base)
    for key, value in table.items():
        if key not in RESOURCE_DEFAULTS:
            raise SpecError(f"{where}: unknown key {key!r} (known: {', '.join(RESOURCE_DEFAULTS)})")
        if not _is_number(value) or value < 0:
            raise SpecError(f"{where}: {key} = {value!r}: must be a number >= 0")
        if key == "max_retries" and not isinstance(value, int):
            raise SpecError(f"{where}: max_retries = {value!r}: must be an integer")
        res[key] = value
    if res["num_cpus"] == 0 and res["num_gpus"] == 0:
        raise SpecError(f"{where}: num_cpus and num_gpus are both 0")
    if res["num_gpus"] > 1 and res["num_gpus"] != int(res["num_gpus"]):
        raise SpecError(f"{where}: num_gpus = {res['num_gpus']}: above 1 it must be a whole number")
    return Resources(**res)


def parse_spec(data: dict, base_dir: str | Path = ".", source: str = "spec") -> Spec:
    """Validate a parsed TOML spec; every error is one SpecError naming the key (and the model)."""
    base = Path(base_dir)
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise SpecError(f"{source}: unknown key {unknown[0]!r} (known: output, [defaults], [resources], [[model]])")
    output = data.get("output")
    if not isinstance(output, str) or not output:
        raise SpecError(f"{source}: output: missing (the folder that receives <model name>/<bpw>bpw/)")
    for key in ("defaults", "resources"):
        if not isinstance(data.get(key, {}), dict):
            raise SpecError(f"{source}: {key}: must be a table ([{key}])")
    defaults = {**DEFAULTS, **_check_settings(f"{source}: [defaults]", data.get("defaults", {}), base)}

    resources = _check_resources(f"{source}: [resources]", data.get("resources", {}), RESOURCE_DEFAULTS)

    tables = data.get("model")
    if not isinstance(tables, list) or not tables:
        raise SpecError(f"{source}: no [[model]] tables (each needs path = \"...\")")
    models, seen = [], {}
    for i, t in enumerate(tables, 1):
        label = f"[[model]] #{i}"
        if not isinstance(t, dict):
            raise SpecError(f"{source}: {label}: must be a table")
        if "path" not in t:
            raise SpecError(f"{source}: {label}: missing key 'path'")
        if not isinstance(t["path"], str) or not t["path"]:
            raise SpecError(f"{source}: {label}: path = {t['path']!r}: must be a folder path (string)")
        path = base / t["path"]
        name = t.get("name", path.name)
        if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name:
            raise SpecError(f"{source}: {label}: name = {name!r}: must be a plain folder name")
        label = f"[[model]] {name!r}"
        if name in seen:
            raise SpecError(f"{source}: {label}: name used twice (models #{seen[name]} and #{i}); set name = \"...\"")
        seen[name] = i
        settings = _check_settings(f"{source}: {label}",
                                   {k: v for k, v in t.items() if k not in ("path", "name", "resources")}, base)
        res = _check_resources(f"{source}: {label}: resources", t.get("resources", {}), asdict(resources))
        models.append(Model(name=name, path=str(path), resources=res, **{**defaults, **settings}))
    return Spec(output=str(base / output), resources=resources, models=models)


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: {e.strerror or e}") from None
    try:
        import tomllib
    except ImportError:          # Python 3.10: the same parser as the tomli package
        import tomli as tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML ({e})") from None
    return parse_spec(data, path.resolve().parent, str(path))


# ------------------------------------------------------------------------------------------------
# Plan: a graph of tasks
# ------------------------------------------------------------------------------------------------

@dataclass
class Task:
    id: str                      # "<model>/measure" or "<model>/<bpw>bpw"
    kind: str                    # "measure" | "quantize"
    model: str
    bpw: float | None
    output: str                  # measurement.json, or the compiled model folder
    options: dict                # ConvertOptions keyword arguments
    resources: dict = field(default_factory=dict)   # Resources of this task (Ray options)
    deps: list[str] = field(default_factory=list)


def bpw_dir_name(bpw: float) -> str:
    return f"{bpw:g}bpw"


def plan(spec: Spec) -> list[Task]:
    """Tasks in dependency order: per model its measurement, then one quantization per bpw."""
    tasks = []
    for m in spec.models:
        device = "cuda" if m.resources.num_gpus > 0 else "cpu"
        res = asdict(m.resources)
        root = Path(spec.output) / m.name
        common = dict(in_dir=m.path, head_bits=m.head_bits, cal_dataset=m.cal_dataset, rows=m.rows,
                      length=m.length, measurement_rows=m.measurement_rows,
                      measurement_length=m.measurement_length, seed=m.seed, device=device, tables=m.tables, norm=m.norm,
                      asym=m.asym,
                      validation_rows=m.validation_rows, validate=True)
        measure = Task(id=f"{m.name}/measure", kind="measure", model=m.name, bpw=None,
                       output=str(root / "measurement.json"), resources=res,
                       options=dict(common, work_dir=str(root / ".work" / "measure"), measure_only=True))
        tasks.append(measure)
        for b in m.bpw:
            tasks.append(Task(id=f"{m.name}/{bpw_dir_name(b)}", kind="quantize", model=m.name, bpw=b,
                              output=str(root / bpw_dir_name(b)), deps=[measure.id], resources=res,
                              options=dict(common, work_dir=str(root / ".work" / f"bpw-{b:.2f}"), bits=[b],
                                           compile_dir=str(root / bpw_dir_name(b)))))
    return tasks


def model_problem(path: str | Path) -> str | None:
    """Why PATH is not a model folder the converter can read, in one line; None if it looks right.

    Only names and file types are looked at (and a shard index's file list): no hashing, no tensor
    headers, so it is cheap enough for --dry-run on large checkpoints.
    """
    d = Path(path)
    if not d.exists():
        return f"{d}: not found"
    if not d.is_dir():
        return f"{d}: not a directory (a model folder holds config.json, tokenizer.json and *.safetensors)"
    missing = [n for n in ("config.json", "tokenizer.json") if not (d / n).is_file()]
    index = d / "model.safetensors.index.json"
    try:
        shards = sorted(p.name for p in d.glob("*.safetensors"))
        pickles = [] if shards else sorted(p.name for p in d.iterdir()
                                           if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    except OSError as e:
        return f"{d}: {e.strerror or e}"
    if not shards:
        missing.append("*.safetensors" + (f" (only pickle checkpoints: {', '.join(pickles)})" if pickles else ""))
    elif index.is_file():
        try:
            wanted = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{index}: malformed index ({type(e).__name__})"
        absent = sorted(w for w in wanted if not (d / w).is_file())
        if absent:
            return f"{index}: lists {absent[0]}, which does not exist" + (
                f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
    if missing:
        return f"{d}: no {', no '.join(missing)}"
    return None


def is_complete(task: Task) -> bool:
    """Finished output: measurement.json, or a compiled model with config.json, validation.json and card."""
    out = Path(task.output)
    if task.kind == "measure":
        return out.is_file()
    return all((out / f).is_file() for f in ("config.json", "validation.json", "README.md"))


def mismatch(task: Task) -> str | None:
    """For a complete target: why its quantization_config disagrees with the spec (None if it agrees).

    Skipping goes by the outputs' presence, so a spec edited after a run would otherwise be ignored
    silently.  (measurement.json is not compared: its recorded row length can legitimately differ.)
    """
    if task.kind != "quantize":
        return None
    out = Path(task.output)
    try:
        q = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError) as e:
        return f"{out / 'config.json'}: unreadable ({e})"
    o = task.options
    want = {"bits": task.bpw, "head_bits": o["head_bits"],
            "calibration": {"rows": o["rows"], "length": o["length"],
                            "dataset": Path(o["cal_dataset"]).name if o["cal_dataset"] else "(default)"}}
    ours = q.get("exl2") or {}
    have = {**{k: q.get(k) for k in want}, "tables": ours.get("tables", "exl2"), "norm": ours.get("norm"),
            "asym": ours.get("asym", 0.0)}
    from exl2.convert.api import auto_asym

    asym = auto_asym(o["rows"], o["length"]) if o["asym"] is None else o["asym"]
    want.update(tables=o["tables"], norm=o["norm"], asym=asym)  # outputs written before these existed: defaults
    for key, value in want.items():
        if have[key] != value:
            return (f"{out} exists with {key} = {have[key]!r} but the spec asks for {value!r}; delete it and "
                    f"{Path(o['work_dir'])} to convert it again")
    return None


# ------------------------------------------------------------------------------------------------
# One task, in a Ray worker (plain function: callable without Ray too)
# ------------------------------------------------------------------------------------------------

def _resume_state(work_dir: Path) -> dict:
    """What an earlier attempt left in the work dir (reported with the 'running' event)."""
    state = {}
    job = work_dir / "job.json"
    if job.is_file():
        with contextlib.suppress(OSError, ValueError):
            state["finished_stages"] = json.loads(job.read_text()).get("finished_stages", [])
    # A layer loop's checkpoint holds its progress record in the safetensors header.
    from exl2.measure.stream import checkpoint_progress

    for ckpt in sorted(work_dir.glob("*/*.checkpoint.safetensors")):
        with contextlib.suppress(Exception):      # unreadable: reported as nothing, the converter decides
            record = checkpoint_progress(ckpt.parent, ckpt.name.removesuffix(".checkpoint.safetensors"))
            if record.get("next_layer") is not None:
                state[f"{ckpt.parent.name}/{ckpt.name}"] = {"next_layer": record["next_layer"]}
    return state


def _fault_hook(task_id: str) -> Callable[[dict], None]:
    """Fault injection for tests: EXL2_BATCH_FAULT='[{"task": ID, "event": {...}, "marker": PATH}, ...]'
    makes the worker of task ID kill itself (SIGKILL) at the first converter event that contains
    ``event``, once: the marker file records that it happened (and the pid)."""
    raw = os.environ.get("EXL2_BATCH_FAULT")
    faults = json.loads(raw) if raw else []
    fault = next((f for f in ([faults] if isinstance(faults, dict) else faults) if f.get("task") == task_id), None)
    if fault is None:
        return lambda e: None
    marker, want = Path(fault["marker"]), fault.get("event", {})

    def hook(e: dict) -> None:
        if all(e.get(k) == v for k, v in want.items()) and not marker.exists():
            marker.write_text(json.dumps({"task": task_id, "pid": os.getpid(), "event": e}))
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def _copy_atomic(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def run_task(task: dict, measurement=None, sink=None) -> dict:
    """Run one task with the converter (resuming its work dir); raises TaskError with one line.

    ``measurement`` is the upstream task's result (or the path of an existing measurement.json);
    ``sink`` an event actor (or None).
    """
    from exl2.calibration import CalibrationError
    from exl2.convert.api import ConvertError, ConvertOptions, convert
    from exl2.convert.quantize import QuantizeError
    from exl2.measure.measure import MeasureError
    from exl2.measure.measurement import MeasurementError
    from exl2.quant_kernels.gptq import HessianError
    from exl2.runtime.arch import ConfigError
    from exl2.runtime.loader import CheckpointError

    t = Task(**task)
    work = Path(t.options["work_dir"])
    running = {"task": t.id, "state": "running", "pid": os.getpid(), "host": os.uname().nodename}
    resume = _resume_state(work)
    if resume:
        running["resume"] = resume
    if sink is not None:
        import ray

        ray.get(sink.post.remote(running))
    opts = dict(t.options)
    if t.kind == "quantize":
        opts["measurement"] = measurement["measurement"] if isinstance(measurement, dict) else measurement
    hook = _fault_hook(t.id)
    t0 = time.time()
    try:
        # The worker's stdout reaches the driver's stdout; keep that clean for --status-json.
        with contextlib.redirect_stdout(sys.stderr):
            work.mkdir(parents=True, exist_ok=True)
            result = convert(ConvertOptions(**opts), status=hook)
            if t.kind == "measure":
                Path(t.output).parent.mkdir(parents=True, exist_ok=True)
                _copy_atomic(Path(result["measurement"]), Path(t.output))
    except (ConvertError, CheckpointError, ConfigError, CalibrationError, MeasurementError, MeasureError,
            HessianError, QuantizeError) as e:
        raise TaskError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    except OSError as e:
        raise TaskError(f"{e.filename}: {e.strerror or e}" if e.filename else str(e)) from None
    except Exception as e:   # a bug: one line for the summary, the traceback in the worker's log
        traceback.print_exc()
        raise TaskError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    out = {"seconds": round(time.time() - t0, 1)}
    if t.kind == "measure":
        out["measurement"] = t.output
    else:
        r = result["targets"][0]
        out.update(bpw=r["bpw"], output=r["output"])
        v = r.get("validation")
        if v:
            out.update({k: v[k] for k in ("ppl_fp16", "ppl_exl2", "kld_mean", "top1_agreement") if k in v})
    return out


class _EventSink:
    """A tiny actor that collects the workers' 'running' events for the driver."""

    def __init__(self):
        self.events = []

    def post(self, event: dict) -> None:
        self.events.append(event)

    def drain(self) -> list[dict]:
        out, self.events = self.events, []
        return out


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def _import_ray():
    try:
        import ray
    except ImportError:
        raise BatchError(INSTALL_HINT) from None
    return ray


def _connect(ray, address: str | None, num_cpus: int | None, object_store_mb: int | None) -> bool:
    """Connect to a cluster (address) or start a local instance; True if this call started Ray."""
    if address and address != "auto" and "://" not in address:
        _probe(address)
    if ray.is_initialized():
        return False
    import logging

    kw = dict(include_dashboard=False, logging_level=logging.WARNING)
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            with local_ray_settings():
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1,
                         object_store_memory=(object_store_mb or 256) * 1024 * 1024,
                         _node_ip_address="127.0.0.1", **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise BatchError(f"--address {address}: cannot connect to a Ray cluster ({str(e).splitlines()[0]})"
                         if address else f"cannot start a local Ray instance ({str(e).splitlines()[0]})") from None
    return True


# What a local Ray instance (no --address) is started with so that it talks to nobody but itself.  Ray's
# defaults would make it look for the machine's outward address (a UDP socket "connected" to 8.8.8.8:53)
# and start an API server whose usage-stats module asks the cloud metadata services (169.254.169.254,
# after a DNS lookup of metadata.google.internal) which cloud it runs on, whether or not usage stats are
# enabled.  The environment is inherited by every process ray.init starts (GCS, raylet, agents) and,
# through the raylet, by every worker.
LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's switch for a single-machine instance (the default on Windows and macOS): the node address is
    # 127.0.0.1 instead of the address of the route to the internet.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def _usage_stats_explicitly_on() -> bool:
    """True if the user turned Ray's usage stats on (environment or ~/.ray/config.json)."""
    if os.environ.get("RAY_USAGE_STATS_ENABLED") == "1":
        return True
    try:
        from ray._common.usage import usage_lib

        return usage_lib._usage_stats_enabledness() is usage_lib.UsageStatsEnabledness.ENABLED_EXPLICITLY
    except Exception:       # noqa: BLE001 - another Ray layout: only the environment counts
        return False


@contextlib.contextmanager
def local_ray_settings():
    """Around ray.init of a local instance: the settings of LOCAL_RAY_ENV, and no API server process.

    A variable the user set is left as it is; a user who turned usage stats on also keeps the API server
    (it is the process that reports them).  Everything is undone on exit: processes started inside keep
    what they inherited, the calling process gets its own environment back.
    """
    saved = {k: os.environ.get(k) for k in LOCAL_RAY_ENV}
    patches = []                      # (object, attribute, original value)
    try:
        usage_on = _usage_stats_explicitly_on()
        for key, value in LOCAL_RAY_ENV.items():
            if key in os.environ or (key == "RAY_USAGE_STATS_ENABLED" and usage_on):
                continue
            os.environ[key] = value
            if key == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER":
                # ray read this variable when it was imported; the driver needs the value now too.
                with contextlib.suppress(ImportError):
                    from ray._private import ray_constants

                    if hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
                        patches.append((ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER))
                        ray_constants.ENABLE_RAY_CLUSTER = False
        if not usage_on:
            # With include_dashboard=False the API server runs only the usage-stats module (and that one
            # probes the clouds at start); Ray's own path for an API server that failed to start is taken.
            with contextlib.suppress(ImportError):
                from ray._private import services

                if hasattr(services, "start_api_server"):
                    patches.append((services, "start_api_server", services.start_api_server))
                    services.start_api_server = _no_api_server
        yield
    finally:
        for obj, attr, value in reversed(patches):
            setattr(obj, attr, value)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _no_api_server(*args, **kwargs):
    return "", None           # (dashboard URL, process): no URL, no process


def _probe(address: str, timeout: float = 10.0) -> None:
    """Fail fast on an unreachable HOST:PORT (ray.init would retry for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BatchError(f"--address {address}: expected 'auto' or HOST:PORT (the head node's GCS, port 6379 by default)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise BatchError(f"--address {address}: no Ray head node answers there ({e.strerror or e}); "
                         "start one with `ray start --head`") from None


def _check_feasible(ray, tasks: list[Task], local: bool, warn: Emit) -> None:
    total = ray.cluster_resources()
    for key in ("CPU", "GPU"):
        need = max(t.resources[f"num_{key.lower()}s"] for t in tasks)
        have = total.get(key, 0)
        if need > have:
            msg = (f"[resources] num_{key.lower()}s = {need:g} per task, but the cluster has {have:g} {key}s"
                   + ("" if local else " (waiting for the autoscaler, if there is one)"))
            if local:
                raise BatchError(msg)
            warn(msg)


def _one_line(e: BaseException, retries: int) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(cause, TaskError):
        return str(cause)
    if cause is not None and not isinstance(cause, type(e)):
        return _one_line(cause, retries)
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    msg = f"{type(e).__name__}: {first}"[:300]
    if type(e).__name__ in ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError"):
        msg += f" (after {retries} retries; rerun to resume)"
    return msg


def run_batch(spec: Spec, *, address: str | None = None, num_cpus: int | None = None,
              object_store_mb: int | None = None, emit: Emit | None = None) -> dict:
    """Run the spec's plan; returns {"tasks": [...], "succeeded": n, "skipped": n, "failed": n}.

    emit receives one dict per task state change: queued, running, finished, failed, skipped.
    Already-complete tasks are skipped before Ray is touched (or failed, if made with other parameters);
    if nothing is left to do Ray is not started.
    """
    emit = emit or (lambda e: None)
    tasks = plan(spec)
    by_id = {t.id: t for t in tasks}
    records: dict[str, dict] = {}

    def record(t: Task, state: str, **extra) -> None:
        rec = {"task": t.id, "model": t.model, "kind": t.kind, "bpw_target": t.bpw, "state": state, **extra}
        records[t.id] = rec
        emit(dict(rec, time=round(time.time(), 3)))

    todo = []
    for t in tasks:
        if is_complete(t):
            why = mismatch(t)
            if why:
                record(t, "failed", error=why)
            else:
                record(t, "skipped", reason="already done", output=t.output)
        else:
            todo.append(t)

    if todo:
        ray = _import_ray()
        started = _connect(ray, address, num_cpus, object_store_mb)
        try:
            _check_feasible(ray, todo, local=started and not address,
                            warn=lambda m: click.echo(f"warning: {m}", err=True))
            _execute(ray, spec, todo, by_id, records, record, emit)
        finally:
            if started:
                ray.shutdown()

    summary = {"tasks": [records[t.id] for t in tasks]}
    for state, key in (("finished", "succeeded"), ("skipped", "skipped"), ("failed", "failed")):
        summary[key] = sum(r["state"] == state for r in summary["tasks"])
    return summary


def _execute(ray, spec: Spec, todo: list[Task], by_id: dict, records: dict, record, emit: Emit) -> None:
    plain = ray.remote(run_task)

    def remote_for(res: dict):
        opts = dict(num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], max_retries=res["max_retries"],
                    retry_exceptions=False)         # a ConvertError is final; a dead worker is retried
        if res["memory_gb"]:
            opts["memory"] = int(res["memory_gb"] * 1024 ** 3)
        return plain.options(**opts)

    sink = ray.remote(num_cpus=0)(_EventSink).remote()

    refs: dict[str, object] = {}
    for t in todo:
        if t.kind == "quantize":
            dep = t.deps[0]
            upstream = refs.get(dep, by_id[dep].output)     # an ObjectRef, or the finished measurement's path
        else:
            upstream = None
        refs[t.id] = remote_for(t.resources).remote(asdict(t), upstream, sink)
        record(t, "queued")

    pending = {refs[t.id]: t for t in todo}

    def forward(events):
        for e in events:
            t = by_id[e["task"]]
            emit({"task": t.id, "model": t.model, "kind": t.kind, "bpw_target": t.bpw, **e, "time": round(time.time(), 3)})

    def settle(ref) -> None:
        t = pending.pop(ref)
        try:
            out = ray.get(ref)
        except Exception as e:           # noqa: BLE001 - every failure becomes a record
            if t.deps and t.deps[0] not in records:      # its measurement failed too: report that first
                settle(refs[t.deps[0]])
            dep = records.get(t.deps[0]) if t.deps else None
            if dep is not None and dep["state"] == "failed":
                record(t, "skipped", reason=f"{dep['task']} failed: {dep['error']}")
            else:
                record(t, "failed", error=_one_line(e, t.resources["max_retries"]))
            return
        record(t, "finished", **out)

    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.5)
        forward(ray.get(sink.drain.remote()))
        for ref in sorted(ready, key=lambda r: todo.index(pending[r]) if r in pending else -1):
            if ref in pending:
                settle(ref)
    forward(ray.get(sink.drain.remote()))
    with contextlib.suppress(Exception):
        ray.kill(sink)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _print_table(summary: dict) -> None:
    rows = []
    for r in summary["tasks"]:
        state = {"finished": "ok"}.get(r["state"], r["state"])
        if r["state"] == "finished" and r["kind"] == "quantize":
            detail = f"{r['bpw']:.3f} bpw" + (f", KLD {r['kld_mean']:.4f}, ppl {r['ppl_exl2']:.3f}"
                                                 if "kld_mean" in r else "")
            detail += f"  -> {r['output']}"
        elif r["state"] == "finished":
            detail = f"-> {r['measurement']}"
        else:
            detail = r.get("error") or r.get("reason") or ""
        rows.append((r["task"], state, f"{r['seconds']:.0f}s" if "seconds" in r else "", detail))
    w = max([len(x[0]) for x in rows] + [4])
    click.echo(f"{'task':<{w}}  {'state':<7}  {'time':>5}  detail")
    for task, state, secs, detail in rows:
        click.echo(f"{task:<{w}}  {state:<7}  {secs:>5}  {detail}")
    click.echo(f"succeeded {summary['succeeded']}, skipped {summary['skipped']}, failed {summary['failed']}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
               help="Convert the models of SPEC (TOML) to every bpw target, as Ray tasks.\n\n"
                    "Finished outputs are skipped; rerunning the same command resumes the batch. "
                    "Exit status 1 if a task failed, 2 for a bad spec, a bad model folder (--dry-run) or no Ray.")
@click.argument("spec_file", metavar="SPEC.toml", type=click.Path())
@click.option("--address", default=None,
              help="Ray cluster to use ('auto', or HEAD_IP:6379). Default: start a local Ray instance.")
@click.option("--num-cpus", type=int, default=None,
              help="CPUs of the local Ray instance (without --address). Default: all.")
@click.option("--object-store-mb", type=int, default=256, show_default=True,
              help="Object store of the local Ray instance (tasks exchange only paths).")
@click.option("--dry-run", is_flag=True,
              help="Validate the spec and the model folders, print the plan; run nothing.")
@click.option("--status-json", is_flag=True,
              help="Print one JSON object per task state change, then a summary object.")
def main(spec_file, address, num_cpus, object_store_mb, dry_run, status_json):
    try:
        spec = load_spec(spec_file)
    except SpecError as e:
        _fail(str(e))
    if dry_run:
        tasks = plan(spec)
        todo = {t.model for t in tasks if not is_complete(t)}
        # A model whose every output is finished is not read again: its folder may be gone.
        bad = [(m.name, why) for m in spec.models if m.name in todo and (why := model_problem(m.path))]
        for name, why in bad:
            click.echo(f"error: {spec_file}: [[model]] {name!r}: {why}", err=True)
        if bad:
            sys.exit(2)
        for t in tasks:
            state = "done" if is_complete(t) else "todo"
            after = f"  (after {t.deps[0]})" if t.deps else ""
            click.echo(f"{state}  {t.id:<32} -> {t.output}{after}")
        return
    emit = (lambda e: click.echo(json.dumps(e, default=str))) if status_json else None
    try:
        summary = run_batch(spec, address=address, num_cpus=num_cpus, object_store_mb=object_store_mb, emit=emit)
    except BatchError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command to resume")
    if status_json:
        click.echo(json.dumps({"state": "done", **{k: summary[k] for k in ("succeeded", "skipped", "failed")}}))
    else:
        _print_table(summary)
    sys.exit(1 if summary["failed"] else 0)


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    # Import the module under its real name so that Ray pickles run_task by reference, not by value.
    from exl2.convert.batch import main as _main

    _main()
