"""The `exl2-batch` spec: a TOML file, validated into a Spec (every error one line naming the key).

The format::

    output = "/shared/exl2"               # relative paths resolve against the spec file's folder
    [defaults]
    bpw = [3.0, 4.0]
    head_bits = 6
    rows = 100                            # every option of convert/options.py that has a spec key:
    cal_dataset = "/data/cal.parquet"     # bpw, head_bits, cal_dataset, rows, length, measurement_rows,
    tables = "exl2"                       # measurement_length, measure_stride, seed, tables, norm, asym,
                                          # validation_rows; defaults, checks and meaning as exl2-convert's
                                          # flags
    measure_workers = 4                   # split each measurement into this many layer ranges, each a Ray
                                          # task with num_cpus CPUs, or one GPU (exl2-convert --ray-workers;
                                          # default: not split)
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
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from exl2.convert.options import BATCH_DEFAULTS, OptionError, from_spec
from exl2.core.errors import UserError

RESOURCE_DEFAULTS = {"num_cpus": 1, "num_gpus": 0, "max_retries": 3, "memory_gb": None}
TOP_KEYS = {"output", "defaults", "resources", "model"}


class SpecError(UserError, ValueError):
    """The spec file is wrong; the message names the file, the model and the key."""


@dataclass
class Model:
    name: str
    path: str
    settings: dict                  # spec key -> value: [defaults], overridden by the model's own keys
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
    """The [defaults]-style keys of one table, checked and normalised as the converter's options are."""
    try:
        return from_spec(where, table, base)
    except OptionError as e:
        raise SpecError(str(e)) from None


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
    defaults = {**BATCH_DEFAULTS, **_check_settings(f"{source}: [defaults]", data.get("defaults", {}), base)}

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
        models.append(Model(name=name, path=str(path), settings={**defaults, **settings}, resources=res))
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
