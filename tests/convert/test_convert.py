"""exl2-convert end to end on tiny random Qwen2 and Llama checkpoints."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from exl2.convert.accounting import decoder_numel
from exl2.convert.api import ConvertOptions, convert
from exl2.convert.options import auto_asym
from exl2.convert.cli import convert_main
from exl2.measure.measurement import entry_options
from exl2.layers.checkpoint import checkpoint_progress
from exl2.quant_kernels import codec
from exl2.runtime.config import ModelConfig
from exl2.runtime.loader import load_model

SMALL = dict(rows=4, length=64, measurement_rows=4, measurement_length=64, validation_rows=2)


def with_tokenizer(model_dir: Path, tokenizer: Path) -> Path:
    shutil.copy(tokenizer, model_dir / "tokenizer.json")
    return model_dir


@pytest.fixture(scope="module")
def qwen_tied(tmp_path_factory, tiny_builder, tiny_tokenizer):
    d = tiny_builder("qwen2", tmp_path_factory.mktemp("qwen") / "model", tie=True, dtype=torch.bfloat16)
    return with_tokenizer(Path(d), tiny_tokenizer)


@pytest.fixture(scope="module")
def qwen_job(qwen_tied, tmp_path_factory):
    """One measurement, two targets; GPTQ as ExLlamaV2 runs it (--asym 0), so that every layer's distance to its
    source weight is the quantizer's own error (asymmetric calibration aims at another weight on purpose; the
    default is converted in the tests below)."""
    work = tmp_path_factory.mktemp("qwen_work")
    events = []
    result = convert(ConvertOptions(in_dir=str(qwen_tied), work_dir=str(work), bits=[3.0, 5.0], asym=0.0, **SMALL),
                     status=events.append)
    return work, result, events


def test_outputs_load_and_get_better_with_bits(qwen_tied, qwen_job):
    work, result, _ = qwen_job
    t3, t5 = result["targets"]
    assert t3["bpw"] <= 3.0 and t5["bpw"] <= 5.0
    assert t3["bpw"] > 2.8 and t5["bpw"] > 4.8
    v3, v5 = t3["validation"], t5["validation"]
    assert v3["ppl_fp16"] == pytest.approx(v5["ppl_fp16"])
    assert 0 < v5["kld_mean"] < v3["kld_mean"]
    m = load_model(t5["output"])
    assert type(m.layers[0].self_attn.q_proj).__name__ == "EXL2Linear"


def test_output_directory_layout(qwen_tied, qwen_job):
    out = Path(qwen_job[1]["targets"][0]["output"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "exl2_kv.json", "generation_config.json", "kld.png",
                     "measurement.json", "output.safetensors", "tokenizer.json", "validation.json"]
    card = (out / "README.md").read_text()
    v = json.loads((out / "validation.json").read_text())
    assert f"{v['kld_mean']:.5f}" in card and f"{v['ppl_exl2']:.4f}" in card
    assert "| 0 |" in card and "| 1 |" in card           # one allocation row per decoder layer
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "exl2" and q["bits"] == 3.0 and q["head_bits"] == 6
    assert q["calibration"] == {"rows": 4, "length": 64, "dataset": "(default)"}
    src_cfg = json.loads((qwen_tied / "config.json").read_text())
    # the source's fields, plus those ExLlamaV2 reads stated explicitly (test_output_config.py checks them)
    assert {k: v for k, v in cfg.items() if k in src_cfg} == src_cfg
    assert set(cfg) - set(src_cfg) == {"quantization_config", "head_dim", "rope_theta"}
    with safe_open(str(out / "output.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert f.get_tensor("model.norm.weight").dtype == torch.float16
    # Tied embeddings: FP16 embedding plus a quantized head, as ExLlamaV2 writes them.
    assert "lm_head.q_weight" in keys and "lm_head.weight" not in keys
    # Biases exactly where Qwen2 has them.
    assert {k.rsplit(".", 2)[-2] for k in keys if k.endswith(".bias")} == {"q_proj", "k_proj", "v_proj"}
    assert not any(k.endswith(".weight") and ("_proj" in k) for k in keys)


def test_every_layer_valid_and_close_to_source(qwen_tied, qwen_job):
    work, result, _ = qwen_job
    src = load_file(str(qwen_tied / "model.safetensors"))
    for t in result["targets"]:
        out = load_file(str(Path(t["output"]) / "output.safetensors"))
        strategy = json.loads((work / f"bpw-{t['bpw_target']:.2f}" / "strategy.json").read_text())["strategy"]
        prefixes = sorted({k.rsplit(".", 1)[0] for k in out if k.endswith(".q_weight")})
        assert len(prefixes) == 2 * 7 + 1
        for p in prefixes:
            layer = {k.rsplit(".", 1)[1]: v for k, v in out.items() if k.startswith(p + ".")}
            codec.validate_layer(layer, name=p, expect_bias=p.endswith(("q_proj", "k_proj", "v_proj")))
            w_src = (src["model.embed_tokens.weight"] if p == "lm_head" else src[p + ".weight"]).float()
            w = codec.dequantize_layer(layer)[: w_src.shape[0]].float()
            rel = float((w - w_src).norm() / w_src.norm())
            if p == "lm_head":
                bits = 6
            else:
                module = p.rsplit(".", 1)[0]
                qp = entry_options(strategy[module])[p.rsplit(".", 1)[1]]
                bits = min(qp.bits)
            # Symmetric uniform quantization of Gaussian-like weights: the relative RMS error with scales
            # fitted per group is about 1.3 * 2^-bits (measured 0.3-0.4 at 2 bits, 0.02 at 6 bits here);
            # GPTQ trades weight error for output error, so allow twice that.
            assert rel < 2.6 * 2.0 ** -bits + 0.02, (p, bits, rel)


def test_second_target_reuses_measurement(qwen_tied, qwen_job):
    work, _, events = qwen_job
    measured_layers = [e for e in events if e.get("stage") == "measure" and "layer" in e]
    assert len(measured_layers) == 2             # once, for both targets
    again = []
    r = convert(ConvertOptions(in_dir=str(qwen_tied), work_dir=str(work), bits=[3.0, 4.0], asym=0.0, **SMALL),
                status=again.append)
    assert not [e for e in again if e.get("stage") in ("measure", "preflight")]
    assert [e["state"] for e in again if e.get("stage") == "quant:3.00"] == []      # 3.0 was already done
    assert r["targets"][1]["bpw"] <= 4.0


def test_measurement_file_reused_elsewhere(qwen_tied, qwen_job, tmp_path):
    work, _, _ = qwen_job
    r = convert(ConvertOptions(in_dir=str(qwen_tied), work_dir=str(tmp_path / "w"), bits=[4.0],
                               measurement=str(work / "measurement.json"), validate=False, **SMALL))
    assert not (tmp_path / "w" / "measure").exists()
    assert r["targets"][0]["bpw"] <= 4.0


def test_changed_parameter_is_refused(qwen_tied, qwen_job):
    work, _, _ = qwen_job
    with pytest.raises(Exception, match=r"finished work used -ml = 64, this run asks for 128"):
        convert(ConvertOptions(in_dir=str(qwen_tied), work_dir=str(work), bits=[3.0],
                               **{**SMALL, "measurement_length": 128}))


def test_change_after_a_killed_measurement_is_refused(qwen_tied, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_first_layer(event):
        if event.get("stage") == "measure" and event.get("layer") == 0:
            raise Stop

    common = dict(in_dir=str(qwen_tied), work_dir=str(tmp_path / "w"), measure_only=True, **SMALL)
    with pytest.raises(Stop):
        convert(ConvertOptions(**common), status=stop_after_first_layer)
    with pytest.raises(Exception, match=r"finished work used --tables = exl2, this run asks for extended"):
        convert(ConvertOptions(**common, tables="extended"))
    convert(ConvertOptions(**common))                  # the same parameters resume


def test_changed_tables_are_refused_and_old_job_files_mean_exl2(qwen_tied, qwen_job, tmp_path):
    work, _, _ = qwen_job
    with pytest.raises(Exception, match=r"finished work used --tables = exl2, this run asks for extended"):
        convert(ConvertOptions(in_dir=str(qwen_tied), work_dir=str(work), bits=[3.0], tables="extended", **SMALL))
    # a job file written before --tables existed resumes as ExLlamaV2's tables
    old = tmp_path / "old"
    shutil.copytree(work, old)
    job = json.loads((old / "job.json").read_text())
    del job["params"]["tables"]
    (old / "job.json").write_text(json.dumps(job))
    events = []
    convert(ConvertOptions(in_dir=str(qwen_tied), work_dir=str(old), bits=[3.0], asym=0.0, **SMALL),
            status=events.append)
    assert not [e for e in events if e.get("stage") == "measure"]


def test_old_job_files_mean_every_token_measured(qwen_tied, qwen_job, tmp_path, monkeypatch):
    """A job file written before --measure-stride existed measured every token.  The job records the stride the
    measurement really uses: these short rows (4 x 64) are measured at every token whatever is asked, so the old
    job goes on; where the default would sample, resuming is refused with the value that goes on."""
    import exl2.measure.measure as M

    work, _, _ = qwen_job
    old = tmp_path / "old"
    shutil.copytree(work, old)
    job = json.loads((old / "job.json").read_text())
    assert job["params"]["measure_stride"] == 1                 # asked for 4, 256 tokens: every token
    del job["params"]["measure_stride"]
    (old / "job.json").write_text(json.dumps(job))
    common = dict(in_dir=str(qwen_tied), work_dir=str(old), bits=[3.0], asym=0.0, **SMALL)
    events = []
    convert(ConvertOptions(**common), status=events.append)
    assert not [e for e in events if e.get("stage") == "measure"]
    job["params"].pop("measure_stride", None)
    (old / "job.json").write_text(json.dumps(job))
    monkeypatch.setattr(M, "MIN_SAMPLED", 16)                   # now the default samples these rows too
    with pytest.raises(Exception, match=r"finished work used --measure-stride = 1, this run asks for 4; rerun "
                                        r"with --measure-stride 1 to go on, or use -nr"):
        convert(ConvertOptions(**common))
    events = []
    convert(ConvertOptions(**common, measure_stride=1), status=events.append)
    assert not [e for e in events if e.get("stage") == "measure"]


def test_extended_tables_and_a_fixed_norm(qwen_tied, qwen_job, tmp_path):
    """--tables extended measures ExLlamaV2's entries (same values) and the candidates, written in cost order for
    ExLlamaV2's optimizer; --norm fixes p."""
    from exl2.measure import measurement as mj
    from exl2.measure.optimize import optimize
    from exl2.quant_kernels.qparams import TABLES

    work, _, _ = qwen_job
    base = mj.load(work / "measurement.json")["measurement"]
    code, out = run_cli("-i", str(qwen_tied), "-o", str(tmp_path / "w"), "-b", "4.0", "-r", "4", "-l", "64",
                        "-mr", "4", "-ml", "64", "--tables", "extended", "--norm", "2", "--no-validate")
    assert code == 0, out
    data = mj.load(tmp_path / "w" / "measurement.json")
    assert data["exl2"]["tables"] == "extended"
    m = data["measurement"]
    for key, table in (("model.layers.0.self_attn", TABLES["extended"][0]), ("model.layers.1.mlp", TABLES["extended"][1])):
        assert [e["total_bits"] for e in m[key]] == sorted(e["total_bits"] for e in m[key])
        by_option = {tuple(entry_options(e).values()): e for e in m[key]}
        assert len(by_option) == len(m[key]) and set(by_option) == set(map(tuple, table))
        for e in base[key]:
            assert by_option[tuple(entry_options(e).values())]["accuracy"] == pytest.approx(e["accuracy"], rel=1e-6)
    strat = json.loads((tmp_path / "w" / "bpw-4.00" / "strategy.json").read_text())
    assert strat["norm"] == strat["norm_fixed"] == 2.0
    sol = optimize(m, strat["numel"], 4.0, norms=(2.0,))
    assert {k: v["option"] for k, v in strat["strategy"].items()} == sol.choice
    # quantized with norm 2: asking for the sweep now is refused for that target
    with pytest.raises(Exception, match=r"finished work used --norm 2.0, this run asks for \(sweep\)"):
        convert(ConvertOptions(in_dir=str(qwen_tied), work_dir=str(tmp_path / "w"), bits=[4.0], tables="extended",
                               validate=False, **SMALL))


