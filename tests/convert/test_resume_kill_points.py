"""Resume is byte-identical whatever moment a run is killed at, and a rerun with other parameters that the
interrupted work depends on is refused instead of mixing the two."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from exl2.convert.cli import convert_main

ARGS = ["-b", "4.0", "-r", "2", "-l", "32", "-mr", "2", "-ml", "32", "--no-validate", "--asym", "0.25"]


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way out handles it."""


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_builder, tiny_tokenizer) -> Path:
    d = Path(tiny_builder("qwen2", tmp_path_factory.mktemp("src") / "model", num_hidden_layers=2))
    shutil.copy(tiny_tokenizer, d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> dict[str, bytes]:
    job = tmp_path_factory.mktemp("ref") / "job"
    r = CliRunner().invoke(convert_main, ["-i", str(source), "-o", str(job), *ARGS])
    assert r.exit_code == 0, r.output
    return outputs(job)


def outputs(job: Path) -> dict[str, bytes]:
    return {"measurement.json": json.dumps(json.loads((job / "measurement.json").read_text())["measurement"]).encode(),
            "output.safetensors": (job / "bpw-4.00" / "model" / "output.safetensors").read_bytes()}


def kill_at(monkeypatch, loop: str, nth: int, when: str) -> None:
    """Raise Killed at the ``nth`` (0-based) checkpoint write of ``loop`` ("measure" or "quant"), just before
    or just after the rename that publishes it, leaving the temporary file behind as a real kill would."""
    import exl2.core.files as files

    real_replace = os.replace
    seen = [0]

    def replace(src, dst, *a, **kw):
        if str(dst).endswith(f"{loop}.checkpoint.safetensors"):
            seen[0] += 1
            if seen[0] - 1 == nth:
                if when == "after":
                    real_replace(src, dst, *a, **kw)
                monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)  # no clean-up on the way out
                raise Killed
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(files.os, "replace", replace)


@pytest.mark.parametrize("loop", ["measure", "quant"])
@pytest.mark.parametrize("nth", [0, 1])
@pytest.mark.parametrize("when", ["before", "after"])
def test_every_kill_point_resumes_to_the_same_bytes(source, reference, tmp_path, monkeypatch, loop, nth, when):
    job = tmp_path / "job"
    kill_at(monkeypatch, loop, nth, when)
    with pytest.raises(Killed):
        CliRunner().invoke(convert_main, ["-i", str(source), "-o", str(job), *ARGS], catch_exceptions=False)
    monkeypatch.undo()
    r = CliRunner().invoke(convert_main, ["-i", str(source), "-o", str(job), *ARGS])
    assert r.exit_code == 0, r.output
    assert outputs(job) == reference


def test_a_two_file_checkpoint_of_the_old_layout_is_not_trusted(source, reference, tmp_path):
    """The earlier layout wrote states, then a progress record: a kill between them left a record of one layer
    beside the states of the next.  Such files are ignored and the loop starts over."""
    job = tmp_path / "job"
    r = CliRunner().invoke(convert_main, ["-i", str(source), "-o", str(job), "-om", str(tmp_path / "m.json"),
                                          *ARGS])
    assert r.exit_code == 0, r.output
    stages = json.loads((job / "job.json").read_text())
    stages["finished_stages"] = []
    (job / "job.json").write_text(json.dumps(stages))
    (job / "measurement.json").unlink()
    (job / "measure" / "measure.progress.json").write_text(json.dumps({"measurement": {}, "next_layer": 1}))
    save_file({"row.00000": torch.ones(1, 32, 128), "row.00001": torch.ones(1, 32, 128)},
              str(job / "measure" / "measure.states.safetensors"))
    r = CliRunner().invoke(convert_main, ["-i", str(source), "-o", str(job), *ARGS])
    assert r.exit_code == 0, r.output
    assert outputs(job) == reference
    assert not (job / "measure" / "measure.progress.json").exists()


@pytest.mark.parametrize("flag, value, loop", [("-r", "3", "quant"), ("-l", "48", "quant"), ("--seed", "2", "quant"),
                                               ("-mr", "3", "measure"), ("-ml", "48", "measure")])
def test_changed_parameter_after_a_kill_is_refused(source, tmp_path, monkeypatch, flag, value, loop):
    job = tmp_path / "job"
    kill_at(monkeypatch, loop, 0, "after")
    with pytest.raises(Killed):
        CliRunner().invoke(convert_main, ["-i", str(source), "-o", str(job), *ARGS], catch_exceptions=False)
    monkeypatch.undo()
    args = list(ARGS)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    r = CliRunner().invoke(convert_main, ["-i", str(source), "-o", str(job), *args])
    assert r.exit_code == 2, r.output
    assert f"finished work used {flag} =" in r.output and "Traceback" not in r.output


def test_rows_made_before_a_change_are_made_again_when_nothing_used_them(source, tmp_path):
    """-om measures only (the quantization rows are not made); the first quantizing run then makes rows with
    its own -r, and the model card and config say how many rows were really used."""
    job = tmp_path / "job"
    r = CliRunner().invoke(convert_main, ["-i", str(source), "-o", str(job), "-om", str(tmp_path / "m.json"), *ARGS])
    assert r.exit_code == 0, r.output
    (job / "cal").mkdir(exist_ok=True)
    # rows of an earlier -r that no finished or interrupted work used
    from exl2.calibration import default_rows

    default_rows(source / "tokenizer.json", 2, 32, vocab_size=512).save(job / "cal" / "quant.safetensors")
    args = list(ARGS)
    args[args.index("-r") + 1] = "3"
    r = CliRunner().invoke(convert_main, ["-i", str(source), "-o", str(job), *args])
    assert r.exit_code == 0, r.output
    q = json.loads((job / "bpw-4.00" / "model" / "config.json").read_text())["quantization_config"]
    assert q["calibration"]["rows"] == 3
