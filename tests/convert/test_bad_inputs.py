"""Bad input, as a user meets it: one line on stderr naming the file, tensor or flag, exit status 2, no
traceback, nothing half-written, and the folders involved unchanged (hashed before and after)."""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from exl2.convert.cli import convert_main
from exl2.runtime.arch import ConfigError
from exl2.runtime.cli import eval_main
from exl2.runtime.loader import ModelParts
from exl2.runtime.tensors import CheckpointError

from .test_output_folders import tree_hash

FAST = ["-b", "4.0", "-r", "2", "-l", "32", "-mr", "2", "-ml", "32", "--no-validate", "--asym", "0"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_builder, tiny_tokenizer) -> Path:
    d = Path(tiny_builder("qwen2", tmp_path_factory.mktemp("src") / "model", num_hidden_layers=1))
    shutil.copy(tiny_tokenizer, d / "tokenizer.json")
    return d


def copy_of(source: Path, tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(source, d)
    return d


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))      # json writes NaN/Infinity as its extension allows


def one_line(r, *needles: str, prefix: str = "error: ") -> str:
    text = r.output
    assert r.exit_code == 2, text
    assert "Traceback" not in text, text
    errors = [ln for ln in text.splitlines() if prefix in ln]
    assert len(errors) == 1, text
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def convert_refused(d: Path, tmp_path: Path, *needles: str, args=FAST) -> None:
    before = tree_hash(d)
    r = CliRunner().invoke(convert_main, ["-i", str(d), "-o", str(tmp_path / "job"), *args])
    one_line(r, *needles)
    assert tree_hash(d) == before
    assert not (tmp_path / "job").exists(), "a refused input must not leave a job folder"


# ---- config.json -------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"hidden_size": [128]}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_key_value_heads": float("inf")}, "num_key_value_heads"),
    ({"intermediate_size": "256"}, "intermediate_size"),
    ({"vocab_size": True}, "vocab_size"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"head_dim": 1 << 30}, "head_dim"),                      # would size allocations of terabytes
    ({"head_dim": 64}, "model.layers.0.self_attn.q_proj.weight"),   # plausible, but not what the tensors hold
    ({"num_hidden_layers": 3}, "model.layers.1"),
    ({"architectures": "Qwen2ForCausalLM", "rope_scaling": [1, 2]}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "per layer type"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id"),
    ({"bos_token_id": 100000}, "bos_token_id"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
]


@pytest.mark.parametrize("change, needle", BAD_CONFIGS, ids=[n for _, n in BAD_CONFIGS])
def test_bad_config_value(source, tmp_path, change, needle):
    d = copy_of(source, tmp_path)
    edit_config(d, **change)
    convert_refused(d, tmp_path, needle)


def test_config_that_is_not_an_object(source, tmp_path):
    d = copy_of(source, tmp_path)
    (d / "config.json").write_text("[1, 2, 3]")
    convert_refused(d, tmp_path, "config.json", "expected a JSON object")
    r = CliRunner().invoke(eval_main, [str(d), "--data", str(d / "config.json")])
    one_line(r, "config.json", "expected a JSON object")


def test_index_whose_weight_map_is_not_an_object(source, tmp_path):
    d = copy_of(source, tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    convert_refused(d, tmp_path, "model.safetensors.index.json", "weight_map")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../../etc/passwd"}}))
    convert_refused(d, tmp_path, "model.safetensors.index.json", "lm_head.weight")


def _fuzz_values(rng: random.Random):
    return rng.choice([None, True, False, 0, -1, 1, 3, 7.5, 1e300, float("inf"), float("-inf"), float("nan"), "",
                       "128", [], [128], {}, {"a": 1}, 2 ** 40, -(2 ** 40), 64, 1e-30])


def test_config_fuzz_gives_config_errors_only(source, tmp_path):
    """Random mutations of a valid config: parsing and the shape check against the checkpoint raise only the two
    error types the CLIs turn into one line (no TypeError, KeyError, ZeroDivisionError, MemoryError ...)."""
    base = json.loads((source / "config.json").read_text())
    d = tmp_path / "fuzz"
    d.mkdir()
    (d / "model.safetensors").symlink_to(source / "model.safetensors")
    keys = sorted(base) + ["head_dim", "rope_scaling", "rope_parameters", "rope_theta", "attention_bias",
                           "mlp_bias", "original_max_position_embeddings"]
    rng = random.Random(0)
    outcomes = {"ok": 0, "ConfigError": 0, "CheckpointError": 0}
    for _ in range(1500):
        cfg = json.loads(json.dumps(base))
        for _ in range(rng.choice([1, 1, 2, 3])):
            key = rng.choice(keys)
            if key in ("rope_scaling", "rope_parameters") and rng.random() < 0.7:
                cfg[key] = {rng.choice(["rope_type", "type", "factor", "rope_theta", "low_freq_factor",
                                        "high_freq_factor", "original_max_position_embeddings"]): _fuzz_values(rng),
                            "rope_type": rng.choice(["llama3", "linear", "default", "yarn", 5, None])}
            else:
                cfg[key] = _fuzz_values(rng)
        (d / "config.json").write_text(json.dumps(cfg))
        try:
            ModelParts(d)            # parses config.json, then checks every tensor's header against it
            outcomes["ok"] += 1
        except ConfigError:
            outcomes["ConfigError"] += 1
        except CheckpointError:
            outcomes["CheckpointError"] += 1
    assert min(outcomes.values()) >= 20, outcomes      # the mutations reach every outcome, not only the parser


# ---- weights -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tensor", ["lm_head.weight", "model.norm.weight", "model.embed_tokens.weight",
                                    "model.layers.0.self_attn.k_proj.bias"])