def test_norm_change_before_quantization_solves_again(qwen_tied, qwen_job, tmp_path):
    work, _, _ = qwen_job
    w = tmp_path / "w"
    common = dict(in_dir=str(qwen_tied), work_dir=str(w), bits=[4.0], measurement=str(work / "measurement.json"),
                  validate=False, **SMALL)

    class Stop(Exception):
        pass

    def stop_after_optimize(event):
        if event.get("stage") == "optimize":
            raise Stop

    with pytest.raises(Stop):                       # killed between the allocation and the quantization
        convert(ConvertOptions(**common, norm=1.0), status=stop_after_optimize)
    assert json.loads((w / "bpw-4.00" / "strategy.json").read_text())["norm_fixed"] == 1.0
    r = convert(ConvertOptions(**common, norm=3.0))
    strat = json.loads((w / "bpw-4.00" / "strategy.json").read_text())
    assert strat["norm_fixed"] == strat["norm"] == 3.0 and r["targets"][0]["bpw"] <= 4.0


def test_asymmetric_calibration_is_recorded_and_a_change_after_quantizing_is_refused(qwen_tied, qwen_job, tmp_path):
    """--asym reaches the quantization pass (other bytes than GPTQ's), is recorded in quantization_config and the
    model card; by default (auto) it is 0.25 with few quantization tokens; asking for another alpha once a target
    is quantized is refused, naming the flag; a job file written before --asym existed resumes as alpha 0, and
    the new default is refused there."""
    work, _, _ = qwen_job
    common = ("-i", str(qwen_tied), "-b", "4.0", "-r", "4", "-l", "64", "-m", str(work / "measurement.json"),
              "--no-validate")
    code, out = run_cli(*common, "-o", str(tmp_path / "w"))                     # auto: 4 x 64 tokens -> 0.25
    assert code == 0, out
    model = tmp_path / "w" / "bpw-4.00" / "model"
    q = json.loads((model / "config.json").read_text())["quantization_config"]
    assert q["exl2"]["asym"] == 0.25
    assert "asymmetric calibration, alpha 0.25" in (model / "README.md").read_text()
    code, out = run_cli(*common, "-o", str(tmp_path / "w0"), "--asym", "0")
    assert code == 0, out
    shard = "output.safetensors"
    assert (model / shard).read_bytes() != (tmp_path / "w0" / "bpw-4.00" / "model" / shard).read_bytes()
    assert "ExLlamaV2's GPTQ" in (tmp_path / "w0" / "bpw-4.00" / "model" / "README.md").read_text()
    with pytest.raises(Exception, match=r"finished work used --asym = 0.25, this run asks for 0.0"):
        convert(ConvertOptions(in_dir=str(qwen_tied), work_dir=str(tmp_path / "w"), bits=[4.0], validate=False,
                               measurement=str(work / "measurement.json"), **{**SMALL, "asym": 0.0}))
    job = json.loads((tmp_path / "w0" / "job.json").read_text())
    del job["params"]["asym"]
    (tmp_path / "w0" / "job.json").write_text(json.dumps(job))
    old_job = dict(in_dir=str(qwen_tied), work_dir=str(tmp_path / "w0"), bits=[4.0], validate=False,
                   measurement=str(work / "measurement.json"), **SMALL)
    with pytest.raises(Exception, match=r"finished work used --asym = 0.0, this run asks for 0.25; rerun with "
                                        r"--asym 0 to go on, or use -nr"):
        convert(ConvertOptions(**old_job))
    convert(ConvertOptions(**{**old_job, "asym": 0.0}))


