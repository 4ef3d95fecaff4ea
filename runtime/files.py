"""Writing files so that a failure loses nothing: a temporary name beside the target, then one rename.

A write that fails (disk full, permissions, a vanished folder) raises ``OSError`` whose ``filename`` is the
file we meant to write, leaves no temporary file behind and leaves any earlier version of the target as it
was.  safetensors reports I/O failures with its own exception type; :func:`save_safetensors` turns them
into ``OSError`` with the operating system's error number, so every caller handles one type.
"""
from __future__ import annotations

import errno as _errno
import json
import os
import re
from pathlib import Path

import torch

_OS_ERROR = re.compile(r"os error (\d+)")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent))


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` to ``path`` atomically; failures raise ``OSError`` naming ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp_name(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except Exception as e:      # safetensors' own error type carries the OS error in its text
        m = _OS_ERROR.search(str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code) if code in _errno.errorcode else str(e), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
