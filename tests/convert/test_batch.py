"""exl2-batch: spec validation and the task graph (no Ray), then real batches on a local Ray instance.

The Ray tests share one local instance (2 CPUs) and one first batch: two tiny models x two bpw plus a
model folder without config.json, with the worker of one quantization task killed (SIGKILL) after its
first layer. Ray is in the `cluster` extra that `make install` installs; without it these tests fail.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from exl2.convert import batch
from exl2.convert.batch import BatchError, SpecError, is_complete, load_spec, parse_spec, plan, run_batch
from tests.convert import batch_faults

SMALL = dict(rows=4, length=64, measurement_rows=4, measurement_length=64, validation_rows=2)


def write_spec(path: Path, output: str, models: list[dict], defaults: dict | None = None,
               resources: dict | None = None) -> Path:
    """A TOML writer for the few value types a spec uses."""
    def val(v):
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(v)
    lines = [f"output = {val(output)}", "[defaults]"]
    lines += [f"{k} = {val(v)}" for k, v in (defaults or {}).items()]
    lines += ["[resources]"] + [f"{k} = {val(v)}" for k, v in (resources or {}).items()]
    for m in models:
        lines += ["[[model]]"] + [f"{k} = {val(v)}" for k, v in m.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# Spec and plan, without Ray
# ------------------------------------------------------------------------------------------------

def test_spec_defaults_overrides_and_paths(tmp_path):
    f = write_spec(tmp_path / "s.toml", "out", [{"path": "models/Qwen2-7B"},
                                                 {"path": "/abs/llama", "name": "l8", "bpw": [5.0], "rows": 7}],
                   defaults={"bpw": [3.0, 4.0], "head_bits": 8, "cal_dataset": "cal.parquet"},
                   resources={"num_gpus": 0.5})
    spec = load_spec(f)
    assert spec.output == str(tmp_path / "out")                   # relative to the spec's folder
    q, l8 = spec.models
    settings = ("bpw", "head_bits", "rows")
    assert (q.name, q.path, *map(q.settings.get, settings)) == ("Qwen2-7B", str(tmp_path / "models/Qwen2-7B"),
                                                              [3.0, 4.0], 8, 100)
    assert q.settings["cal_dataset"] == str(tmp_path / "cal.parquet")
    assert (l8.name, l8.path, *map(l8.settings.get, settings)) == ("l8", "/abs/llama", [5.0], 8, 7)
    assert (spec.resources.num_cpus, spec.resources.num_gpus, spec.resources.max_retries) == (1, 0.5, 3)
    assert q.resources == spec.resources


def test_tables_norm_and_asym_reach_every_task():
    spec = parse_spec({"output": "/o", "defaults": {"tables": "extended"},
                       "model": [{"path": "/m/a", "norm": 2, "asym": 0.25}, {"path": "/m/b", "tables": "exl2"}]})
    got = {(t.model, t.kind, t.options["tables"], t.options["norm"], t.options["asym"]) for t in plan(spec)}
    assert got == {("a", "measure", "extended", 2.0, 0.25), ("a", "quantize", "extended", 2.0, 0.25),
                   ("b", "measure", "exl2", None, None), ("b", "quantize", "exl2", None, None)}
    off = parse_spec({"output": "/o", "model": [{"path": "/m/a", "asym": 0}, {"path": "/m/b", "asym": "auto"}]})
    assert [m.settings["asym"] for m in off.models] == [0.0, None]          # None: the converter's auto rule


def test_per_model_resources():
    spec = parse_spec({"output": "/o", "resources": {"num_cpus": 2, "memory_gb": 16},
                       "model": [{"path": "/m/small"},
                                 {"path": "/m/big", "resources": {"num_gpus": 1, "memory_gb": 64}}]})
    small, big = spec.models
    assert (small.resources.num_cpus, small.resources.num_gpus, small.resources.memory_gb) == (2, 0, 16)
    assert (big.resources.num_cpus, big.resources.num_gpus, big.resources.memory_gb) == (2, 1, 64)
    devices = {(t.model, t.options["device"], t.resources["num_gpus"]) for t in plan(spec)}
    assert devices == {("small", "cpu", 0), ("big", "cuda", 1)}
    with pytest.raises(SpecError, match=r"\[\[model\]\] 'big': resources: unknown key 'gpu'"):
        parse_spec({"output": "/o", "model": [{"path": "/m/big", "resources": {"gpu": 1}}]})


def test_plan_is_a_graph_of_measure_then_targets(tmp_path):
    spec = parse_spec({"output": "/o", "defaults": {"bpw": [3.0, 4.5]},
                       "model": [{"path": "/m/a"}, {"path": "/m/b", "bpw": 6}]})
    tasks = plan(spec)
    assert [(t.id, t.deps) for t in tasks] == [
        ("a/measure", []), ("a/3bpw", ["a/measure"]), ("a/4.5bpw", ["a/measure"]),
        ("b/measure", []), ("b/6bpw", ["b/measure"])]
    m, t3 = tasks[0], tasks[1]
    assert m.output == "/o/a/measurement.json"
    assert m.options["work_dir"] == "/o/a/.work/measure" and m.options["measure_only"]
    assert t3.output == t3.options["compile_dir"] == "/o/a/3bpw"
    assert t3.options["work_dir"] == "/o/a/.work/bpw-3.00" and t3.options["bits"] == [3.0]
    assert all(t.options["device"] == "cpu" and t.options["in_dir"] == f"/m/{t.model}" for t in tasks)
    # Every option is a ConvertOptions field.
    from exl2.convert.api import ConvertOptions

    for t in tasks:
        ConvertOptions(**t.options)
    gpu = parse_spec({"output": "/o", "resources": {"num_gpus": 1}, "model": [{"path": "/m/a"}]})
    assert {t.options["device"] for t in plan(gpu)} == {"cuda"}
    assert not any("ray" in t.options for t in tasks)          # measure_workers not given: no split


def test_measure_workers_split_the_measurement_task_only():
    spec = parse_spec({"output": "/o", "defaults": {"bpw": [3.0], "measure_workers": 3},
                       "model": [{"path": "/m/a"}, {"path": "/m/b", "measure_workers": 1}]})
    opts = {t.id: t.options for t in plan(spec)}
    assert (opts["a/measure"]["ray"], opts["a/measure"]["ray_workers"]) == ("auto", 3)
    assert "ray" not in opts["a/3bpw"] and "ray" not in opts["b/measure"]


@pytest.mark.parametrize("data, message", [
    ({"model": [{"path": "a"}]}, "output: missing"),
    ({"output": "o", "outptu": 1, "model": [{"path": "a"}]}, "unknown key 'outptu'"),
    ({"output": "o"}, "no [[model]] tables"),
    ({"output": "o", "model": [{"path": "a"}, {"name": "b"}]}, "[[model]] #2: missing key 'path'"),
    ({"output": "o", "model": [{"path": "a", "bpww": [4.0]}]}, "[[model]] 'a': unknown key 'bpww'"),
    ({"output": "o", "model": [{"path": "a", "bpw": "4,5"}]}, "[[model]] 'a': bpw = '4,5': must be a non-empty list"),
    ({"output": "o", "model": [{"path": "a", "bpw": []}]}, "[[model]] 'a': bpw = []: must be a non-empty list"),
    ({"output": "o", "model": [{"path": "a", "bpw": [4.0, 12]}]}, "[[model]] 'a': bpw = [4.0, 12]: 12 is outside"),
    ({"output": "o", "model": [{"path": "a", "bpw": [4, 4.0]}]}, "[[model]] 'a': bpw = [4, 4.0]: lists a target twice"),
    ({"output": "o", "defaults": {"bpw": [True]}, "model": [{"path": "a"}]}, "[defaults]: bpw = [True]"),
    ({"output": "o", "defaults": {"rows": 0}, "model": [{"path": "a"}]}, "[defaults]: rows = 0: must be at least 1"),
    ({"output": "o", "defaults": {"head_bits": 7}, "model": [{"path": "a"}]}, "head_bits = 7: must be one of"),
    ({"output": "o", "defaults": {"tables": "big"}, "model": [{"path": "a"}]}, "tables = 'big': must be one of exl2, extended"),
    ({"output": "o", "model": [{"path": "a", "norm": 9}]}, "[[model]] 'a': norm = 9: must be between 1 and 4"),
    ({"output": "o", "model": [{"path": "a", "asym": 2}]}, "[[model]] 'a': asym = 2: must be \"auto\" or a number between 0 (off) and 1"),
    ({"output": "o", "model": [{"path": "a", "asym": "full"}]}, "asym = 'full': must be \"auto\" or a number"),
    ({"output": "o", "model": [{"path": "x/a"}, {"path": "y/a"}]}, "[[model]] 'a': name used twice"),
    ({"output": "o", "model": [{"path": "a", "name": "../up"}]}, "name = '../up': must be a plain folder name"),
    ({"output": "o", "resources": {"gpus": 1}, "model": [{"path": "a"}]}, "[resources]: unknown key 'gpus'"),
    ({"output": "o", "model": [{"path": "a", "measure_workers": 0}]}, "measure_workers = 0: must be at least 1"),
    ({"output": "o", "resources": {"num_cpus": -1}, "model": [{"path": "a"}]}, "num_cpus = -1: must be a number"),
])
def test_spec_errors_name_the_key_and_model(data, message):
    with pytest.raises(SpecError) as e:
        parse_spec(data, "/base", "s.toml")
    assert message in str(e.value) and str(e.value).startswith("s.toml: ")
    assert "\n" not in str(e.value)


def test_cli_spec_error_is_one_line(tmp_path):
    f = write_spec(tmp_path / "s.toml", "out", [{"path": "a", "bpw": [4.0, "x"]}])
    r = CliRunner().invoke(batch.main, [str(f)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [f"error: {f}: [[model]] 'a': bpw = [4.0, 'x']: must be a non-empty "
                                             "list of numbers, e.g. [3.0, 4.0]"]
    (tmp_path / "bad.toml").write_text("output = \n")
    r = CliRunner().invoke(batch.main, [str(tmp_path / "bad.toml")])
    assert r.exit_code == 2 and "not valid TOML" in r.output


def _fake_outputs(tasks, exl2_keys: bool = True):
    """What a finished run leaves; ``exl2_keys=False``: an output written before --tables/--norm/--asym."""
    for t in tasks:
        out = Path(t.output)
        if t.kind == "measure":
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("{}")
        else:
            out.mkdir(parents=True, exist_ok=True)
            for name in ("validation.json", "README.md"):
                (out / name).write_text("{}")
            q = {"bits": t.bpw, "head_bits": 6, "calibration": {"rows": 100, "length": 2048, "dataset": "(default)"}}
            if exl2_keys:                   # the defaults: ExLlamaV2's tables and norms, auto asym at 100 x 2048
                q["exl2"] = {"tables": "exl2", "norm": None, "asym": 1.0}
            (out / "config.json").write_text(json.dumps({"quantization_config": q}))


def test_complete_outputs_are_skipped_without_ray(tmp_path, monkeypatch):
    spec = parse_spec({"output": str(tmp_path), "defaults": {"bpw": [3.0, 4.0]}, "model": [{"path": "/m/a"}]})
    tasks = plan(spec)
    assert not any(is_complete(t) for t in tasks)
    _fake_outputs(tasks)
    (Path(tasks[2].output) / "validation.json").unlink()           # an unvalidated target is not complete
    assert [is_complete(t) for t in tasks] == [True, True, False]
    monkeypatch.setitem(sys.modules, "ray", None)                  # importing ray now fails
    with pytest.raises(BatchError, match=r"needs Ray: pip install 'exl2\[cluster\]'"):
        run_batch(spec)
    _fake_outputs(tasks)
    events = []
    s = run_batch(spec, emit=events.append)
    assert (s["succeeded"], s["skipped"], s["failed"]) == (0, 3, 0)
    assert [(e["task"], e["state"], e["reason"]) for e in events] == [
        ("a/measure", "skipped", "already done"), ("a/3bpw", "skipped", "already done"),
        ("a/4bpw", "skipped", "already done")]


def test_complete_output_made_with_other_parameters_fails(tmp_path):
    spec = parse_spec({"output": str(tmp_path), "defaults": {"bpw": [4.0]}, "model": [{"path": "/m/a"}]})
    _fake_outputs(plan(spec))
    spec.models[0].settings["head_bits"] = 8
    s = run_batch(spec)
    assert (s["skipped"], s["failed"]) == (1, 1)
    err = by_task(s)["a/4bpw"]["error"]
    assert err == (f"{tmp_path / 'a' / '4bpw'} exists with head_bits = 6 but the spec asks for 8; delete it and "
                   f"{tmp_path / 'a' / '.work' / 'bpw-4.00'} to convert it again")
    # back to what the output was made with: skipped
    spec.models[0].settings["head_bits"] = 6
    assert by_task(run_batch(spec))["a/4bpw"]["state"] == "skipped"
    spec.models[0].settings["norm"] = 2.0
    err = by_task(run_batch(spec))["a/4bpw"]["error"]
    assert err.startswith(f"{tmp_path / 'a' / '4bpw'} exists with norm = None but the spec asks for 2.0;")
    spec.models[0].settings["norm"] = None
    spec.models[0].settings["asym"] = 0.25
    err = by_task(run_batch(spec))["a/4bpw"]["error"]
    assert err.startswith(f"{tmp_path / 'a' / '4bpw'} exists with asym = 1.0 but the spec asks for 0.25;")
    # an output without our keys (written before --tables/--norm/--asym) counts as ExLlamaV2's tables and norms
    # and asym 0: the default asym (auto, 1.0 at 100 x 2048) differs, asym = 0 matches
    _fake_outputs(plan(spec), exl2_keys=False)
    spec.models[0].settings["asym"] = None
    err = by_task(run_batch(spec))["a/4bpw"]["error"]
    assert err.startswith(f"{tmp_path / 'a' / '4bpw'} exists with asym = 0.0 but the spec asks for 1.0;")
    spec.models[0].settings["asym"] = 0.0
    assert by_task(run_batch(spec))["a/4bpw"]["state"] == "skipped"


def test_unreachable_address_fails_fast(tmp_path):
    import ray  # noqa: F401  (the cluster extra, installed by `make test`: a missing Ray fails, never skips)
    f = write_spec(tmp_path / "s.toml", "out", [{"path": "a"}])
    r = CliRunner().invoke(batch.main, [str(f), "--address", "127.0.0.1:1"])
    assert r.exit_code == 2
    assert r.output.startswith("error: --address 127.0.0.1:1: no Ray head node answers there")


def fake_model(path: Path, *, files=("config.json", "tokenizer.json", "model.safetensors")) -> Path:
    """A folder that has a model's file names (empty files: --dry-run looks at names only)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in files:
        (path / name).write_text("{}")
    return path


