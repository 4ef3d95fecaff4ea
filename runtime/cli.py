"""Command-line entry points of the runtime: `exl2-eval` and `exl2-generate`."""
from __future__ import annotations

import sys

import click


def _not_implemented(tool: str) -> None:
    click.echo(f"{tool}: not implemented yet (see the project's issues)", err=True)
    sys.exit(2)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path())
@click.option("--data", type=click.Path(), help="Text, jsonl or parquet file to score.")
def eval_main(model_dir, data):
    """Measure perplexity, KL divergence and HumanEval of MODEL_DIR."""
    _not_implemented("exl2-eval")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path())
@click.option("-p", "--prompt", help="Prompt text.")
def generate_main(model_dir, prompt):
    """Generate text with MODEL_DIR."""
    _not_implemented("exl2-generate")
