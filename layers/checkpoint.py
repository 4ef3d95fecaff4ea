"""Checkpoint files of the layer loops (measurement, quantization): one file per loop, replaced in one rename.

A loop saves its progress record and its states after every finished layer; a killed run reads them back
and resumes after that layer, so it gives the same result as an uninterrupted one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from exl2.core.files import save_safetensors

CHECKPOINT_KEY = "exl2.progress"       # safetensors metadata key holding the progress record (JSON)


def checkpoint_path(work: Path, name: str) -> Path:
    return Path(work) / f"{name}.checkpoint.safetensors"


def load_checkpoint(work: Path, name: str) -> tuple[dict, list[torch.Tensor]] | None:
    """The progress record and states of an interrupted layer loop, or None to start from scratch.

    Both live in one file (the record in its metadata), written by one rename, so a kill at any moment
    leaves either the previous checkpoint or the new one, never a record from one layer with the states of
    another.  Files of the earlier two-file layout (``*.progress.json`` beside ``*.states.safetensors``) could
    be such a mix, so they are not trusted: the loop starts over.
    """
    path = checkpoint_path(work, name)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt", device="cpu") as f:
        record = json.loads((f.metadata() or {})[CHECKPOINT_KEY])
        states = [f.get_tensor(k) for k in sorted(f.keys())]
    return record, states


def checkpoint_progress(work: Path, name: str) -> dict | None:
    """The progress record alone (read from the file's header), or None without a checkpoint."""
    path = checkpoint_path(work, name)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return json.loads((f.metadata() or {})[CHECKPOINT_KEY])


def save_checkpoint(work: Path, name: str, progress: dict, states: list[torch.Tensor]) -> None:
    """States and progress record together, atomically."""
    save_safetensors(checkpoint_path(work, name), {f"row.{i:05d}": s for i, s in enumerate(states)},
                     metadata={CHECKPOINT_KEY: json.dumps(progress)})


def clear_checkpoint(work: Path, name: str) -> None:
    checkpoint_path(work, name).unlink(missing_ok=True)
    for suffix in (".progress.json", ".states.safetensors"):      # the earlier layout
        (Path(work) / f"{name}{suffix}").unlink(missing_ok=True)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One layer's tensors in one file, written atomically (the quantization pass's ``out_tensor/``)."""
    save_safetensors(path, tensors)
