"""`exl2-convert --ray local`: one model's measurement over two local Ray workers gives the measurement.json of
a run without Ray, byte for byte; the SmolLM2 check is in the slow tier."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from exl2.convert.cli import convert_main

pytest.importorskip("ray")

ROWS = ["-mr", "2", "-ml", "64"]


@pytest.fixture
def one_thread(monkeypatch):
    """Every run computes with one thread, the base count of core/threads.py too (the Ray tasks inherit it
    through --ray-threads' default); both restored afterwards."""
    from exl2.core import threads

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_base", 1)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _measure(model, work, *extra):
    r = CliRunner().invoke(convert_main, ["-i", str(model), "-o", str(work), "-om",
                                          str(work.parent / f"{work.name}.json"), *ROWS, "--status-json", *extra])
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]


def _same_bytes_with_and_without_ray(model, tmp_path, workers: int) -> list[dict]:
    _measure(model, tmp_path / "plain")
    events = _measure(model, tmp_path / "ray", "--ray", "local", "--ray-workers", str(workers))
    plain, split = (tmp_path / "plain" / "measurement.json"), (tmp_path / "ray" / "measurement.json")
    assert split.read_bytes() == plain.read_bytes()
    assert (tmp_path / "ray.json").read_bytes() == (tmp_path / "plain.json").read_bytes()
    return events


def test_tiny_qwen2_on_two_local_workers(tiny_builder, tiny_tokenizer, tmp_path, one_thread):
    model = tiny_builder("qwen2", tmp_path / "model", num_hidden_layers=3)
    shutil.copy(tiny_tokenizer, model / "tokenizer.json")
    events = _same_bytes_with_and_without_ray(model, tmp_path, 2)
    parts = [e for e in events if e.get("stage") == "measure" and "part" in e]
    assert sorted(e["part"] for e in parts) == [[0, 2], [2, 3]]
    assert all(e["seconds"] > 0 for e in parts)
    # the rerun finds the measurement finished and starts no Ray
    again = _measure(model, tmp_path / "ray", "--ray", "local", "--ray-workers", "2")
    assert not [e for e in again if "part" in e]


def test_bad_ray_options_fail_in_one_line(tiny_builder, tiny_tokenizer, tmp_path):
    model = tiny_builder("qwen2", tmp_path / "model", num_hidden_layers=1)
    shutil.copy(tiny_tokenizer, model / "tokenizer.json")
    for args, says in ((["--ray", "nowhere"], "must be 'local', 'auto' or the head node's HOST:PORT"),
                       (["--ray", "local", "--ray-workers", "0"], "must be at least 1"),
                       (["--ray", "127.0.0.1:9"], "--ray 127.0.0.1:9: no Ray head node answers there")):
        r = CliRunner().invoke(convert_main, ["-i", str(model), "-o", str(tmp_path / "w"), "-om",
                                              str(tmp_path / "m.json"), *ROWS, *args])
        assert r.exit_code == 2, r.output
        last = r.output.strip().splitlines()[-1]
        assert last.startswith("error: ") and says in last, r.output
        assert not (tmp_path / "w").exists()          # refused before the job folder was made


@pytest.mark.slow
def test_smollm2_on_two_local_workers(smollm2_dir, tmp_path, one_thread):
    _same_bytes_with_and_without_ray(smollm2_dir, tmp_path, 2)
