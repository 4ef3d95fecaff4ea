"""One task of a batch, run in a Ray worker: a plain function, callable without Ray too.

The converter is imported inside run_task (the driver never imports torch); a worker that dies is
retried by Ray and the converter resumes from the task's work dir.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from exl2.convert.batch.tasks import Task
from exl2.core.errors import UserError, os_error_line
from exl2.core.files import copy_atomic


class TaskError(RuntimeError):
    """One task failed with an error a user can act on; the message is one line."""


def _resume_state(work_dir: Path) -> dict:
    """What an earlier attempt left in the work dir (reported with the 'running' event)."""
    state = {}
    job = work_dir / "job.json"
    if job.is_file():
        with contextlib.suppress(OSError, ValueError):
            state["finished_stages"] = json.loads(job.read_text()).get("finished_stages", [])
    # A layer loop's checkpoint holds its progress record in the safetensors header.
    from exl2.layers.checkpoint import checkpoint_progress

    for ckpt in sorted(work_dir.glob("*/*.checkpoint.safetensors")):
        with contextlib.suppress(Exception):      # unreadable: reported as nothing, the converter decides
            record = checkpoint_progress(ckpt.parent, ckpt.name.removesuffix(".checkpoint.safetensors"))
            if record.get("next_layer") is not None:
                state[f"{ckpt.parent.name}/{ckpt.name}"] = {"next_layer": record["next_layer"]}
    return state


def _no_status(event: dict) -> None:
    """In a batch worker the converter's status events go nowhere: the driver reports task states."""


# The one test seam of exl2-batch: run_task takes each task's converter status hook from
# ``status_hook_factory(task_id)``.  Nothing in the package changes it; the kill-and-resume tests replace it
# in every Ray worker process of their job (tests/convert/batch_faults.py, installed through Ray's
# worker_process_setup_hook) to kill a worker at a chosen converter event.
status_hook_factory: Callable[[str], Callable[[dict], None]] = lambda task_id: _no_status


def run_task(task: dict, measurement=None, sink=None) -> dict:
    """Run one task with the converter (resuming its work dir); raises TaskError with one line.

    ``measurement`` is the upstream task's result (or the path of an existing measurement.json);
    ``sink`` an event actor (or None).
    """
    from exl2.convert.api import ConvertOptions, convert

    t = Task(**task)
    work = Path(t.options["work_dir"])
    running = {"task": t.id, "state": "running", "pid": os.getpid(), "host": os.uname().nodename}
    resume = _resume_state(work)
    if resume:
        running["resume"] = resume
    if sink is not None:
        import ray

        ray.get(sink.post.remote(running))
    opts = dict(t.options)
    if t.kind == "quantize":
        opts["measurement"] = measurement["measurement"] if isinstance(measurement, dict) else measurement
    hook = status_hook_factory(t.id)
    t0 = time.time()
    try:
        # The worker's stdout reaches the driver's stdout; keep that clean for --status-json.
        with contextlib.redirect_stdout(sys.stderr):
            work.mkdir(parents=True, exist_ok=True)
            result = convert(ConvertOptions(**opts), status=hook)
            if t.kind == "measure":
                Path(t.output).parent.mkdir(parents=True, exist_ok=True)
                copy_atomic(result["measurement"], t.output)
    except UserError as e:
        raise TaskError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    except OSError as e:
        raise TaskError(os_error_line(e)) from None
    except Exception as e:   # a bug: one line for the summary, the traceback in the worker's log
        traceback.print_exc()
        raise TaskError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    out = {"seconds": round(time.time() - t0, 1)}
    if t.kind == "measure":
        out["measurement"] = t.output
    else:
        r = result["targets"][0]
        out.update(bpw=r["bpw"], output=r["output"])
        v = r.get("validation")
        if v:
            out.update({k: v[k] for k in ("ppl_fp16", "ppl_exl2", "kld_mean", "top1_agreement") if k in v})
    return out


class _EventSink:
    """A tiny actor that collects the workers' 'running' events for the driver."""

    def __init__(self):
        self.events = []

    def post(self, event: dict) -> None:
        self.events.append(event)

    def drain(self) -> list[dict]:
        out, self.events = self.events, []
        return out
