"""Command-line entry points of the conversion stage: `exl2-convert` and `exl2-inspect`.

Parsing and validation happen here; the work itself lives in importable functions.
"""
from __future__ import annotations

import sys

import click


def _not_implemented(tool: str) -> None:
    click.echo(f"{tool}: not implemented yet (see the project's issues)", err=True)
    sys.exit(2)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-i", "--in-dir", "in_dir", type=click.Path(), help="Hugging Face model directory (config.json, *.safetensors, tokenizer).")
@click.option("-o", "--out-dir", "out_dir", type=click.Path(), help="Working directory; an existing job there is resumed.")
@click.option("-b", "--bits", "bits", default="4.125", show_default=True, help="Target bits per weight of the decoder layers.")
@click.option("-hb", "--head-bits", "head_bits", default=6, show_default=True, type=click.Choice(["2", "3", "4", "5", "6", "8"]), help="Bits of the output head.")
def convert_main(in_dir, out_dir, bits, head_bits):
    """Convert a Hugging Face checkpoint to EXL2."""
    _not_implemented("exl2-convert")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_main(model_dir, as_json):
    """Show and check the EXL2 layers of MODEL_DIR."""
    _not_implemented("exl2-inspect")
