"""The driver of a batch: connect to Ray (or start a local instance), check that the tasks fit, submit
the plan and collect one record per task.

Without --address a local Ray instance is started that stays on 127.0.0.1 and opens no connection to
other machines (no cloud metadata probe, no usage report; see ``local_ray_settings``).

Ray is optional (``pip install exl2[cluster]``) and imported only inside the functions that need it.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict
from typing import Callable

import click

from exl2.convert.batch.spec import Spec
from exl2.convert.batch.tasks import Task, is_complete, mismatch, plan
from exl2.convert.batch.worker import TaskError, _EventSink, run_task
from exl2.core.errors import UserError

INSTALL_HINT = "exl2-batch needs Ray: pip install 'exl2[cluster]' (or: pip install ray)"

Emit = Callable[[dict], None]


class BatchError(UserError, RuntimeError):
    """The batch cannot start (Ray missing, no cluster at --address, infeasible resources)."""


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

