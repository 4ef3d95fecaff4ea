"""`exl2-batch SPEC.toml`: convert many checkpoints to many bpw targets on a Ray cluster.

Per model, one task measures the checkpoint once; then one task per bpw target quantizes, compiles and
validates from that measurement.  The output folder must be on storage that the driver and every worker
see (a shared file system).  A task whose output is complete is skipped without launching anything; a
task whose worker dies is retried by Ray and the converter resumes from its work dir; a failed
measurement makes its targets "skipped" and leaves the other models alone.

The pieces, in the order the data flows:

    spec.py     the TOML spec (its format is in that module's docstring) -> Spec
    tasks.py    Spec -> the task graph (plan), and whether a task's output is already complete
    worker.py   one task, run by a Ray worker (run_task): the converter, resumed from its work dir
    driver.py   run_batch: submits the plan and collects the records
    ray_conn.py Ray: a cluster at --address, or a local instance that talks to nobody else (also used by
                ``exl2-convert --ray``, convert/split.py)
    cli.py      the command line (main)

The task graph's module is tasks.py, not plan.py, so that ``exl2.convert.batch.plan`` is only the
function.  Ray is optional (``pip install exl2[cluster]``) and imported only where it is needed.
"""
from exl2.convert.batch.spec import Model, Resources, Spec, SpecError, load_spec, parse_spec
from exl2.convert.batch.tasks import Task, bpw_dir_name, is_complete, mismatch, model_problem, plan
from exl2.convert.batch.worker import TaskError, run_task
from exl2.convert.batch.driver import run_batch
from exl2.convert.batch.ray_conn import LOCAL_RAY_ENV, BatchError, local_ray_settings
from exl2.convert.batch.cli import main

__all__ = ["Model", "Resources", "Spec", "SpecError", "load_spec", "parse_spec", "Task",
           "bpw_dir_name", "is_complete", "mismatch", "model_problem", "plan", "TaskError", "run_task",
           "LOCAL_RAY_ENV", "BatchError", "local_ray_settings", "run_batch", "main"]
