"""measurement.json: ExLlamaV2's schema, plus the provenance a user needs before reusing one.

Layout (EXL2-SPEC.md 2.2)::

    {
      "measurement": {
        "model.layers.0.self_attn": [            # one entry per combination of the option table
          {"accuracy": 0.9612, "total_bits": 34012345,
           "q_proj": {"group_size": {"3": 64, "2": 64}, "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4},
           "k_proj": {...}, "v_proj": {...}, "o_proj": {...}},
          ...
        ],
        "model.layers.0.mlp": [...],             # gate_proj / up_proj / down_proj
        ...
        "model.norm.norm": null,
        "lm_head.linear": null
      },
      "last_module_idx": 58,
      "exl2": {"format": 1, "tool_version": "...", "checkpoint_sha256": "...", "calibration_sha256": "...",
               "rows": 16, "length": 2048}
    }

ExLlamaV2 reads only ``measurement`` and ``last_module_idx`` (``-m FILE``), and of each entry only
``accuracy``, ``total_bits`` and the projections, so the ``exl2`` block and our extra per-entry field
``token_err`` (the per-token error our optimizer prefers, see measure/stream.py) travel with the file
without disturbing it; a file written by ExLlamaV2 has neither and is accepted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from exl2.quant_kernels.qparams import ATTN_PROJ, MLP_PROJ, QParams

FORMAT = 1


class MeasurementError(ValueError):
    """A measurement file is malformed, or does not belong to the model it is used with."""


def entry(accuracy: float, options: dict[str, QParams], shapes: dict[str, tuple[int, int, bool]]) -> dict:
    """One combination's record: accuracy, the module's total bits and each projection's option.

    ``shapes[proj] = (K, N, has_bias)``; total bits are counted as :meth:`QParams.total_bits` does.
    """
    out = {"accuracy": float(accuracy),
           "total_bits": int(sum(qp.total_bits(*shapes[p]) for p, qp in options.items()))}
    for p, qp in options.items():
        out[p] = qp.to_dict()
    return out


def entry_options(e: dict) -> dict[str, QParams]:
    """The per-projection options of one record."""
    return {p: QParams.from_dict(e[p]) for p in (*ATTN_PROJ, *MLP_PROJ) if p in e}


def _check(data, where: str) -> dict:
    if not isinstance(data, dict) or "measurement" not in data:
        raise MeasurementError(f"{where}: not a measurement file (no 'measurement' object)")
    m = data["measurement"]
    if not isinstance(m, dict):
        raise MeasurementError(f"{where}: 'measurement' must be an object")
    for key, entries in m.items():
        if entries is None:
            continue
        if not isinstance(entries, list) or not entries:
            raise MeasurementError(f"{where}: module {key} must have a non-empty list of options")
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or "accuracy" not in e or "total_bits" not in e:
                raise MeasurementError(f"{where}: {key}[{i}] needs 'accuracy' and 'total_bits'")
            projs = [p for p in (*ATTN_PROJ, *MLP_PROJ) if p in e]
            if not projs:
                raise MeasurementError(f"{where}: {key}[{i}] names no projection")
            try:
                entry_options(e)
            except (KeyError, TypeError, ValueError) as err:
                raise MeasurementError(f"{where}: {key}[{i}] has a bad option: {err}") from None
    if "last_module_idx" not in data:
        raise MeasurementError(f"{where}: missing 'last_module_idx'")
    return data


def save(path: str | os.PathLike, measurement: dict, last_module_idx: int, provenance: dict | None = None) -> None:
    """Write atomically (temporary name, then rename)."""
    data = {"measurement": measurement, "last_module_idx": int(last_module_idx)}
    if provenance is not None:
        data["exl2"] = {"format": FORMAT, **provenance}
    _check(json.loads(json.dumps(data)), str(path))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=4))
    os.replace(tmp, path)


def load(path: str | os.PathLike, checkpoint_sha256: str | None = None, force: bool = False) -> dict:
    """Read and check a measurement file (ours or ExLlamaV2's).

    If both the file and the caller know the checkpoint's content hash and they differ, the file is
    refused unless ``force``: a measurement of another model gives a wrong allocation silently.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "measurement.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MeasurementError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MeasurementError(f"{path}: cannot read measurement ({e})") from None
    _check(data, str(path))
    prov = data.get("exl2") or {}
    theirs = prov.get("checkpoint_sha256")
    if checkpoint_sha256 and theirs and theirs != checkpoint_sha256 and not force:
        raise MeasurementError(f"{path}: measured on another checkpoint (sha256 {theirs[:12]}…, this one "
                               f"{checkpoint_sha256[:12]}…); pass --force-measurement to use it anyway")
    return data
