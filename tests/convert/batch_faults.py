"""Fault injection for the exl2-batch tests: the worker of a chosen task kills itself (SIGKILL) at a
chosen converter event, once.

``exl2.convert.batch.worker.status_hook_factory`` is the seam: run_task asks it for each task's converter
status hook.  The workers are separate processes started by Ray, so the replacement has to happen in each
of them: ``ray_runtime_env(faults)`` is the ``runtime_env`` for ray.init that does it, through Ray's
``worker_process_setup_hook`` (run by every worker of that Ray job before its first task, including the
fresh worker of a retry).  The hook travels pickled by value, so a worker needs no path to tests/; and it
applies to the one Ray job of the test, not to a driver that a test starts against the same cluster.

A fault is ``{"task": ID, "event": {...}, "marker": PATH}``: the worker of task ID kills itself at the first
converter event that contains every key/value of ``event``, unless PATH exists; before dying it writes
PATH with the task, its pid and the event, so the test knows the fault fired and which process died.
"""
from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path


def _no_status(event: dict) -> None:
    pass


def fault_hook(faults: list[dict], task_id: str):
    """The converter status hook for task_id: the first fault for that task, or one that does nothing."""
    fault = next((f for f in faults if f["task"] == task_id), None)
    if fault is None:
        return _no_status
    marker, want = Path(fault["marker"]), fault.get("event", {})

    def hook(e: dict) -> None:
        if all(e.get(k) == v for k, v in want.items()) and not marker.exists():
            marker.write_text(json.dumps({"task": task_id, "pid": os.getpid(), "event": e}))
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def install(faults: list[dict]) -> None:
    """Make run_task in this process use the faults (what each Ray worker runs at its start)."""
    from exl2.convert.batch import worker

    worker.status_hook_factory = functools.partial(fault_hook, faults)


def ray_runtime_env(faults: list[dict]) -> dict:
    """The runtime_env for ray.init whose workers run install(faults) when they start."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def install_faults() -> None:         # a named function: Ray names the hook in its messages
        install(faults)
    return {"worker_process_setup_hook": install_faults}
