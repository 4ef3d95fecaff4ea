"""The `exl2-batch` spec: a TOML file, validated into a Spec (every error one line naming the key).

The format::

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
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from exl2.quant_kernels.qparams import TABLES

# The calibration and target keys of [defaults] / [[model]], with the converter's defaults.
DEFAULTS = {"bpw": [4.125], "head_bits": 6, "rows": 100, "length": 2048, "measurement_rows": 16,
            "measurement_length": 2048, "cal_dataset": None, "validation_rows": 4, "seed": 0, "tables": "exl2",
            "norm": None, "asym": None}          # asym None: "auto", the converter's choice from rows x length
RESOURCE_DEFAULTS = {"num_cpus": 1, "num_gpus": 0, "max_retries": 3, "memory_gb": None}
TOP_KEYS = {"output", "defaults", "resources", "model"}
INT_KEYS = ("head_bits", "rows", "length", "measurement_rows", "measurement_length", "validation_rows", "seed")


class SpecError(ValueError):
    """The spec file is wrong; the message names the file, the model and the key."""


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
