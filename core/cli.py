"""One error convention for every command-line tool (exl2-convert, exl2-inspect, exl2-eval, exl2-generate,
exl2-batch): a problem the user can fix prints ``error: <message>`` on one line of stderr and exits with
status 2, with no traceback.  Usage errors found by click (an unknown flag, a bad value) take the same form.
"""
from __future__ import annotations

import sys

import click

from .errors import EXIT_USAGE, UserError, os_error_line


def fail(message: str) -> None:
    """Print the one-line error and exit with status 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USAGE)


class Command(click.Command):
    """A click command whose usage errors, UserErrors and OSErrors end in one ``error:`` line, exit 2.

    ``interrupt_hint`` is printed after "interrupted" when the user presses Ctrl-C (e.g. how to resume)."""

    interrupt_hint = ""

    def main(self, args=None, prog_name=None, **kw):
        kw.pop("standalone_mode", None)
        try:
            rv = super().main(args=args, prog_name=prog_name, standalone_mode=False, **kw)
        except click.exceptions.Exit as e:          # --help and explicit ctx.exit()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(EXIT_USAGE if e.exit_code == 2 else e.exit_code)
        except UserError as e:
            fail(str(e))
        except OSError as e:
            fail(os_error_line(e))
        except (click.Abort, KeyboardInterrupt):
            fail("interrupted" + (f"; {self.interrupt_hint}" if self.interrupt_hint else ""))
        sys.exit(rv if isinstance(rv, int) else 0)


class ResumableCommand(Command):
    interrupt_hint = "rerun the same command to resume"
