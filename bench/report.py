"""BENCHMARKS.md sections: each benchmark owns the text between its start and end markers."""
from __future__ import annotations

import datetime
import platform
from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(name: str, body: str, first: bool = False) -> Path:
    """Replace the section ``name``, or add it: at the end, or with ``first`` right under the title.
    ``body`` is the text between the markers."""
    start, end = markers(name)
    section = f"{start}\n{body.strip()}\n{end}"
    text = PATH.read_text() if PATH.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    elif first:
        title, _, rest = text.partition("\n")
        text = f"{title}\n\n{section}\n\n{rest.lstrip(chr(10))}"
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    PATH.write_text(text)
    return PATH


def publish(name: str, text: str, write: bool) -> int:
    """Print a benchmark's section ``text`` and, with ``write``, put it into BENCHMARKS.md as section ``name``;
    returns the script's exit status (0)."""
    print(text)
    if write:
        print(f"wrote {write_section(name, text)}")
    return 0


def header(title: str, command: str, machine_note: str = "", command_note: str = "") -> list[str]:
    """A section's first lines: title, the command that produced it, the machine and the date."""
    import torch

    return [f"## {title}", "", f"Command: `{command}`{command_note}  ",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU only"
            f"{machine_note}  ", f"Date: {datetime.date.today()}", ""]