def test_nan_anywhere_is_named_before_any_work(source, tmp_path, tensor):
    d = copy_of(source, tmp_path)
    t = load_file(str(d / "model.safetensors"))
    t[tensor].view(-1)[3] = float("nan") if "norm" not in tensor else float("inf")
    save_file(t, str(d / "model.safetensors"))
    convert_refused(d, tmp_path, tensor, "NaN or infinite")
    r = CliRunner().invoke(eval_main, [str(d), "--data", str(d / "tokenizer.json"), "--rows", "1", "--length", "8"])
    one_line(r, tensor, "NaN or infinite")


def test_nan_in_a_reused_measurement(source, tmp_path):
    job = tmp_path / "a"
    r = CliRunner().invoke(convert_main, ["-i", str(source), "-o", str(job), "-om", str(tmp_path / "m.json"), *FAST])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "m.json").read_text()
    data = json.loads(text)
    data["measurement"]["model.layers.0.mlp"][2]["accuracy"] = float("nan")
    (tmp_path / "m.json").write_text(json.dumps(data))
    r = CliRunner().invoke(convert_main, ["-i", str(source), "-o", str(tmp_path / "b"), "-m", str(tmp_path / "m.json"),
                                          *FAST])
    one_line(r, "m.json", "model.layers.0.mlp")


# ---- flags -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["-l", "-ml"])
def test_rows_of_one_token_are_refused_up_front(source, tmp_path, flag):
    args = list(FAST)
    args[args.index(flag) + 1] = "1"
    convert_refused(source, tmp_path, flag, "at least 2", args=args)


def test_quantized_cache_on_a_kv_width_it_cannot_hold(tiny_builder, tiny_tokenizer, tmp_path):
    d = Path(tiny_builder("qwen2", tmp_path / "m", num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                          num_key_value_heads=2))                   # kv width 2 x 16 = 32
    shutil.copy(tiny_tokenizer, d / "tokenizer.json")
    r = CliRunner().invoke(eval_main, [str(d), "--data", str(d / "tokenizer.json"), "--cache", "fp16,q4"])
    one_line(r, "--cache q4", "32")


# ---- a full disk -------------------------------------------------------------------------------------------

def _limited(limit: int):
    def start():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return start


@pytest.mark.parametrize("limit, stage_file", [(20_000, "measure.checkpoint.safetensors"),
                                               (62_000, "lm_head.safetensors"),
                                               (200_000, "output.safetensors")])
def test_a_write_that_fails_names_the_file_and_the_job_resumes(source, tmp_path, limit, stage_file):
    """RLIMIT_FSIZE makes every write past ``limit`` bytes fail as a full disk does, at three stages
    (measurement checkpoint, quantized head, compiled shard)."""
    job, out = tmp_path / "job", tmp_path / "out"
    cmd = [sys.executable, "-m", "exl2.convert", "-i", str(source), "-o", str(job), "-cf", str(out), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limited(limit), env=env, timeout=600)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and stage_file in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.exl2-*"))      # no half-written model
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    ref = tmp_path / "ref"
    p = subprocess.run([*cmd[:6], str(ref), "-cf", str(tmp_path / "ref-out"), *FAST], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert (out / "output.safetensors").read_bytes() == (tmp_path / "ref-out" / "output.safetensors").read_bytes()
