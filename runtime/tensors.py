"""A checkpoint's tensors on disk: every *.safetensors file of a folder (single, sharded with an index, or any
*.safetensors as in EXL2 output folders), read lazily one tensor at a time through safetensors.safe_open, with the
checks that name the file and tensor on a problem (loader.py builds models from it)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from exl2.core.errors import UserError
from exl2.quant_kernels.finite import all_finite


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(UserError, ValueError):
    """A checkpoint problem a user can fix; the message names the file and tensor."""


class TensorSource:
    """Maps tensor key -> safetensors file of a model directory; reads tensors on demand."""

    def __init__(self, model_dir: str | Path, strip: str = ""):
        """strip: a prefix taken off the names that carry it (see strip_prefix)."""
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        self._files: dict[str, Path] = {}  # key -> file
        self._handles: dict[Path, object] = {}
        self._views: dict[str, tuple[str, int, int]] = {}  # key -> (stored key, first row, end row): add_view
        self._stored: dict[str, str] = {}  # key -> its name in the file, where strip_prefix renamed it
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self._from_index(index)
        else:
            self._from_glob()
        if strip:
            self.strip_prefix(strip)

    def _from_index(self, index: Path) -> None:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{index}: not a readable JSON index ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to file names")
        for key, fname in weight_map.items():
            if not isinstance(fname, str) or not fname or Path(fname).name != fname:
                raise CheckpointError(f"{index}: tensor {key} is mapped to {fname!r}, which is not a file name in "
                                      f"the model folder")
            path = self.dir / fname
            if not path.is_file():
                raise CheckpointError(f"{index}: tensor {key} is mapped to {fname}, which does not exist")
            self._files[key] = path

    def _from_glob(self) -> None:
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{self.dir}: only pickle checkpoints found ({', '.join(pickles)}); refusing to unpickle "
                    f"(it can run arbitrary code). Convert the model to safetensors first.")
            raise CheckpointError(f"{self.dir}: no *.safetensors files")
        for path in files:
            for key in self._open(path).keys():
                if key in self._files:
                    raise CheckpointError(f"tensor {key} is in both {self._files[key].name} and {path.name}")
                self._files[key] = path

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
        return self._handles[path]

    def release(self) -> None:
        """Close the open files; later reads open them again.  Reading maps file pages into this process, and
        they count as resident until the file is closed, so a pass that reads a checkpoint layer by layer
        calls this between layers to keep its resident size at one layer."""
        self._handles.clear()

    def strip_prefix(self, prefix: str) -> None:
        """Name every stored tensor whose name starts with ``prefix`` without it (Arch.weight_prefix: a
        multimodal checkpoint's text model); reads still use the stored name.  The others keep their names."""
        for key in [k for k in self._files if k.startswith(prefix)]:
            short = key[len(prefix):]
            if short in self._files:
                raise CheckpointError(f"{self.dir}: tensors {key} and {short} both present")
            self._files[short] = self._files.pop(key)
            self._stored[short] = key

    def add_view(self, key: str, stored: str, start: int, end: int) -> None:
        """Make ``key`` name rows [start, end) of the stored tensor ``stored`` (one part of a fused projection,
        Arch.fused): it is then found, sized and read like a stored tensor, but not listed by keys()."""
        self._views[key] = (stored, start, end)

    def __contains__(self, key: str) -> bool:
        return key in self._files or key in self._views

    def keys(self) -> list[str]:
        """The stored tensors (not the views)."""
        return list(self._files)

    def file_of(self, key: str) -> Path:
        return self._files[self._views[key][0] if key in self._views else key]

    def label(self, key: str) -> str:
        """How messages name a tensor: its key, or for a view the stored tensor and rows it reads."""
        if key not in self._views:
            return key
        stored, start, end = self._views[key]
        return f"{stored} (rows {start}:{end}, read as {key})"

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape, read from the header without loading the tensor."""
        return self.header(key)[0]

    def header(self, key: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name such as "F16"), read from the header without loading the tensor."""
        if key in self._views:
            stored, start, end = self._views[key]
            shape, dtype = self.header(stored)
            return (end - start, *shape[1:]), dtype
        if key not in self._files:
            raise CheckpointError(f"{self.dir}: tensor {key} not found in any safetensors file")
        handle = self._open(self._files[key])
        name = self._stored.get(key, key)
        if name not in handle.keys():
            raise CheckpointError(f"{self._files[key]}: tensor {name} is listed in the index but missing from the file")
        sl = handle.get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def get(self, key: str) -> torch.Tensor:
        """The stored tensor (CPU, stored dtype); a view's rows only. Missing or unreadable -> CheckpointError
        naming it."""
        stored, rows = (self._views[key][0], self._views[key][1:]) if key in self._views else (key, None)
        if stored not in self._files:
            raise CheckpointError(f"{self.dir}: tensor {stored} not found in any safetensors file")
        path = self._files[stored]
        handle = self._open(path)
        name = self._stored.get(stored, stored)
        if name not in handle.keys():
            raise CheckpointError(f"{path}: tensor {name} is listed in the index but missing from the file")
        try:
            return handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows[0]:rows[1]]
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from None

    def get_float(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """A floating tensor checked for dtype and shape, converted to `dtype` on `device`."""
        t = self.get(key)
        name = self.label(key)
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{self.file_of(key)}: tensor {name} has dtype {t.dtype}, expected fp16/bf16/fp32")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.file_of(key)}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(shape)}")
        check_finite(t, name, self.file_of(key))
        return t.to(device=device, dtype=dtype)


def check_finite(t: torch.Tensor, key: str, where) -> None:
    """CheckpointError naming the tensor if a floating tensor holds NaN or an infinity."""
    if t.is_floating_point() and not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{where}: tensor {key} holds {bad} NaN or infinite value(s)")