def test_auto_asym_follows_the_quantization_tokens():
    assert auto_asym(100, 2048) == auto_asym(100, 512) == 1.0         # the default 204,800 tokens; 51,200
    assert auto_asym(16, 512) == auto_asym(48, 1024) == 0.25           # the demo preset's 8,192; 49,152
    code, out = run_cli("-i", "x", "-o", "y", "--asym", "2")
    assert code == 2 and "--asym': '2': must be \"auto\" or a number between 0 (off) and 1" in out
    code, out = run_cli("-i", "x", "-o", "y", "--asym", "full")
    assert code == 2 and "'full' is neither 'auto' nor a number" in out


@pytest.mark.parametrize("opts, message", [({"tables": "big"}, "--tables big: must be one of exl2, extended"),
                                           ({"norm": 0.5}, "--norm 0.5: must be between 1 and 4"),
                                           ({"asym": 1.5}, r"--asym 1.5: must be \"auto\" or a number between 0 \(off\) and 1")])
def test_bad_tables_or_norm(qwen_tied, tmp_path, opts, message):
    with pytest.raises(Exception, match=message):
        convert(ConvertOptions(in_dir=str(qwen_tied), work_dir=str(tmp_path / "w"), **opts, **SMALL))


def test_llama_untied_and_shards(tiny_builder, tiny_tokenizer, tmp_path):
    d = with_tokenizer(Path(tiny_builder("llama3", tmp_path / "llama")), tiny_tokenizer)
    r = convert(ConvertOptions(in_dir=str(d), work_dir=str(tmp_path / "w"), bits=[4.0], shard_mib=0,
                               compile_dir=str(tmp_path / "out"), **SMALL))
    out = tmp_path / "out"
    assert (out / "output.safetensors").exists()
    # Measured 0.071 on this random model at 4.0 bpw; the bound leaves a 2x margin for other seeds.
    assert 0 < r["targets"][0]["validation"]["kld_mean"] < 0.15
    # Re-compile with a tiny shard limit: several files, named as ExLlamaV2 names them, same tensors.
    from exl2.convert.writer import compile_model

    compile_model(d, tmp_path / "w" / "bpw-4.00" / "out_tensor", tmp_path / "sharded", shard_mib=0.1,
                  quantization_config={"quant_method": "exl2"})
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1
    assert shards[0] == f"output-00001-of-{len(shards):05d}.safetensors"
    merged = {}
    for s in shards:
        merged.update(load_file(str(tmp_path / "sharded" / s)))
    single = load_file(str(out / "output.safetensors"))
    assert merged.keys() == single.keys()
    assert all(torch.equal(merged[k], single[k]) for k in single)
    assert not list(tmp_path.glob("sharded.partial"))


