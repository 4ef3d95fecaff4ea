"""measurement.json: ExLlamaV2's schema, plus the provenance a user needs before reusing one.

Layout (docs/format.md section 11)::

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
``token_err`` (the per-token error our optimizer prefers, see measure/measure.py token_error) travel with the file
without disturbing it; a file written by ExLlamaV2 has neither and is accepted.

Order of a module's entries.  ExLlamaV2's optimizer (exllamav2/conversion/optimize.py) is partly
index-based.  Its anneal (C++ ``sim_anneal``) starts every module at entry 0 and then tries entries at random,
accepting a move only if the new total fits the budget, so it needs entry 0 to be (near) the cheapest but
is otherwise blind to the order.  The top-up that follows is not: it moves each module to its *next* entry
whenever the cost difference fits the leftover budget, and repeats until nothing moves, which assumes the
cost grows with the index (a move to a cheaper entry always "fits").  So:

* a list that is exactly ExLlamaV2's own table keeps ExLlamaV2's order (files of the default tables are
  written exactly as before; for some shapes that order has small cost dips, as ExLlamaV2's own files do);
* any other list (``--tables extended``: ExLlamaV2's combinations plus ours) is written sorted by
  ``total_bits``, at equal cost the less accurate entry first (the top-up crosses equal-cost entries for
  free, so it ends on the best of them); see :func:`order_for_exllamav2`.

Our own optimizer does not depend on the order; the index a strategy records (``"option"``) is the index in
the file it was chosen from, and files written before this ordering (extended entries appended after
ExLlamaV2's) are read as they are.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from exl2.core.errors import UserError
from exl2.core.files import write_json_atomic
from exl2.quant_kernels.qparams import ATTN_OPTIONS, ATTN_PROJ, MLP_OPTIONS, MLP_PROJ, MOE_PROJ, QParams

FORMAT = 1


class MeasurementError(UserError, ValueError):
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
    return {p: QParams.from_dict(e[p]) for p in (*ATTN_PROJ, *MLP_PROJ, *MOE_PROJ) if p in e}


def _is_pre_0_0_11(data: dict) -> bool:
    """A measurement written by ExLlamaV2 0.0.10 or earlier.

    ExLlamaV2 0.0.11 (December 2023, "Rework quantization and optimization") replaced the measurement
    format.  Before it, each *linear layer* was measured on its own: ``measurement`` was a JSON list of
    records ``{"key": "model.layers.0.self_attn.q_proj", "numel": ..., "options": [...]}`` whose options held
    ``desc``, ``bpw``, a float ``total_bits``, a relative error ``err`` and the option under ``qparams``, and
    the file also carried ``base_perplexity``.  From 0.0.11 on, whole modules (attention, MLP) are measured
    per combination of projection options: ``measurement`` is an object keyed by module, each entry holds
    ``accuracy``, an integer ``total_bits`` and one option per projection, and ``base_perplexity`` is gone.
    ``last_module_idx`` (the index of the last measured module) is in both, so it tells nothing apart; the
    list-of-layers shape, the ``options``/``err`` records and ``base_perplexity`` do.
    """
    m = data.get("measurement")
    if isinstance(m, list):
        return True
    if "base_perplexity" in data:
        return True
    if isinstance(m, dict):
        for v in m.values():
            if isinstance(v, dict) and "options" in v:
                return True
            if isinstance(v, list) and v and isinstance(v[0], dict) and "err" in v[0] and "accuracy" not in v[0]:
                return True
    return False


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_values(e: dict, where: str, key: str, i: int) -> None:
    """accuracy in [0, 1], total_bits a positive whole number, token_err (ours) a finite number >= 0.

    ExLlamaV2 writes accuracy as ``max(1e-6, 1 - mean relative error)``, so from it the value is never 0,
    never above 1 and never NaN (a NaN error becomes 1e-6 there).  A NaN, an infinity, ``null`` or a string
    here means a broken or hand-edited file; the optimizers would read NaN as zero error.
    """
    acc = e["accuracy"]
    if not _number(acc) or not 0.0 <= acc <= 1.0:
        raise MeasurementError(f"{where}: {key}[{i}]: accuracy must be a finite number in [0, 1], got {acc!r}")
    bits = e["total_bits"]
    if not _number(bits) or bits <= 0 or bits != int(bits):
        raise MeasurementError(f"{where}: {key}[{i}]: total_bits must be a positive whole number, got {bits!r}")
    if "token_err" in e:
        te = e["token_err"]
        if not _number(te) or te < 0:
            raise MeasurementError(f"{where}: {key}[{i}]: token_err must be a finite number >= 0, got {te!r}")


def _check(data, where: str) -> dict:
    if isinstance(data, dict) and _is_pre_0_0_11(data):
        raise MeasurementError(f"{where}: written by ExLlamaV2 before 0.0.11 (per-layer 'options' records), a format "
                               f"neither ExLlamaV2 since 0.0.11 nor this tool reads; measure the model again")
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
            _check_values(e, where, key, i)
            projs = [p for p in (*ATTN_PROJ, *MLP_PROJ, *MOE_PROJ) if p in e]
            if not projs:
                raise MeasurementError(f"{where}: {key}[{i}] names no projection")
            try:
                entry_options(e)
            except (KeyError, TypeError, ValueError) as err:
                raise MeasurementError(f"{where}: {key}[{i}] has a bad option: {err}") from None
    if "last_module_idx" not in data:
        raise MeasurementError(f"{where}: missing 'last_module_idx'")
    idx = data["last_module_idx"]
    if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
        raise MeasurementError(f"{where}: 'last_module_idx' must be a non-negative integer, got {idx!r}")
    return data


def _is_exllamav2_table(entries: list[dict]) -> bool:
    """Whether a module's entries are exactly ExLlamaV2's attention or MLP table, in its order."""
    try:
        rows = [tuple(entry_options(e).values()) for e in entries]
    except (KeyError, TypeError, ValueError):
        return False
    return rows in ([tuple(r) for r in ATTN_OPTIONS], [tuple(r) for r in MLP_OPTIONS])


def order_for_exllamav2(entries: list[dict]) -> list[dict]:
    """A module's entries in an order ExLlamaV2's optimizer handles (see the module docstring).

    ExLlamaV2's own table stays in its order.  Anything else is sorted by ``total_bits``, so its top-up
    (move a module to the next entry while the budget allows) only ever moves to a dearer entry; equal costs
    put the lower accuracy first, so a walk across them ends on the best; the sort is stable beyond that.
    """
    if _is_exllamav2_table(entries):
        return list(entries)
    return sorted(entries, key=lambda e: (int(e["total_bits"]), float(e["accuracy"])))


def save(path: str | os.PathLike, measurement: dict, last_module_idx: int, provenance: dict | None = None) -> None:
    """Write atomically (temporary name, then rename); each module's entries in :func:`order_for_exllamav2`'s
    order (a list that is ExLlamaV2's own table is written as given)."""
    _check({"measurement": measurement, "last_module_idx": int(last_module_idx)}, str(path))
    measurement = {k: None if v is None else order_for_exllamav2(v) for k, v in measurement.items()}
    data = {"measurement": measurement, "last_module_idx": int(last_module_idx)}
    if provenance is not None:
        data["exl2"] = {"format": FORMAT, **provenance}
    _check(json.loads(json.dumps(data)), str(path))
    write_json_atomic(path, data, indent=4)


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
