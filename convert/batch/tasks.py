"""The plan of a batch: a graph of tasks, and what a finished task leaves on disk.

Per model one measurement task, then one quantization task per bpw that takes the measurement's path
from it (a Ray ObjectRef argument, so Ray starts it when the measurement exists)::

    <output>/<name>/measurement.json      the measurement (copied in atomically when it is finished)
    <output>/<name>/<bpw>bpw/             the compiled model, validation.json and model card
    <output>/<name>/.work/measure/        the measurement's converter work dir
    <output>/<name>/.work/bpw-X.XX/       one converter work dir per target

A task whose output is complete is skipped without launching anything.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from exl2.convert.batch.spec import Spec
from exl2.convert.options import BY_NAME, ConvertOptions, read_recorded, recorded, spec_to_options


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
        common = {**spec_to_options(m.settings), "in_dir": m.path, "device": device, "validate": True}
        targets = common.pop("bits")
        split = {"ray": "auto"} if (common.get("ray_workers") or 1) > 1 else {}   # its layer ranges on Ray too
        measure = Task(id=f"{m.name}/measure", kind="measure", model=m.name, bpw=None,
                       output=str(root / "measurement.json"), resources=res,
                       options=dict(common, work_dir=str(root / ".work" / "measure"), measure_only=True, **split))
        tasks.append(measure)
        for b in targets:
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
    want, have = recorded(ConvertOptions(**o), task.bpw), read_recorded(q)
    for path, value in want.items():
        if have[path] != value:
            key = next((opt.key for opt in BY_NAME.values() if opt.recorded_as == path), path)
            return (f"{out} exists with {key} = {have[path]!r} but the spec asks for {value!r}; delete it and "
                    f"{Path(o['work_dir'])} to convert it again")
    return None
