"""Which folders the converter may write, replace or empty, and what it carries into the output.

Every refusal is checked the way a user meets it: the CLI exits 2 with one line on stderr naming the flag
and folder, and the folders involved hash the same before and after.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from exl2.convert.cli import convert_main

ARGS = ["-b", "4.0", "-r", "2", "-l", "32", "-mr", "2", "-ml", "32", "--no-validate"]

SOURCE_CARD = """---
license: apache-2.0
base_model:
- Example/Base-Model
language:
- en
model-index:
- name: tiny
  results:
  - task: {type: text-generation}
    metrics:
    - {name: accuracy, value: 0.5}
---

# Tiny source model

Its own words.
"""


def tree_hash(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or "dir"/"link") for everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "link" if p.is_symlink() else "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_builder, tiny_tokenizer) -> Path:
    """A tiny Qwen2 checkpoint with what real downloads carry: remote code, a pickle, a card, a licence."""
    d = Path(tiny_builder("qwen2", tmp_path_factory.mktemp("src") / "model", num_hidden_layers=1))
    shutil.copy(tiny_tokenizer, d / "tokenizer.json")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_tiny.Tok", None]},
                                                         "model_max_length": 512}))
    (d / "modeling_tiny.py").write_text("import os\nos.system('echo owned')\n")
    (d / "tokenization_tiny.py").write_text("raise SystemExit\n")
    (d / "training_args.pkl").write_bytes(b"\x80\x04K\x01.")
    (d / "README.md").write_text(SOURCE_CARD)
    (d / "LICENSE").write_text("Apache License 2.0 (text)\n")
    (d / "chat_template.jinja").write_text("{{ messages }}")
    return d


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(convert_main, [*args])
    return r.exit_code, r.output


def refused(code: int, out: str, *needles: str) -> None:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert code == 2, out
    assert "Traceback" not in out and lines[-1].startswith("error: "), out
    assert len([ln for ln in lines if ln.startswith("error: ")]) == 1, out
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("conv")
    old = os.umask(0o027)
    try:
        code, out = run("-i", str(source), "-o", str(base / "job"), "-cf", str(base / "model"), *ARGS)
    finally:
        os.umask(old)
    assert code == 0, out
    return base / "job", base / "model"


# ---- what the output holds -----------------------------------------------------------------------------

def test_nothing_executable_or_pickled_is_carried(converted):
    _, out = converted
    names = sorted(p.name for p in out.iterdir())
    assert names == ["LICENSE", "ORIGINAL_CARD.md", "README.md", "chat_template.jinja", "config.json",
                     "exl2_kv.json", "generation_config.json", "measurement.json", "output.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 512}


def test_files_get_the_umask_mode(converted):
    """safetensors alone writes 0600; the fixture converted under umask 027."""
    _, out = converted
    assert (out.stat().st_mode & 0o777) == 0o750
    for p in out.iterdir():
        assert (p.stat().st_mode & 0o777) == 0o640, p.name


def test_card_keeps_the_source_front_matter_and_names_real_loaders(converted, source):
    _, out = converted
    card = (out / "README.md").read_text()
    head = card.split("---\n")[1]
    assert "license: apache-2.0" in head and "- Example/Base-Model" in head and "- en" in head
    assert "model-index" not in head and "accuracy" not in head     # the source's results are not ours
    assert (out / "ORIGINAL_CARD.md").read_text() == SOURCE_CARD
    assert "[ORIGINAL_CARD.md](ORIGINAL_CARD.md)" in card
    assert "ExLlamaV2 0.3.x" in card and "ExLlamaV3 does not read EXL2" in card and "2026-07-14" in card


def test_quantization_config_keys_mean_what_exllamav2_means(converted):
    _, out = converted
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "version" not in q                          # ExLlamaV2's "version" is its own; ours is under exl2
    assert q["exl2"]["tool"] == "exl2" and q["exl2"]["tool_version"]
    assert q["calibration"] == {"rows": 2, "length": 32, "dataset": "(default)"}


# ---- -cf -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["input", "inside input", "around input", "job", "inside job"])
def test_cf_never_names_the_input_or_the_job(source, tmp_path, where):
    job = tmp_path / "job"
    cf = {"input": source, "inside input": source / "exl2", "around input": source.parent,
          "job": job, "inside job": job / "mine"}[where]
    before = tree_hash(source.parent)
    code, out = run("-i", str(source), "-o", str(job), "-cf", str(cf), *ARGS)
    refused(code, out, "-cf", str(cf))
    assert tree_hash(source.parent) == before
    assert not job.exists()                      # refused before the job folder was made


def test_cf_refuses_a_folder_with_other_files(source, tmp_path):
    cf = tmp_path / "mine"
    (cf / "notes").mkdir(parents=True)
    (cf / "thesis.tex").write_text("years of work")
    (cf / "config.json").write_text("{}")
    before = tree_hash(cf)
    code, out = run("-i", str(source), "-o", str(tmp_path / "job"), "-cf", str(cf), *ARGS)
    refused(code, out, "-cf", "notes/", "thesis.tex")
    assert tree_hash(cf) == before


def test_cf_replaces_only_an_earlier_output_of_ours(source, tmp_path):
    cf = tmp_path / "model"
    cf.mkdir()                                              # an empty folder is fine
    assert run("-i", str(source), "-o", str(tmp_path / "a"), "-cf", str(cf), *ARGS)[0] == 0
    first = tree_hash(cf)
    # another job may replace it: every file in it is one we write
    code, out = run("-i", str(source), "-o", str(tmp_path / "b"), "-cf", str(cf), *ARGS[:-1], "--seed", "1",
                    "--no-validate")
    assert code == 0, out
    assert tree_hash(cf) != first and not list(tmp_path.glob(".model.exl2-*"))
    # ... until the user puts something of theirs in it
    (cf / "my-eval.txt").write_text("mine")
    before = tree_hash(cf)
    code, out = run("-i", str(source), "-o", str(tmp_path / "c"), "-cf", str(cf), *ARGS)
    refused(code, out, "my-eval.txt")
    assert tree_hash(cf) == before


def test_staging_names_cannot_collide_with_user_folders(source, tmp_path):
    """The old writer used "<target>.partial" and "<target>.old" beside the target and deleted them."""
    for name in ("model.partial", "model.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    code, out = run("-i", str(source), "-o", str(tmp_path / "job"), "-cf", str(tmp_path / "model"), *ARGS)
    assert code == 0, out
    for name in ("model.partial", "model.old"):
        assert (tmp_path / name / "keep.txt").read_text() == name


# ---- -o and -nr ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fresh", [False, True])
def test_job_folder_is_never_the_input(source, fresh):
    before = tree_hash(source)
    code, out = run("-i", str(source), "-o", str(source), *(["-nr"] if fresh else []), *ARGS)
    refused(code, out, "-o", "-i")
    assert tree_hash(source) == before


@pytest.mark.parametrize("fresh", [False, True])
def test_a_folder_that_is_not_a_job_is_not_used_or_emptied(source, tmp_path, fresh):
    o = tmp_path / "home"
    (o / "photos").mkdir(parents=True)
    (o / "taxes.pdf").write_bytes(b"%PDF")
    before = tree_hash(o)
    code, out = run("-i", str(source), "-o", str(o), *(["-nr"] if fresh else []), *ARGS)
    refused(code, out, "-o", "photos/", "taxes.pdf")
    assert tree_hash(o) == before


def test_nr_empties_a_job_folder_of_its_own_files_only(source, converted, tmp_path):
    job = tmp_path / "job"
    shutil.copytree(converted[0], job)
    (job / "notes.txt").write_text("mine")
    before = tree_hash(job)
    code, out = run("-i", str(source), "-o", str(job), "-nr", *ARGS)     # refused: notes.txt is not the job's
    refused(code, out, "-nr", "notes.txt")
    assert tree_hash(job) == before
    (job / "notes.txt").unlink()
    code, out = run("-i", str(source), "-o", str(job), "-nr", *ARGS)
    assert code == 0, out
    assert (job / "job.json").exists()


def test_a_foreign_job_json_is_never_deleted(source, tmp_path):
    o = tmp_path / "other-tool"
    o.mkdir()
    (o / "job.json").write_text('{"their": "state"}')
    code, out = run("-i", str(source), "-o", str(o), "-nr", *ARGS)
    refused(code, out, "job.json", "not a job file of this tool")
    assert (o / "job.json").read_text() == '{"their": "state"}'
