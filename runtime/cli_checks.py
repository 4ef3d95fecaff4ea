"""What exl2-eval and exl2-generate check before they work (model folder, files, cache modes, device, threads),
and the loading they share; every problem a user can fix is a UserError naming the file or flag."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from exl2.core.errors import UserError

from .cache import MODES as CACHE_MODES


def _model_dir(path: str, flag: str = "MODEL_DIR") -> Path:
    """A directory holding a readable config.json of a supported architecture."""
    _model_config(path, flag)
    return Path(path)


def _model_config(path: str, flag: str = "MODEL_DIR"):
    """The parsed config.json of a model directory (every field checked); UserError naming what is wrong."""
    from .loader import load_config

    d = Path(path)
    if not d.is_dir():
        raise UserError(f"{flag} {d}: not a directory")
    if not (d / "config.json").is_file():
        raise UserError(f"{flag} {d}: no config.json (not a model directory)")
    try:
        return load_config(d)
    except ValueError as e:  # ConfigError (UnsupportedArchitectureError too) names the file and field
        raise UserError(str(e) if "config.json" in str(e) else f"{d / 'config.json'}: {e}") from None


def _caches_fit(cfg, caches: list[str]) -> None:
    from .cache import mode_error

    for m in caches:
        why = mode_error(cfg, m)
        if why:
            raise UserError(f"--cache {m}: {why}")


def _tokenizer_file(d: Path) -> Path:
    p = d / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"{p}: not found (the model directory needs a tokenizer.json)")
    return p


def _cache_list(text: str) -> list[str]:
    if text.strip().lower() == "all":  # every mode: ExLlamaV2's, then exl2's own
        return list(CACHE_MODES)
    modes = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not modes:
        raise UserError("--cache: empty list")
    for m in modes:
        if m not in CACHE_MODES:
            raise UserError(f"--cache: unknown cache mode {m!r} (choose from {', '.join(CACHE_MODES)})")
    return list(dict.fromkeys(modes))  # unique, in order


def _device(device: str) -> str:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device available (torch.cuda.is_available() is False)")
    return device


def _threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


def _out_file(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p}: is a directory")
    if not p.parent.is_dir():
        raise UserError(f"{flag} {p}: directory {p.parent} does not exist")
    return p


def _load(model_dir: Path, device: str, flag: str = "MODEL_DIR", exl2: str = "packed"):
    from .loader import load_model
    from .tensors import CheckpointError

    try:
        return load_model(model_dir, device=device, exl2=exl2)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise UserError(f"{flag} {model_dir}: {e}") from None


def _kv_profile(model, model_dir: Path, caches, progress: bool) -> None:
    """exl2's own cache modes (q4x, q3x) read the model's KV profile: exl2_kv.json when the converter wrote one,
    else derived now from the default calibration mix (runtime/kv_calib.py)."""
    from .kv_calib import ensure_profile, profile_of
    from .kv_profile import PROFILE_FILE
    from .kv_x import X_MODES

    if not any(c in X_MODES for c in caches) or profile_of(model) is not None:
        return
    if progress and not (model_dir / PROFILE_FILE).is_file():
        click.echo(f"{model_dir}: no {PROFILE_FILE}; measuring the KV profile for {', '.join(c for c in caches if c in X_MODES)} "
                   f"on the default calibration mix", err=True)
    try:
        prof = ensure_profile(model, model_dir)
    except ValueError as e:  # a stored profile that does not fit the model, or cannot be read (names the file)
        raise UserError(str(e)) from None
    if progress:
        if (model_dir / PROFILE_FILE).is_file():
            click.echo(f"KV profile: {model_dir / PROFILE_FILE} ({prof.source.get('derived_from', '?')})", err=True)
        else:
            click.echo(f"KV profile: {prof.source.get('derived_from', '?')} ({prof.source.get('seconds', 0)} s)",
                       err=True)


def _check_profile(model_dir: Path, cfg, caches) -> None:
    """Refuse, before loading anything, a stored KV profile (exl2_kv.json) that the x modes asked for cannot use."""
    from .kv_profile import KVProfile
    from .kv_x import X_MODES

    if any(c in X_MODES for c in caches):
        try:
            KVProfile.load(model_dir, cfg)
        except ValueError as e:
            raise UserError(str(e)) from None


def _parts(model_dir: Path, device: str, flag: str = "MODEL_DIR", exl2: str = "packed"):
    """The checkpoint's ModelParts (config and every tensor's header checked; nothing loaded yet)."""
    from .loader import ModelParts
    from .tensors import CheckpointError

    try:
        return ModelParts(model_dir, device=device, exl2=exl2)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise UserError(f"{flag} {model_dir}: {e}") from None


def _stream(parts, rows, flag: str, progress: bool):
    """rows through the checkpoint one decoder layer at a time (stream.stream_forward), with a progress bar."""
    from tqdm import tqdm

    from .tensors import CheckpointError
    from .stream import stream_forward

    with tqdm(total=parts.cfg.num_layers, unit="layer", desc=f"{flag} streamed", disable=not progress or None,
              file=sys.stderr) as bar:
        try:
            return stream_forward(parts, [rows], progress=lambda done, n: bar.update(1))[0]
        except (CheckpointError, ValueError) as e:
            raise UserError(f"{flag} {parts.dir}: {e}") from None
