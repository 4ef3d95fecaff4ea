"""Compile: the output directory ExLlamaV2 loads (EXL2-SPEC.md 1.8, 1.9, 2.1).

Tensors in model order (embedding; per layer input_layernorm, q, k, v, o, post_attention_layernorm,
gate, up, down; final norm; lm_head), unquantized ones as fp16 under their HF names, quantized ones
from ``out_tensor/``.  A shard is cut when the next module would pass the size limit; one file is named
``output.safetensors``, several ``output-00001-of-0000N.safetensors``.  No index file is written (the
loader globs ``*.safetensors``), and a stale one from the input is not copied.  ``config.json`` gains
``quantization_config``.  Everything is assembled in a temporary directory that replaces the target in
one rename, so a failed run never leaves a half-written model.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from exl2.runtime.arch import TENSOR_NAMES
from exl2.runtime.loader import ModelParts

COPY_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
COPY_SKIP_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json")


def module_order(n_layers: int) -> list[tuple[str, str]]:
    """(name, kind) in writing order; kind is "fp16" (from the source) or "exl2" (from out_tensor)."""
    out = [(TENSOR_NAMES["embed"], "fp16")]
    for i in range(n_layers):
        out.append((TENSOR_NAMES["attn_norm"].format(i=i), "fp16"))
        out += [(TENSOR_NAMES[k].format(i=i), "exl2") for k in ("q", "k", "v", "o")]
        out.append((TENSOR_NAMES["mlp_norm"].format(i=i), "fp16"))
        out += [(TENSOR_NAMES[k].format(i=i), "exl2") for k in ("gate", "up", "down")]
    out.append((TENSOR_NAMES["norm"], "fp16"))
    out.append((TENSOR_NAMES["head"], "exl2"))
    return out


def compile_model(model_dir: str | Path, out_tensor: str | Path, target: str | Path, *, shard_mib: float = 8192,
                  quantization_config: dict, extra_files: dict[str, str] | None = None) -> list[Path]:
    """Write the EXL2 model to ``target``; returns the shard paths.  ``shard_mib`` 0 means no limit.

    ``extra_files`` maps file names to text written alongside (measurement.json, README.md, ...).
    """
    model_dir, out_tensor, target = Path(model_dir), Path(out_tensor), Path(target)
    parts = ModelParts(model_dir, dtype=torch.float32)
    limit = int(shard_mib * 1024 * 1024) if shard_mib > 0 else None
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    def module_tensors(name: str, kind: str) -> dict[str, torch.Tensor]:
        if kind == "exl2":
            path = out_tensor / f"{name}.safetensors"
            if not path.exists():
                raise FileNotFoundError(f"{path}: quantized tensors of {name} missing (quantization incomplete)")
            return load_file(str(path))
        return {name: parts.src.get(name).to(torch.float16)}

    def module_bytes(name: str, kind: str) -> int:
        if kind == "exl2":   # the file is the tensors plus a small header
            return (out_tensor / f"{name}.safetensors").stat().st_size
        return 2 * math.prod(parts.src.shape(name))          # written as fp16

    # Cut shards by size before writing, so each shard's name can carry the count.
    shards: list[list[tuple[str, str]]] = [[]]
    size = 0
    for name, kind in module_order(parts.cfg.num_layers):
        n = module_bytes(name, kind) if limit else 0
        if limit and shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, kind))
        size += n
    paths = []
    for i, mods in enumerate(shards):
        fname = "output.safetensors" if len(shards) == 1 else f"output-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, kind in mods:
            tensors.update(module_tensors(name, kind))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / fname))
        paths.append(target / fname)

    for f in sorted(model_dir.iterdir()):
        if f.is_file() and not f.name.endswith(COPY_SKIP_SUFFIXES) and f.name not in COPY_SKIP_NAMES:
            shutil.copy2(f, tmp / f.name)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (tmp / "config.json").write_text(json.dumps(config, indent=4))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)

    old = target.with_name(target.name + ".old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)
    return paths
