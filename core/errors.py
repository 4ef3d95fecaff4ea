"""The one user-error type.

Every error that a user can act on (a bad flag, a file that is missing or malformed, a target no option
table can reach, a job folder that is not ours) derives from :class:`UserError`.  The command-line tools and
the batch worker catch this one type and print ``error: <message>`` on one line with exit status 2; any
other exception is a bug and keeps its traceback.  Each stage keeps its own subclass (CalibrationError,
MeasurementError, ...) so a caller can still tell them apart; many also derive from ValueError or
RuntimeError, as they did before there was a common base.
"""
from __future__ import annotations

EXIT_USAGE = 2


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the file, tensor or flag."""


def os_error_line(e: OSError) -> str:
    """One line for an OSError (disk full, permissions, a vanished file): the file first, if known."""
    return f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)