def test_decoder_numel_counts_padded_columns():
    cfg = ModelConfig.from_dict({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 100, "hidden_size": 64,
                                 "intermediate_size": 200, "num_hidden_layers": 2, "num_attention_heads": 2,
                                 "num_key_value_heads": 1, "rms_norm_eps": 1e-6})
    # q 64x64, k/v 64x32, o 64x64, gate/up 64x224 (200 padded), down 200x64.
    assert decoder_numel(cfg) == 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 224 + 200 * 64)


# ------------------------------------------------------------------------------------------------
# Resume after kill -9: byte-identical shards
# ------------------------------------------------------------------------------------------------

def test_kill_during_quantization_then_resume_is_byte_identical(tiny_builder, tiny_tokenizer, tmp_path):
    d = with_tokenizer(Path(tiny_builder("qwen2", tmp_path / "m", num_hidden_layers=4)), tiny_tokenizer)
    args = ["-i", str(d), "-b", "4.0", "-mr", "4", "-ml", "64", "-r", "4", "-l", "64", "--no-validate",
            "--status-json"]
    # Reference: uninterrupted.
    ref = CliRunner().invoke(convert_main, args + ["-o", str(tmp_path / "ref")])
    assert ref.exit_code == 0, ref.output
    # Killed run: stop it hard as soon as the quantization pass has finished one layer.
    work = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "exl2.convert", *args, "-o", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        e = json.loads(line)
        if e.get("stage") == "quant" and e.get("layer") == 1:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    progress = checkpoint_progress(work / "bpw-4.00", "quant")
    assert 1 <= progress["next_layer"] < 4
    resumed = CliRunner().invoke(convert_main, args + ["-o", str(work)])
    assert resumed.exit_code == 0, resumed.output
    a = (tmp_path / "ref" / "bpw-4.00" / "model" / "output.safetensors").read_bytes()
    b = (work / "bpw-4.00" / "model" / "output.safetensors").read_bytes()
    assert a == b


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing half-written
# ------------------------------------------------------------------------------------------------