def test_dry_run_prints_the_plan(tmp_path):
    fake_model(tmp_path / "a")
    f = write_spec(tmp_path / "s.toml", "out", [{"path": "a"}], defaults={"bpw": [4.0]})
    r = CliRunner().invoke(batch.main, [str(f), "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:2] == ["todo", "a/measure"]
    assert lines[1].split()[:2] == ["todo", "a/4bpw"] and "(after a/measure)" in lines[1]


def test_dry_run_checks_model_folders(tmp_path):
    """One `error:` line per unusable model folder, exit 2, no plan; finished models are not looked at."""
    fake_model(tmp_path / "good")
    (tmp_path / "file").write_text("not a folder")
    fake_model(tmp_path / "notok", files=("config.json",))
    fake_model(tmp_path / "pickled", files=("config.json", "tokenizer.json", "pytorch_model.bin"))
    sharded = fake_model(tmp_path / "sharded",
                         files=("config.json", "tokenizer.json", "model-00001-of-00002.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    models = [{"path": n} for n in ("good", "missing", "file", "notok", "pickled", "sharded")]
    models.append({"path": "gone", "bpw": [4.0]})                  # its outputs are finished: not read again
    f = write_spec(tmp_path / "s.toml", str(tmp_path / "out"), models, defaults={"bpw": [3.0]})
    _fake_outputs([t for t in plan(load_spec(f)) if t.model == "gone"])
    r = CliRunner().invoke(batch.main, [str(f), "--dry-run"])
    assert r.exit_code == 2
    assert r.stdout == ""                                          # no plan when a model cannot run
    assert r.stderr.splitlines() == [
        f"error: {f}: [[model]] 'missing': {tmp_path / 'missing'}: not found",
        f"error: {f}: [[model]] 'file': {tmp_path / 'file'}: not a directory (a model folder holds config.json, "
        "tokenizer.json and *.safetensors)",
        f"error: {f}: [[model]] 'notok': {tmp_path / 'notok'}: no tokenizer.json, no *.safetensors",
        f"error: {f}: [[model]] 'pickled': {tmp_path / 'pickled'}: no *.safetensors (only pickle checkpoints: "
        "pytorch_model.bin)",
        f"error: {f}: [[model]] 'sharded': {sharded / 'model.safetensors.index.json'}: lists "
        "model-00002-of-00002.safetensors, which does not exist"]
    # fixed: the plan, with the finished model marked done
    for name in ("missing", "notok", "pickled"):
        fake_model(tmp_path / name)
    (tmp_path / "file").unlink()
    fake_model(tmp_path / "file")
    (sharded / "model-00002-of-00002.safetensors").write_text("{}")
    r = CliRunner().invoke(batch.main, [str(f), "--dry-run"])
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert [line.split()[:2] for line in r.stdout.splitlines() if "gone/" in line] == [
        ["done", "gone/measure"], ["done", "gone/4bpw"]]


# ------------------------------------------------------------------------------------------------
# A real local Ray instance
# ------------------------------------------------------------------------------------------------

KILLED = "llama/3bpw"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray instance whose workers carry the test faults (tests/convert/batch_faults.py): the worker
    running KILLED SIGKILLs itself once, right after the converter saved its first quantized layer."""
    import ray
    marker = tmp_path_factory.mktemp("fault") / "killed.json"
    faults = [
        {"task": KILLED, "event": {"stage": "quant", "layer": 0}, "marker": str(marker)},
        {"task": "doomed/measure", "event": {"stage": "measure", "layer": 0}, "marker": str(marker.parent / "doomed")}]
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 * 1024,
             runtime_env=batch_faults.ray_runtime_env(faults))
    try:
        yield ray.get_runtime_context().gcs_address, marker
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_builder, tiny_tokenizer):
    root = tmp_path_factory.mktemp("models")
    for name, kind in (("qwen", "qwen2"), ("llama", "llama3")):
        tiny_builder(kind, root / name, dtype=torch.bfloat16, seed=1)
        shutil.copy(tiny_tokenizer, root / name / "tokenizer.json")
    (root / "broken").mkdir()                                       # no config.json
    shutil.copy(tiny_tokenizer, root / "broken" / "tokenizer.json")
    return root


@pytest.fixture(scope="module")
def first_run(cluster, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "exl2"
    spec_file = write_spec(out.parent / "spec.toml", str(out),
                           [{"path": str(models / "qwen")}, {"path": str(models / "llama")},
                            {"path": str(models / "broken")}],
                           defaults={"bpw": [3.0, 4.0], **SMALL}, resources={"num_cpus": 1, "max_retries": 2})
    events = []
    summary = run_batch(load_spec(spec_file), emit=events.append)
    return spec_file, out, summary, events


def by_task(summary):
    return {r["task"]: r for r in summary["tasks"]}


def test_batch_outputs_are_valid_models(first_run):
    from exl2.runtime.loader import load_model

    _, out, summary, events = first_run
    recs = by_task(summary)
    good = [f"{m}/{x}" for m in ("qwen", "llama") for x in ("measure", "3bpw", "4bpw")]
    assert all(recs[t]["state"] == "finished" for t in good), summary
    for m in ("qwen", "llama"):
        assert json.loads((out / m / "measurement.json").read_text())["measurement"]
        assert (out / m / ".work" / "measure" / "job.json").is_file()
        for b in (3, 4):
            d = out / m / f"{b}bpw"
            assert recs[f"{m}/{b}bpw"]["output"] == str(d)
            assert (out / m / ".work" / f"bpw-{b}.00" / "job.json").is_file()
            q = json.loads((d / "config.json").read_text())["quantization_config"]
            assert q["bits"] == b and q["calibration"]["rows"] == 4
            v = json.loads((d / "validation.json").read_text())
            assert 0 < v["kld_mean"] == pytest.approx(recs[f"{m}/{b}bpw"]["kld_mean"])
            assert (d / "README.md").is_file()
            assert 0.9 * b < recs[f"{m}/{b}bpw"]["bpw"] <= b
            model = load_model(d)
            assert type(model.layers[0].mlp.down_proj).__name__ == "EXL2Linear"
    # Every task went queued -> running -> finished, in that order.
    for t in good:
        states = [e["state"] for e in events if e["task"] == t]
        assert states[0] == "queued" and states[-1] == "finished" and "running" in states


def test_broken_model_fails_alone(first_run):
    _, out, summary, _ = first_run
    recs = by_task(summary)
    assert recs["broken/measure"]["state"] == "failed"
    err = recs["broken/measure"]["error"]
    assert err.endswith("broken/config.json: not found (is -i a Hugging Face model directory?)")
    for b in (3, 4):
        r = recs[f"broken/{b}bpw"]
        assert r["state"] == "skipped" and r["reason"].startswith("broken/measure failed: ")
        assert "config.json: not found" in r["reason"]
    assert (summary["succeeded"], summary["skipped"], summary["failed"]) == (6, 2, 1)
    assert not (out / "broken" / "3bpw").exists()


def test_killed_worker_is_retried_and_resumes(first_run, cluster):
    _, out, summary, events = first_run
    _, marker = cluster
    killed = json.loads(marker.read_text())                         # the fault really fired
    assert killed["task"] == KILLED and killed["event"]["layer"] == 0
    running = [e for e in events if e["task"] == KILLED and e["state"] == "running"]
    assert len(running) == 2, running
    first, retry = running
    assert first["pid"] == killed["pid"] != retry["pid"]
    assert "resume" not in first
    # The retry found the first attempt's work: strategy done, one layer quantized, not yet finished.
    stages = retry["resume"]["finished_stages"]
    assert "optimize:3.00" in stages and "quant:3.00" not in stages
    assert retry["resume"]["bpw-3.00/quant.checkpoint.safetensors"] == {"next_layer": 1}
    assert by_task(summary)[KILLED]["state"] == "finished"
    # And the converter did resume: layer 0's packed tensors are the first attempt's (written before the
    # kill), layer 1's were written by the retry.
    killed_at = marker.stat().st_mtime_ns
    tensors = out / "llama" / ".work" / "bpw-3.00" / "bpw-3.00" / "out_tensor"
    layer0 = [p.stat().st_mtime_ns for p in tensors.glob("model.layers.0.*.safetensors")]
    layer1 = [p.stat().st_mtime_ns for p in tensors.glob("model.layers.1.*.safetensors")]
    assert len(layer0) == len(layer1) == 7
    assert max(layer0) <= killed_at < min(layer1)
    job = json.loads((out / "llama" / ".work" / "bpw-3.00" / "job.json").read_text())
    assert {"optimize:3.00", "quant:3.00", "compile:3.00"} <= set(job["finished_stages"])


def test_rerun_does_no_work(first_run):
    spec_file, out, _, _ = first_run
    spec = load_spec(spec_file)
    spec.models = [m for m in spec.models if m.name != "broken"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    events = []
    s = run_batch(spec, emit=events.append)
    assert (s["succeeded"], s["skipped"], s["failed"]) == (0, 6, 0)
    assert {e["state"] for e in events} == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes


def test_cli_on_existing_cluster_adds_a_target(first_run, cluster, models):
    """`python -m exl2.convert.batch --address ... --status-json`: a new bpw reuses the measurement."""
    address, _ = cluster
    spec_file, out, _, _ = first_run
    spec2 = write_spec(spec_file.parent / "spec2.toml", str(out), [{"path": str(models / "qwen"), "bpw": [3.0, 5.0]}],
                       defaults=SMALL)
    p = subprocess.run([sys.executable, "-m", "exl2.convert.batch", str(spec2), "--address", address, "--status-json"],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(line) for line in p.stdout.splitlines()]   # stdout is JSON lines only
    assert [(e.get("task"), e["state"]) for e in lines] == [
        ("qwen/measure", "skipped"), ("qwen/3bpw", "skipped"), ("qwen/5bpw", "queued"), ("qwen/5bpw", "running"),
        ("qwen/5bpw", "finished"), (None, "done")]
    assert lines[-1] == {"state": "done", "succeeded": 1, "skipped": 2, "failed": 0}
    assert not (out / "qwen" / ".work" / "bpw-5.00" / "cal" / "measure.safetensors").exists()   # not re-measured
    assert (out / "qwen" / "5bpw" / "validation.json").is_file()


def test_measurement_split_over_workers_is_the_same_bytes(first_run, cluster, models):
    """measure_workers = 2: the qwen model's measurement in two layer ranges on the cluster equals the first
    run's, measured in one task (both with the task's one CPU, so one thread)."""
    spec_file, out, _, _ = first_run
    out2 = spec_file.parent / "split"
    spec = write_spec(spec_file.parent / "spec-split.toml", str(out2), [{"path": str(models / "qwen")}],
                      defaults={"bpw": [3.0], **SMALL, "measure_workers": 2}, resources={"num_cpus": 1})
    s = run_batch(load_spec(spec))
    assert (s["succeeded"], s["failed"]) == (2, 0), s
    parts = sorted(p.name for p in (out2 / "qwen" / ".work" / "measure" / "measure").glob("part-*"))
    assert parts == ["part-0000-0001", "part-0001-0002"]
    assert (out2 / "qwen" / "measurement.json").read_bytes() == (out / "qwen" / "measurement.json").read_bytes()


def test_cli_table_and_exit_status_on_failure(first_run):
    spec_file, _, _, _ = first_run
    r = CliRunner().invoke(batch.main, [str(spec_file)])            # only broken/measure runs (and fails)
    assert r.exit_code == 1, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["task", "state", "time", "detail"]
    row = next(line for line in lines if line.startswith("broken/measure"))
    assert row.split()[1] == "failed" and "config.json: not found" in row
    assert lines[-1] == "succeeded 0, skipped 8, failed 1"


def test_worker_death_without_retries_fails_that_model(cluster, models, tmp_path):
    """max_retries = 0: the killed measurement is reported failed (one line); its target is skipped."""
    f = write_spec(tmp_path / "s.toml", "out", [{"path": str(models / "qwen"), "name": "doomed", "bpw": [4.0]}],
                   defaults=SMALL, resources={"max_retries": 0})
    s = run_batch(load_spec(f))
    recs = by_task(s)
    assert (cluster[1].parent / "doomed").is_file()
    err = recs["doomed/measure"]["error"]
    assert err.startswith("WorkerCrashedError: ") and err.endswith("(after 0 retries; rerun to resume)")
    assert "\n" not in err, err
    assert recs["doomed/4bpw"]["state"] == "skipped" and recs["doomed/4bpw"]["reason"].startswith("doomed/measure failed")


# ------------------------------------------------------------------------------------------------
# A local Ray instance talks to nobody else
# ------------------------------------------------------------------------------------------------

def test_local_ray_settings_leave_user_settings_alone(monkeypatch, tmp_path):
    """The settings applied around ray.init of a local instance, what a user set explicitly, and the undo."""
    import ray  # noqa: F401
    from ray._private import ray_constants, services

    monkeypatch.setenv("RAY_USAGE_STATS_CONFIG_PATH", str(tmp_path / "absent.json"))
    for key in batch.LOCAL_RAY_ENV:
        monkeypatch.delenv(key, raising=False)
    api_server, cluster_flag = services.start_api_server, ray_constants.ENABLE_RAY_CLUSTER
    with batch.local_ray_settings():
        assert {k: os.environ.get(k) for k in batch.LOCAL_RAY_ENV} == {
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        assert ray_constants.ENABLE_RAY_CLUSTER is False
        assert services.start_api_server(None, False, "127.0.0.1", "", "", "", "", "", "") == ("", None)
    assert not any(k in os.environ for k in batch.LOCAL_RAY_ENV)
    assert services.start_api_server is api_server and ray_constants.ENABLE_RAY_CLUSTER == cluster_flag

    # Set by the user: kept, and usage stats on keep Ray's API server (the process that reports them).
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    with batch.local_ray_settings():
        assert (os.environ["RAY_USAGE_STATS_ENABLED"], os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]) == ("1", "1")
        assert services.start_api_server is api_server and ray_constants.ENABLE_RAY_CLUSTER == cluster_flag

    # Usage stats turned on in Ray's config file (`ray enable-usage-stats`) count as explicit too.
    for key in batch.LOCAL_RAY_ENV:
        monkeypatch.delenv(key)
    (tmp_path / "config.json").write_text('{"usage_stats": true}')
    monkeypatch.setenv("RAY_USAGE_STATS_CONFIG_PATH", str(tmp_path / "config.json"))
    with batch.local_ray_settings():
        assert "RAY_USAGE_STATS_ENABLED" not in os.environ and services.start_api_server is api_server
        assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


# Installed as sitecustomize (through PYTHONPATH) in every Python process of the watched run: Ray passes the
# environment on to everything it starts.  It logs socket connects/sends to IP addresses and name lookups.
AUDIT_SITECUSTOMIZE = '''
import os
import sys


def _exl2_program():
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)     # the interpreter first
    for i, a in enumerate(argv[1:], 1):
        if a == "-m" and i + 1 < len(argv):
            return argv[i + 1]                                    # python -m MODULE
        if a == "-c" or not a.startswith("-"):
            return os.path.basename(a)                            # python [options] SCRIPT
    return os.path.basename(argv[0]) if argv else ""


def _exl2_net_audit(event, args, _log=os.environ.get("EXL2_NET_AUDIT_LOG")):
    if not _log or not event.startswith("socket."):
        return
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        if args[0].family not in (2, 10) or not isinstance(args[1], tuple):     # AF_INET, AF_INET6
            return
        host, port = args[1][0], args[1][1]
    elif event == "socket.getaddrinfo":
        host, port = args[0], args[1]
    elif event in ("socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        host, port = args[0], None
    else:
        return
    host = host.decode() if isinstance(host, bytes) else str(host)
    with open(_log, "a") as f:
        f.write(f"{os.getpid()}\\t{event}\\t{host}\\t{port}\\t{_exl2_program()}\\n")


if os.environ.get("EXL2_NET_AUDIT_LOG"):
    with open(os.environ["EXL2_NET_AUDIT_LOG"], "a") as f:      # this process is watched
        f.write(f"{os.getpid()}\\tstart\\t\\t\\t{_exl2_program()}\\n")
    sys.addaudithook(_exl2_net_audit)
'''


def _is_local(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "", "None"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False                                     # a name: resolving it may ask a DNS server
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return ip.is_loopback


def _strace_usable() -> str | None:
    """Why strace cannot watch a run here (None if it can)."""
    exe = shutil.which("strace")
    if exe is None:
        return "strace is not installed (apt-get install strace); the Python-level audit still ran"
    p = subprocess.run([exe, "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"strace cannot trace here (ptrace not permitted?): {p.stderr.strip()[:200]}"
    return None


def _strace_events(trace: Path) -> list[tuple[str, str, int, str]]:
    """(syscall, address, port, line) for every IPv4/IPv6 socket address in the trace."""
    import re

    call = re.compile(r"^\d+\s+(connect|sendto|sendmsg|sendmmsg|bind)\(")
    addr = re.compile(r'sa_family=AF_INET6?, sin6?_port=htons\((\d+)\).*?'
                      r'(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)")')
    out = []
    for line in trace.read_text(errors="replace").splitlines():
        m = call.match(line)
        if m:
            for port, v4, v6 in addr.findall(line):
                out.append((m.group(1), v4 or v6, int(port), line[:300]))
    return out


@pytest.fixture(scope="module")
def watched_local_batch(models, tmp_path_factory):
    """`python -m exl2.convert.batch` without --address (a local Ray instance), one tiny model, one target:
    every Python process audited; the whole process tree also under strace when strace works here."""
    import ray  # noqa: F401
    root = tmp_path_factory.mktemp("watched")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(AUDIT_SITECUSTOMIZE)
    spec = write_spec(root / "spec.toml", str(root / "out"), [{"path": str(models / "qwen"), "bpw": [4.0]}],
                      defaults=SMALL)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_")}     # a user's Ray settings are not ours to test
    env.update(EXL2_NET_AUDIT_LOG=str(root / "audit.tsv"),
               PYTHONPATH=os.pathsep.join([str(root / "site")] + [p for p in [env.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-m", "exl2.convert.batch", str(spec), "--num-cpus", "1", "--object-store-mb", "80",
           "--status-json"]
    why_not = _strace_usable()
    trace = root / "strace.txt"
    if why_not is None:
        cmd = [shutil.which("strace"), "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,sendmmsg,bind",
               "-o", str(trace)] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.splitlines()[-1]) == {"state": "done", "succeeded": 2, "skipped": 0, "failed": 0}
    return root / "audit.tsv", (trace if why_not is None else why_not)


def test_local_batch_python_sockets_stay_on_loopback(watched_local_batch):
    """Python-level audit (runs wherever Ray does): no Python code of the driver, the Ray agents, the
    API server or the workers connects to, sends to, or looks up a name or address other than loopback.
    It sees what Python's socket module does (the cloud-metadata probe is Python: requests), not what
    the C++ parts (GCS, raylet, gRPC, the node-address probe in _raylet.so) do: see the strace test."""
    audit, _ = watched_local_batch
    rows = [line.split("\t") for line in audit.read_text().splitlines()]
    watched = {r[4] for r in rows if r[1] == "start"}
    assert {"exl2.convert.batch", "default_worker.py", "agent.py", "main.py"} <= watched, watched  # driver, workers, agents
    outside = [r for r in rows if r[1] != "start" and not _is_local(r[2])]
    assert outside == [], outside


def test_local_batch_opens_no_outside_connection(watched_local_batch):
    """strace -f over the whole run (driver, GCS, raylet, agents, workers, compilers if any): every
    connect/sendto/sendmsg/sendmmsg to an IPv4/IPv6 address goes to loopback, nothing goes to a DNS port
    (53, even on loopback), and every bind is on loopback.  It sees system calls of the processes this
    run starts, not what an already running Ray cluster or another machine does; and only the code
    paths of this run (CPU tasks; no TPU host, no --address)."""
    _, trace = watched_local_batch
    if isinstance(trace, str):
        pytest.skip(trace)
    events = _strace_events(trace)
    assert any(call == "connect" for call, *_ in events)                 # the trace did see Ray's own traffic
    bad = [e for e in events if not _is_local(e[1]) or e[2] == 53]
    assert bad == [], "\n".join(e[3] for e in bad[:20])
