"""Peer quantizers measured beside exl2 (llm-compressor, llama.cpp): optional, never runtime dependencies.

Every peer module offers ``available() -> str | None`` (None when it can run here, else the reason) and
``run(src, cal_dir, out, scheme) -> dict``: quantize the FP16 checkpoint ``src`` with the peer's own tool,
calibrated on the token rows of ``cal_dir`` (see :func:`make_cal_dir`), then write the peer's weights
*dequantized* as a plain checkpoint in ``out`` (:func:`write_checkpoint`). Our evaluator then scores every
format with the same code on the same tokens.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
SKIP_FILES = ("exl2_fixture.json",)   # the fixture builder's marker: a peer's output is not the fixture


def make_cal_dir(src: str | Path, out: str | Path, rows: int, length: int, seed: int = 0) -> Path:
    """Calibration shared by every tool: ``input_ids.safetensors`` (int64 [rows, length], our default mix,
    the quantization-pass weights) and ``text.txt`` (the same rows decoded, one per paragraph)."""
    from tokenizers import Tokenizer

    from exl2.calibration import QUANT_WEIGHTS, default_rows
    from exl2.runtime.loader import load_config

    src, out = Path(src), Path(out)
    cfg = load_config(src)
    r = default_rows(src / "tokenizer.json", rows, length, seed=seed, bos_id=cfg.bos_token_id,
                     vocab_size=cfg.vocab_size, weights=QUANT_WEIGHTS)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    out.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": r.input_ids.contiguous()}, str(out / "input_ids.safetensors"))
    text = "\n\n".join(tok.decode(row.tolist(), skip_special_tokens=True) for row in r.input_ids)
    (out / "text.txt").write_text(text, encoding="utf-8")
    return out


def load_cal_ids(cal_dir: str | Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(Path(cal_dir) / "input_ids.safetensors"))["input_ids"]


def write_checkpoint(src: str | Path, state: dict[str, torch.Tensor], out: str | Path, meta: dict) -> Path:
    """Write ``state`` (HF names) as fp16 ``model.safetensors`` with src's non-weight files and ``peer.json``.

    Written to a temporary sibling directory and renamed into place: ``out`` is complete or absent."""
    src, out = Path(src), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        for f in src.iterdir():
            if (f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json")
                    and f.name not in SKIP_FILES):
                shutil.copy2(f, tmp / f.name)
        save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "peer.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
