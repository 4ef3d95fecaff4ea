"""Writing files so that a failure loses nothing: a temporary name beside the target, then one rename.

A write that fails (disk full, permissions, a vanished folder) raises ``OSError`` whose ``filename`` is the
file we meant to write, leaves no temporary file behind and leaves any earlier version of the target as it
was.  safetensors reports I/O failures with its own exception type; :func:`save_safetensors` turns them
into ``OSError`` with the operating system's error number, so every caller handles one type.

This is the only place that writes a file in place: every other module calls one of these functions (or
:func:`atomic_path` for a library that insists on writing to a path itself).
"""
from __future__ import annotations

import errno as _errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_OS_ERROR = re.compile(r"os error (\d+)")


def _tmp_name(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``path``; when the block ends without an error it is renamed to ``path``.

    For writers that take a file name (safetensors, matplotlib).  ``suffix`` is appended to the temporary
    name for writers that choose the format by extension (".png").  On failure the temporary file is removed
    and an ``OSError`` names ``path``."""
    path = Path(path)
    tmp = _tmp_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent))


def copy_atomic(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy ``src`` to ``dest``; readers of ``dest`` see the old file or the whole new one."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` to ``path`` atomically; failures raise ``OSError`` naming ``path``."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as e:      # safetensors' own error type carries the OS error in its text
            m = _OS_ERROR.search(str(e))
            if m is None:
                raise
            code = int(m.group(1))
            raise OSError(code, os.strerror(code) if code in _errno.errorcode else str(e), str(path)) from None
