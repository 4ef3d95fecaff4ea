"""`exl2-batch SPEC.toml`: the command line (validation, --dry-run, the summary table or JSON lines)."""
from __future__ import annotations

import json
import sys

import click

from exl2.convert.batch.driver import run_batch
from exl2.convert.batch.spec import load_spec
from exl2.convert.batch.tasks import is_complete, model_problem, plan
from exl2.core.cli import ResumableCommand


def _print_table(summary: dict) -> None:
    rows = []
    for r in summary["tasks"]:
        state = {"finished": "ok"}.get(r["state"], r["state"])
        if r["state"] == "finished" and r["kind"] == "quantize":
            detail = f"{r['bpw']:.3f} bpw" + (f", KLD {r['kld_mean']:.4f}, ppl {r['ppl_exl2']:.3f}"
                                                 if "kld_mean" in r else "")
            detail += f"  -> {r['output']}"
        elif r["state"] == "finished":
            detail = f"-> {r['measurement']}"
        else:
            detail = r.get("error") or r.get("reason") or ""
        rows.append((r["task"], state, f"{r['seconds']:.0f}s" if "seconds" in r else "", detail))
    w = max([len(x[0]) for x in rows] + [4])
    click.echo(f"{'task':<{w}}  {'state':<7}  {'time':>5}  detail")
    for task, state, secs, detail in rows:
        click.echo(f"{task:<{w}}  {state:<7}  {secs:>5}  {detail}")
    click.echo(f"succeeded {summary['succeeded']}, skipped {summary['skipped']}, failed {summary['failed']}")


@click.command(cls=ResumableCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
               help="Convert the models of SPEC (TOML) to every bpw target, as Ray tasks.\n\n"
                    "Finished outputs are skipped; rerunning the same command resumes the batch. "
                    "Exit status 1 if a task failed, 2 for a bad spec, a bad model folder (--dry-run) or no Ray.")
@click.argument("spec_file", metavar="SPEC.toml", type=click.Path())
@click.option("--address", default=None,
              help="Ray cluster to use ('auto', or HEAD_IP:6379). Default: start a local Ray instance.")
@click.option("--num-cpus", type=int, default=None,
              help="CPUs of the local Ray instance (without --address). Default: all.")
@click.option("--object-store-mb", type=int, default=256, show_default=True,
              help="Object store of the local Ray instance (tasks exchange only paths).")
@click.option("--dry-run", is_flag=True,
              help="Validate the spec and the model folders, print the plan; run nothing.")
@click.option("--status-json", is_flag=True,
              help="Print one JSON object per task state change, then a summary object.")
def main(spec_file, address, num_cpus, object_store_mb, dry_run, status_json):
    spec = load_spec(spec_file)
    if dry_run:
        tasks = plan(spec)
        todo = {t.model for t in tasks if not is_complete(t)}
        # A model whose every output is finished is not read again: its folder may be gone.
        bad = [(m.name, why) for m in spec.models if m.name in todo and (why := model_problem(m.path))]
        for name, why in bad:
            click.echo(f"error: {spec_file}: [[model]] {name!r}: {why}", err=True)
        if bad:
            sys.exit(2)
        for t in tasks:
            state = "done" if is_complete(t) else "todo"
            after = f"  (after {t.deps[0]})" if t.deps else ""
            click.echo(f"{state}  {t.id:<32} -> {t.output}{after}")
        return
    emit = (lambda e: click.echo(json.dumps(e, default=str))) if status_json else None
    summary = run_batch(spec, address=address, num_cpus=num_cpus, object_store_mb=object_store_mb, emit=emit)
    if status_json:
        click.echo(json.dumps({"state": "done", **{k: summary[k] for k in ("succeeded", "skipped", "failed")}}))
    else:
        _print_table(summary)
    sys.exit(1 if summary["failed"] else 0)

