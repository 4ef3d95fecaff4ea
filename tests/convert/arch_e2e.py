"""What the per-architecture end-to-end conversion tests (tests/convert/test_convert_<arch>.py) share: the tiny
settings, building the source folder, the conversion job, reading the output's tensor names, the exl2-inspect
check, ExLlamaV2's config reader on the output, and the reload-and-compare step of the KL check.

Each test file keeps what is its own: the expected tensor names with their ExLlamaV2 citations, its special
checks, and its KL bound with the measurements behind it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from exl2.calibration import default_rows
from exl2.convert.api import ConvertOptions, convert
from exl2.convert.cli import inspect_main
from exl2.convert.validate import held_out_rows
from exl2.runtime.loader import load_model

# The settings of test_convert.py's tiny end-to-end conversions.
SMALL = dict(rows=4, length=64, measurement_rows=4, measurement_length=64, validation_rows=2)

# module.py:118-119 of ExLlamaV2 0.3.2: the tensors a quantized linear layer is read from, <key>.<suffix>
# (each test file cites this where it builds its expected names).
EXL2_LINEAR = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")


def build_src(tiny_builder, tiny_tokenizer, where: Path, arch: str, **kw) -> Path:
    """The tiny random ``arch`` checkpoint in ``where``/model, with the tiny tokenizer beside it."""
    d = Path(tiny_builder(arch, where / "model", **kw))
    shutil.copy(tiny_tokenizer, d / "tokenizer.json")
    return d


def convert_job(src: Path, work: Path) -> tuple[Path, dict, Path]:
    """Convert ``src`` at 4.0 bpw with SMALL and compile it: (output folder, the target's report, job folder)."""
    r = convert(ConvertOptions(in_dir=str(src), work_dir=str(work / "job"), bits=[4.0],
                               compile_dir=str(work / "out"), **SMALL))
    return work / "out", r["targets"][0], work / "job"


def output_keys(out: Path) -> set[str]:
    with safe_open(str(out / "output.safetensors"), "pt") as f:
        return set(f.keys())


def check_inspect(out: Path, t: dict, layers: int, text: bool = True) -> None:
    """exl2-inspect --json finds no error, ``layers`` layers and the target's bpw (3.8-4.0); with ``text``, the
    plain report says every layer is valid."""
    r = CliRunner().invoke(inspect_main, [str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert not rep["errors"] and len(rep["layers"]) == layers
    assert rep["decoder_bpw"] == pytest.approx(t["bpw"], rel=1e-9) and 3.8 < t["bpw"] <= 4.0
    if text:
        assert "all layers valid" in CliRunner().invoke(inspect_main, [str(out)]).output


def exllamav2_config(exllamav2, folder: Path):
    """ExLlamaV2's config reader, prepared on ``folder``."""
    cfg = exllamav2.config.ExLlamaV2Config()
    cfg.model_dir = str(folder)
    cfg.prepare()
    return cfg


def reload(src: Path, out: Path):
    """(held-out ids, source model, reloaded EXL2 model): 4 rows of 64 tokens the quantizer never saw (validation
    used 2), both models on the runtime."""
    tok = src / "tokenizer.json"
    used = default_rows(tok, rows=SMALL["rows"], length=SMALL["length"], vocab_size=512).input_ids   # calibration
    ids = held_out_rows(tok, used, 4, 64, None, 512)
    return ids, load_model(src), load_model(out)


def mean_kl(fp, q, ids) -> float:
    """KL(fp || q), mean over tokens, of the two models' logits on ``ids``."""
    with torch.no_grad():
        p = torch.log_softmax(fp(ids).double(), -1)
        lq = torch.log_softmax(q(ids).double(), -1)
    return float((p.exp() * (p - lq)).sum(-1).mean())


def check_names(out: Path, expected: set[str]) -> None:
    """The output holds exactly the ``expected`` tensor names (the differences both ways in the message)."""
    keys = output_keys(out)
    assert keys == expected, (sorted(keys - expected), sorted(expected - keys))


def check_fp16_copies(src_dir: Path, out: Path, keys) -> dict:
    """Each of ``keys`` is stored in the output as the source's tensor in fp16; returns the source's tensors."""
    src = load_file(str(src_dir / "model.safetensors"))
    got = load_file(str(out / "output.safetensors"))
    for key in keys:
        assert got[key].dtype == torch.float16 and torch.equal(got[key], src[key].half()), key
    return src
