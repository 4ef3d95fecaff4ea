"""One model's measurement spread over Ray workers by layer ranges (``exl2-convert --ray``, and an exl2-batch
measurement task with ``measure_workers``); the pieces are measure/split.py's.

This process computes each range's input states (one full-precision pass, into the job folder, which every
worker must see: a shared file system on a cluster), then one Ray task per range measures it, writing a
partial measurement there, and this process joins the parts into measurement.json.  A worker that dies is
retried by Ray and resumes its range from its own checkpoint; a part finished by an earlier run is not
measured again.  Each task computes with as many threads as the CPUs it asks Ray for (``threads``), the
same count a single-process run uses, so the result is the same bytes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from exl2.core.errors import UserError
from exl2.core.threads import base_threads, set_base_threads
from exl2.measure.measure import MEASURE_STRIDE

from .jobstate import ConvertError


def _part_task(model_dir: str, input_ids: torch.Tensor, work: str, first: int, stop: int, threads: int,
               device: str, tables: str, stride: int) -> dict:
    """One range, in a Ray worker; returns its wall seconds and layers."""
    from exl2.layers.stream import module_specs
    from exl2.measure.split import measure_part

    set_base_threads(threads)       # the driver's count: the same bytes as its own run (core/threads.py)
    t0 = time.time()
    try:
        measure_part(model_dir, input_ids, work, first, stop, device=device, modules=module_specs(tables),
                     stride=stride)
    except UserError as e:
        raise ConvertError(f"layers {first}-{stop - 1}: {str(e).splitlines()[0]}") from None
    return {"layers": [first, stop], "seconds": round(time.time() - t0, 1), "host": os.uname().nodename}


def _one_line(e: BaseException) -> str:
    from exl2.convert.batch.ray_conn import first_line

    cause = getattr(e, "cause", None)
    return str(cause) if isinstance(cause, UserError) else first_line(e)


def check_address(address: str) -> None:
    """ConvertError in one line unless a Ray head node answers at HOST:PORT."""
    from exl2.convert.batch.ray_conn import BatchError, probe

    try:
        probe(address, flag="--ray")
    except BatchError as e:
        raise ConvertError(str(e)) from None


def measure_on_ray(model_dir: str | Path, input_ids: torch.Tensor, work: str | Path, *, address: str,
                   provenance: dict, workers: int | None = None, threads: int | None = None, device: str = "cpu",
                   tables: str = "exl2", stride: int = MEASURE_STRIDE, max_retries: int = 3, status=None,
                   progress=None) -> dict:
    """Measure ``model_dir`` in ``workers`` layer ranges on Ray (``address``: "local" for an instance on this
    machine, "auto" or HOST:PORT for a cluster, or a running Ray this process is part of); writes
    ``work/measurement.json`` and returns it.  ``workers`` defaults to as many tasks as the cluster holds at
    once; ``threads`` (each task's threads and Ray CPUs) to this process's thread count; ``stride``: as
    :func:`exl2.measure.measure.run_measurement`'s."""
    from exl2.convert.batch.ray_conn import BatchError, connect, import_ray
    from exl2.measure.split import layer_ranges, merge_parts, range_states
    from exl2.runtime.config import ModelConfig

    status = status or (lambda d: None)
    work = Path(work)
    n_layers = ModelConfig.from_file(Path(model_dir) / "config.json").num_layers
    threads = threads or base_threads()
    try:
        ray = import_ray()
        started = connect(ray, None if address == "local" else address, None, None, flag="--ray")
    except BatchError as e:
        raise ConvertError(str(e)) from None
    try:
        res = {"num_gpus": 1} if device == "cuda" else {"num_cpus": threads}
        if workers is None:
            have = ray.cluster_resources()
            workers = int(have.get("GPU", 0)) if device == "cuda" else int(have.get("CPU", 1)) // threads
        ranges = layer_ranges(n_layers, max(1, workers))
        t0 = time.time()
        range_states(model_dir, input_ids, ranges, work, device=device, progress=progress)
        status({"stage": "measure", "message": f"input states of the layer ranges {ranges} written to {work} "
                                               f"in {time.time() - t0:.1f} s"})
        task = ray.remote(_part_task).options(max_retries=max_retries, retry_exceptions=False, **res)
        refs = {task.remote(str(model_dir), input_ids, str(work), a, b, threads, device, tables, stride): (a, b)
                for a, b in ranges}
        pending = dict(refs)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            a, b = pending.pop(ready[0])
            try:
                done = ray.get(ready[0])
            except Exception as e:      # noqa: BLE001 - a part's failure is the measurement's, in one line
                for ref in pending:
                    ray.cancel(ref)
                raise ConvertError(f"measurement of layers {a}-{b - 1} on Ray failed: {_one_line(e)}") from None
            status({"stage": "measure", "part": done["layers"], "seconds": done["seconds"], "host": done["host"]})
    finally:
        if started:
            ray.shutdown()
    return merge_parts(work, ranges, n_layers, work / "measurement.json", provenance)
