"""The driver of a batch: connect to Ray (or start a local instance), check that the tasks fit, submit
the plan and collect one record per task.

Without --address a local Ray instance is started that stays on 127.0.0.1 and opens no connection to
other machines (no cloud metadata probe, no usage report; see ``ray_conn.local_ray_settings``).

Ray is optional (``pip install exl2[cluster]``) and imported only inside the functions that need it.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from typing import Callable

import click

from exl2.convert.batch.ray_conn import BatchError, connect, first_line, import_ray
from exl2.convert.batch.spec import Spec
from exl2.convert.batch.tasks import Task, is_complete, mismatch, plan
from exl2.convert.batch.worker import TaskError, _EventSink, run_task

Emit = Callable[[dict], None]


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
    msg = first_line(e)
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
        ray = import_ray()
        started = connect(ray, address, num_cpus, object_store_mb)
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

