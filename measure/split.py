"""One model's measurement in parts: contiguous layer ranges measured apart (by Ray workers, convert/split.py),
then joined into the measurement.json a single run writes, byte for byte.

The measurement feeds every module the full-precision model's own output, never the quantized one's, so a
layer's entries depend only on its weights and its full-precision input.  Hence:

1. :func:`range_states` runs the full-precision model once over the measurement rows and writes the input
   of each range's first layer (``states-LLLL.safetensors``) to the job folder;
2. :func:`measure_part` measures one range from its file (``part-AAAA-BBBB/``, resumable like a whole run,
   finished when its ``part.json`` exists);
3. :func:`merge_parts` joins the parts in layer order and writes measurement.json.

The states are made by the same module calls the whole run makes (``layers.stream.run_module`` on fp32
weights), and every part runs the measurement's own loop, so the entries equal a single run's exactly when
both run LAPACK's factorisations with the same base thread count (core/threads.py: the only operations whose
last bits depend on it).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from exl2.core.errors import UserError
from exl2.core.files import save_safetensors
from exl2.layers.moe import specs_for
from exl2.layers.stream import MODULES, embed_rows, run_module
from exl2.runtime.loader import ModelParts

from . import measurement as mj
from .measure import PART_FILE, run_measurement, save_measurement


class SplitError(UserError, RuntimeError):
    """A part of a split measurement is missing or does not fit the others."""


def layer_ranges(n_layers: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``0..n_layers`` whose sizes differ by at most one (fewer when the
    model has fewer layers)."""
    parts = max(1, min(parts, n_layers))
    base, extra = divmod(n_layers, parts)
    out, a = [], 0
    for i in range(parts):
        b = a + base + (1 if i < extra else 0)
        out.append((a, b))
        a = b
    return out


def states_path(work: Path, first: int) -> Path:
    return Path(work) / f"states-{first:04d}.safetensors"


def part_dir(work: Path, first: int, stop: int) -> Path:
    return Path(work) / f"part-{first:04d}-{stop:04d}"


def _load_states(path: Path) -> list[torch.Tensor]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return [f.get_tensor(k) for k in sorted(f.keys())]


def _save_states(path: Path, states: list[torch.Tensor]) -> None:
    save_safetensors(path, {f"row.{i:05d}": s.contiguous() for i, s in enumerate(states)})


def range_states(model_dir: str | Path, input_ids: torch.Tensor, ranges: list[tuple[int, int]], work: str | Path,
                 *, device="cpu", progress=None) -> list[Path]:
    """Write the full-precision input of each range's first layer to ``work``; returns the files.

    A rerun starts from the last file written.  ``progress(layers_done, layers)`` is optional.
    """
    from exl2.runtime.model import Rotary

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    firsts = [a for a, _ in ranges]
    files = [states_path(work, a) for a in firsts]
    have = [a for a in firsts if states_path(work, a).exists()]
    if len(have) == len(firsts):
        return files
    parts = ModelParts(model_dir, device=device, dtype=torch.float32)
    if have:
        start, states = max(have), _load_states(states_path(work, max(have)))
    else:
        start, states = 0, embed_rows(parts, input_ids)
        _save_states(states_path(work, 0), states)
    cos, sin = Rotary(parts.cfg).to(device).cos_sin(0, input_ids.shape[1])
    specs = specs_for(parts.cfg, MODULES)
    last = max(firsts)
    for layer in range(start, last):
        block = parts.block(layer)
        with torch.no_grad():
            for spec in specs:
                states = [run_module(block, spec, x.to(device), cos, sin).cpu() for x in states]
        del block
        if layer + 1 in firsts:
            _save_states(states_path(work, layer + 1), states)
        if progress:
            progress(layer + 1, last)
    return files


def measure_part(model_dir: str | Path, input_ids: torch.Tensor, work: str | Path, first: int, stop: int,
                 **kw) -> dict:
    """Measure layers ``first..stop-1`` from the states :func:`range_states` wrote; their entries.  Resumes
    an interrupted part; a finished one is read back.  ``kw``: :func:`run_measurement`'s options."""
    pdir = part_dir(work, first, stop)
    done = pdir / PART_FILE
    if done.exists():
        return json.loads(done.read_text())["measurement"]
    src = states_path(work, first)
    if not src.exists():
        raise SplitError(f"{src}: the input states of layers {first}-{stop - 1} are missing (run range_states)")
    return run_measurement(model_dir, input_ids, pdir, layers=(first, stop), states=_load_states(src), **kw)


def merge_parts(work: str | Path, ranges: list[tuple[int, int]], n_layers: int, out: str | Path,
                provenance: dict | None) -> dict:
    """Join the finished parts (in layer order) into ``out``, the measurement.json of a whole run."""
    covered = [layer for a, b in ranges for layer in range(a, b)]
    if covered != list(range(n_layers)):
        raise SplitError(f"the parts {ranges} do not cover layers 0-{n_layers - 1} once each, in order")
    measurement: dict = {}
    for a, b in ranges:
        path = part_dir(work, a, b) / PART_FILE
        try:
            part = json.loads(path.read_text())
        except FileNotFoundError:
            raise SplitError(f"{path}: layers {a}-{b - 1} are not measured yet") from None
        if part.get("layers") != [a, b]:
            raise SplitError(f"{path}: holds layers {part.get('layers')}, expected [{a}, {b}]")
        measurement.update(part["measurement"])
    save_measurement(Path(out), measurement, n_layers, provenance)
    return mj.load(out)