def run_cli(*args):
    r = CliRunner().invoke(convert_main, list(args))
    return r.exit_code, r.output


def test_missing_config(tmp_path):
    code, out = run_cli("-i", str(tmp_path), "-o", str(tmp_path / "w"))
    assert code == 2 and "config.json: not found" in out and "Traceback" not in out


def test_missing_tokenizer(tiny_builder, tmp_path):
    d = tiny_builder("qwen2", tmp_path / "m")
    code, out = run_cli("-i", str(d), "-o", str(tmp_path / "w"))
    assert code == 2 and "tokenizer.json: not found" in out


def test_unsupported_architecture(qwen_tied, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(qwen_tied, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    code, out = run_cli("-i", str(d), "-o", str(tmp_path / "w"))
    assert code == 2 and "GPT2LMHeadModel" in out and "Qwen2ForCausalLM" in out


def test_corrupt_safetensors(qwen_tied, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(qwen_tied, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, out = run_cli("-i", str(d), "-o", str(tmp_path / "w"), *sum([[f"-{k}", "4"] for k in ("mr", "r")], []))
    assert code == 2 and "model.safetensors" in out and "Traceback" not in out


def test_nan_in_weights(qwen_tied, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(qwen_tied, d)
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(t, str(d / "model.safetensors"))
    code, out = run_cli("-i", str(d), "-o", str(tmp_path / "w"), "-mr", "4", "-ml", "64", "-r", "4", "-l", "64")
    assert code == 2 and "NaN" in out and "Traceback" not in out


@pytest.mark.parametrize("bits, message", [("1.0", "outside any model's feasible range"),
                                           ("2.05", "outside what the option tables reach")])
def test_bpw_out_of_range(qwen_tied, qwen_job, bits, message):
    work, _, _ = qwen_job
    code, out = run_cli("-i", str(qwen_tied), "-o", str(work), "-b", bits, "-mr", "4", "-ml", "64", "-r", "4",
                        "-l", "64", "--asym", "0")
    assert code == 2 and message in out


def test_unwritable_output(qwen_tied, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out = run_cli("-i", str(qwen_tied), "-o", str(blocker / "w"))
    assert code == 2 and "file" in out and "Traceback" not in out


def test_help_shows_defaults():
    code, out = run_cli("--help")
    assert code == 0
    for flag in ("-cf", "-hb", "-om", "-mr", "-ml", "-ss", "-nr", "--status-json", "--device"):
        assert flag in out
    assert "[default: 4.125]" in out and "[default: 8192]" in out


# ------------------------------------------------------------------------------------------------
# exl2-inspect
# ------------------------------------------------------------------------------------------------

def test_inspect_reports_and_checks(qwen_job, tmp_path):
    from exl2.convert.cli import inspect_main

    t = qwen_job[1]["targets"][0]
    out = Path(t["output"])
    r = CliRunner().invoke(inspect_main, [str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["files"] == ["output.safetensors"] and not rep["errors"]
    assert len(rep["layers"]) == 15
    # Stored bits include the padding-free columns and group overhead, as the optimizer counts them.
    assert rep["decoder_bpw"] == pytest.approx(t["bpw"], rel=1e-9)
    text = CliRunner().invoke(inspect_main, [str(out)]).output
    assert "all layers valid" in text
    # Break one layer: the report names it and the exit status is 1.
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    tensors = load_file(str(bad / "output.safetensors"))
    tensors["model.layers.1.mlp.up_proj.q_groups"] = tensors["model.layers.1.mlp.up_proj.q_groups"].to(torch.int32)
    save_file(tensors, str(bad / "output.safetensors"))
    r = CliRunner().invoke(inspect_main, [str(bad)])
    assert r.exit_code == 1
    assert "model.layers.1.mlp.up_proj.q_groups: dtype must be torch.int16" in r.output


def test_measure_only_writes_measurement_file(qwen_tied, tmp_path):
    """-om: measure only; the file is ExLlamaV2's schema plus provenance, and -m reuses it."""
    from exl2.measure import measurement as mj

    dest = tmp_path / "meas.json"
    code, out = run_cli("-i", str(qwen_tied), "-o", str(tmp_path / "w"), "-om", str(dest), "-mr", "4", "-ml", "64")
    assert code == 0, out
    data = mj.load(dest)
    assert len(data["measurement"]["model.layers.0.self_attn"]) == 19
    assert len(data["measurement"]["model.layers.1.mlp"]) == 17
    assert data["exl2"]["rows"] == 4 and data["exl2"]["length"] == 64
    assert data["exl2"]["measure_stride"] == 1                   # 256 tokens: too few to sample
    assert not (tmp_path / "w" / "bpw-4.12").exists()            # nothing quantized
    code, out = run_cli("-i", str(qwen_tied), "-o", str(tmp_path / "w2"), "-m", str(dest), "-b", "4.0",
                        "-r", "4", "-l", "64", "--no-validate")
    assert code == 0, out


def test_checkpoint_hash_reused_only_while_files_unchanged(tmp_path):
    from exl2.convert.jobstate import checkpoint_sha256, checkpoint_stat

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    h = checkpoint_sha256(tmp_path)
    known = {"stat": checkpoint_stat(tmp_path), "sha256": "stored"}
    assert checkpoint_sha256(tmp_path, known) == "stored"          # same names, sizes and times: not re-read
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert checkpoint_sha256(tmp_path, known) not in ("stored", h)  # content changed: hashed again


def test_validation_checks_every_cache_mode_and_the_card_shows_it(qwen_job):
    from exl2.convert.validate import CACHE_MODES, EXLLAMAV2_CACHE_MODES, KLD_QUANTILES, recommend_cache

    work, result, _ = qwen_job
    for t in result["targets"]:
        v = t["validation"]
        assert list(v["cache"]) == list(CACHE_MODES) == [*EXLLAMAV2_CACHE_MODES, "q4x", "q3x"]
        sizes = [v["cache"][m]["bytes_per_token"] for m in EXLLAMAV2_CACHE_MODES]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
        q4, q4x, q3x = (v["cache"][m]["bytes_per_token"] for m in ("q4", "q4x", "q3x"))
        assert q3x < q4 <= q4x <= q4 * 1.05
        for m in CACHE_MODES:
            assert "error" not in v["cache"][m] and v["cache"][m]["kld_mean"] >= 0
        q = v["kld_quantiles"]
        assert len(q) == KLD_QUANTILES + 1 and q == sorted(q) and q[0] >= 0
        assert q[0] <= v["kld_median"] <= v["kld_p99"] <= q[-1]
        assert v["recommended_cache"] == recommend_cache(v["cache"])
        assert v["recommended_cache_exllamav2"] == recommend_cache(v["cache"], EXLLAMAV2_CACHE_MODES)
        out = Path(t["output"])
        card = (out / "README.md").read_text()
        assert "## KV cache" in card and f"{v['recommended_cache'].upper()} (recommended)" in card
        assert "| Q4X" in card and "| Q3X" in card and "exl2_kv.json" in card
        assert f"`--cache {v['recommended_cache']}`" in card                       # how to run it with exl2
        assert f"cache_mode: {v['recommended_cache_exllamav2'].upper()}" in card    # TabbyAPI: ExLlamaV2's modes
        if v["recommended_cache"] != v["recommended_cache_exllamav2"]:
            assert f"{v['recommended_cache_exllamav2'].upper()} (recommended for ExLlamaV2)" in card
        assert "![KL divergence](kld.png)" in card
        assert (out / "kld.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recommend_cache_takes_the_smallest_mode_within_the_allowance():
    from exl2.convert.validate import recommend_cache

    def table(fp16, q8, q6, q4):
        return {m: {"kld_mean": kl, "bytes_per_token": b}
                for m, kl, b in (("fp16", fp16, 400), ("q8", q8, 216), ("q6", q6, 168), ("q4", q4, 120))}

    # weights cost 0.2 nats: up to 0.02 more is allowed, q6 adds 0.01, q4 adds 0.1
    assert recommend_cache(table(0.2, 0.201, 0.21, 0.3)) == "q6"
    # a nearly lossless model: the 0.005 floor decides
    assert recommend_cache(table(0.001, 0.0012, 0.004, 0.05)) == "q6"
    assert recommend_cache(table(0.001, 0.0012, 0.0065, 0.05)) == "q8"
    assert recommend_cache(table(0.001, 0.5, 0.5, 0.5)) == "fp16"
    broken = table(0.2, 0.201, 0.21, 0.21)
    broken["q4"] = {"error": "too large for fp16", "bytes_per_token": 120}
    assert recommend_cache(broken) == "q6"


def test_kv_profile_written_from_the_conversion_rows_and_rewritten_on_resume(qwen_tied, qwen_job):
    """exl2_kv.json comes from the conversion's own rows; a job resumed after its compile step (the file lost)
    writes it again without compiling again."""
    from exl2.runtime.kv_profile import PROFILE_FILE, KVProfile

    work, result, _ = qwen_job
    out = Path(result["targets"][0]["output"])
    prof = KVProfile.load(out, ModelConfig.from_dict(json.loads((out / "config.json").read_text())))
    assert prof.source["derived_from"] == "calibration rows of the conversion" and prof.sensitivity is not None
    assert prof.source["stat_rows"] == 4 and prof.source["stat_length"] == 64
    shards = (out / "output.safetensors").stat().st_mtime_ns
    (out / PROFILE_FILE).unlink()
    again = convert(ConvertOptions(in_dir=str(qwen_tied), work_dir=str(work), bits=[3.0, 5.0], asym=0.0, **SMALL))
    assert [t["output"] for t in again["targets"]] == [t["output"] for t in result["targets"]]
    assert (out / PROFILE_FILE).is_file() and (out / "output.safetensors").stat().st_mtime_ns == shards


def test_card_says_when_exl2_cache_modes_were_not_checked():
    from exl2.convert.card import cache_lines

    rec = {"rows": 1, "length": 8, "ppl": 2.0, "kld_mean": 0.001, "top1": 1.0}
    v = {"cache": {"fp16": {**rec, "bytes_per_token": 10}, "q4": {**rec, "bytes_per_token": 5}},
         "recommended_cache": "q4", "recommended_cache_exllamav2": "q4", "cache_x_skipped": "no exl2_kv.json in /m"}
    text = "\n".join(cache_lines(v))
    assert "Q4 (recommended)" in text and "(Q4X, Q3X) were not checked: no exl2_kv.json in /m." in text
    v["cache"]["q4x"] = {**rec, "bytes_per_token": 6}
    v["recommended_cache"] = "q4x"
    del v["cache_x_skipped"]
    text = "\n".join(cache_lines(v))
    assert "Q4X (recommended)" in text and "Q4 (recommended for ExLlamaV2)" in text and "not checked" not in text
