"""exl2-eval / exl2-generate: parsing, validation (one-line errors, exit 2), JSON schema, streaming."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from exl2.runtime import cli, generate_cli
from exl2.runtime.evaluate import load_data_rows, perplexity
from exl2.runtime.generate import TextTokenizer, generate
from exl2.runtime.loader import load_model

TEXT = ("It was a truth universally acknowledged that a single man in possession of a good fortune must be "
        "in want of a wife.\n\nSir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his "
        "own amusement, never took up any book but the Baronetage.\n") * 8


def write_tokenizer(d) -> None:
    """A 512-token byte-level BPE (fits the tiny models' vocabulary) with <|endoftext|> as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_builder, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = tiny_builder("qwen2", d / "model", seed=3)
    write_tokenizer(model)
    data = d / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    return model, data


def _run(main, args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def _one_line_error(code, out, err, *needles):
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_eval_json_schema_and_table(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "r.json"
    code, stdout, err = _run(cli.eval_main, [model, "--data", data, "--rows", 2, "--length", 16,
                                             "--cache", "fp16,q8,q4", "--json", out, "-q"])
    assert code == 0, err
    recs = json.loads(out.read_text())
    assert [(r["cache"], r["mode"]) for r in recs] == [("fp16", "cache"), ("q8", "cache"), ("q4", "cache")]
    for r in recs:
        assert {"cache", "mode", "rows", "length", "ppl"} <= set(r)
        assert r["rows"] == 2 and r["length"] == 16 and r["ppl"] > 1
        assert "kld_mean" not in r and "pass@1" not in r
    lines = stdout.strip().splitlines()
    assert lines[0].split("|")[1].strip() == "cache" and "bytes/token" in lines[0] and "KLD mean" in lines[0]
    assert len(lines) == 2 + 3 and lines[2].startswith("| fp16") and lines[4].startswith("| q4")
    # q4 stores 4+4 bits + 2 fp16 scales per 32 values: (32+32+4+4) bytes per layer for kv_dim 64
    assert recs[2]["bytes_per_token"] == 2 * 72 and recs[0]["bytes_per_token"] == 2 * 256


def test_eval_full_mode_equals_library_and_kld_ref(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "r.json"
    code, _, err = _run(cli.eval_main, [model, "--data", data, "--rows", 2, "--length", 16, "--mode", "both",
                                        "--kld-ref", model, "--json", out, "-q"])
    assert code == 0, err
    recs = json.loads(out.read_text())
    assert [(r["cache"], r["mode"]) for r in recs] == [("none", "full"), ("fp16", "cache")]
    assert recs[0]["bytes_per_token"] is None and recs[1]["bytes_per_token"] == 2 * 256
    rows = load_data_rows(model, data, 2, 16)
    assert recs[0]["ppl"] == pytest.approx(perplexity(load_model(model), rows).ppl, rel=1e-12)
    assert recs[0]["kld_mean"] == pytest.approx(0, abs=1e-7) and recs[0]["top1"] == 1.0
    assert recs[1]["kld_mean"] < 1e-3 and {"kld_median", "kld_p99"} <= set(recs[1])


def test_eval_humaneval_plumbing(tiny, tmp_path):
    """Tiny random model: every sample fails; checks sampling, sandbox runs and the record keys."""
    model, _ = tiny
    out = tmp_path / "h.json"
    code, stdout, err = _run(cli.eval_main, [model, "--humaneval", "--problems", 1, "--samples", 2,
                                             "--max-tokens", 4, "--json", out, "-q"])
    assert code == 0, err
    (rec,) = json.loads(out.read_text())
    assert rec["pass@1"] == 0.0 and rec["pass@10"] is None and rec["ppl"] is None and rec["mode"] is None
    assert rec["cache"] == "fp16" and "| fp16  | -    |" in stdout
    assert rec["problems"] == 1 and rec["samples"] == 2


@pytest.mark.parametrize("make_args, needles", [
    (lambda m, d, t: [t / "nope", "--data", d], ["nope", "not a directory"]),
    (lambda m, d, t: [t, "--data", d], ["no config.json"]),
    (lambda m, d, t: [m, "--data", t / "missing.txt"], ["--data", "missing.txt", "no such file"]),
    (lambda m, d, t: [m, "--data", d, "--cache", "fp16,q5"], ["--cache", "q5"]),
    (lambda m, d, t: [m], ["--data", "--humaneval"]),
    (lambda m, d, t: [m, "--data", d, "--rows", 0], ["--rows"]),
    (lambda m, d, t: [m, "--data", d, "--mode", "sliding"], ["--mode"]),
    (lambda m, d, t: [m, "--data", d, "--kld-ref", t / "ref"], ["--kld-ref", "ref"]),
    (lambda m, d, t: [m, "--data", d, "--json", t / "no" / "r.json"], ["--json", "does not exist"]),
    (lambda m, d, t: [m, "--data", d, "--rows", 100, "--length", 512], ["--data", "text.txt", "tokens"]),
])
def test_eval_errors_are_one_line_exit_2(tiny, tmp_path, make_args, needles):
    model, data = tiny
    _one_line_error(*_run(cli.eval_main, make_args(model, data, tmp_path)), *needles)


def test_eval_no_tokenizer(tiny, tmp_path):
    model, data = tiny
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    (bare / "tokenizer.json").unlink()
    _one_line_error(*_run(cli.eval_main, [bare, "--data", data]), "tokenizer.json")


def test_eval_cuda_without_device(tiny, monkeypatch):
    model, data = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # no device, also on a machine with one
    _one_line_error(*_run(cli.eval_main, [model, "--data", data, "--device", "cuda"]), "--device cuda")


def test_help_shows_true_defaults():
    code, out, _ = _run(cli.eval_main, ["--help"])
    assert code == 0
    flat = " ".join(out.split())
    for s in ("Usage: exl2-eval", "[default: 5;", "[default: 1024;", "[default: fp16]", "[default: auto]",
              "[default: 200;", "[default: 768;", "[default: cpu]", "[default: all 164]"):
        assert s in flat, s
    code, out, _ = _run(generate_cli.generate_main, ["--help"])
    flat = " ".join(out.split())
    assert code == 0 and "[default: 256;" in flat and "[default: 0.0;" in flat


def test_generate_streams_the_runtime_generation(tiny):
    model, _ = tiny
    code, out, err = _run(generate_cli.generate_main, [model, "-p", "Sir Walter", "--max-tokens", 6, "--cache", "q8"])
    assert code == 0, err
    tok = TextTokenizer(model)
    m = load_model(model)
    ids = generate(m, tok.encode("Sir Walter", add_special_tokens=True), max_new_tokens=6, cache_mode="q8",
                   stop_ids=[tok.eos_token_id])
    assert out == tok.decode(ids) + "\n"


def test_generate_errors(tiny, tmp_path):
    model, _ = tiny
    _one_line_error(*_run(generate_cli.generate_main, [model, "-p", "x", "--cache", "q2"]), "--cache", "q2")
    _one_line_error(*_run(generate_cli.generate_main, [tmp_path, "-p", "x"]), "no config.json")
    _one_line_error(*_run(generate_cli.generate_main, [model, "-p", "x", "--chat"]), "--chat", "chat template")
    _one_line_error(*_run(generate_cli.generate_main, [model, "-p", "x", "--temperature", -1]), "--temperature")


def test_console_script_exits_2_without_traceback(tmp_path):
    """The installed entry point, in a real process."""
    exe = shutil.which("exl2-eval")
    cmd = [exe] if exe else [sys.executable, "-c", "from exl2.runtime.cli import eval_main; eval_main()"]
    p = subprocess.run(cmd + [str(tmp_path / "missing"), "--data", "x.txt"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "missing" in p.stderr


def test_eval_default_mode_is_full_and_auto_picks_cache(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "r.json"
    code, stdout, err = _run(cli.eval_main, [model, "--data", data, "--rows", 2, "--length", 16, "--json", out, "-q"])
    assert code == 0, err
    (rec,) = json.loads(out.read_text())
    assert rec["cache"] == "none" and rec["mode"] == "full" and rec["bytes_per_token"] is None
    assert stdout.splitlines()[2].startswith("| none  | full ")
    code, _, err = _run(cli.eval_main, [model, "--data", data, "--rows", 2, "--length", 16, "--cache", "q6",
                                        "--chunk", 4, "--json", out, "-q"])
    assert code == 0, err
    (rec,) = json.loads(out.read_text())
    assert rec["cache"] == "q6" and rec["mode"] == "cache"


def test_eval_one_pass_scores_the_token_by_token_pass(tiny, tmp_path):
    """--one-pass: chunk-1 cache mode computed in one pass per row gives the token-by-token numbers (up to
    rounding); it refuses other chunks and full mode in one line."""
    model, data = tiny
    recs = {}
    for extra in ([], ["--one-pass"]):
        out = tmp_path / f"r{len(extra)}.json"
        code, _, err = _run(cli.eval_main, [model, "--data", data, "--rows", 2, "--length", 24, "--cache", "q4,q8",
                                            "--kld-ref", model, "--json", out, "-q", *extra])
        assert code == 0, err
        recs[len(extra)] = json.loads(out.read_text())
    for tbt, one in zip(recs[0], recs[1]):
        assert tbt["cache"] == one["cache"] and one["mode"] == "cache" and one["kld_mean"] > 0
        assert one["ppl"] == pytest.approx(tbt["ppl"], rel=1e-4)
        assert one["kld_mean"] == pytest.approx(tbt["kld_mean"], rel=1e-2, abs=1e-6)
    for bad in (["--cache", "q4", "--chunk", "4"], ["--mode", "full"]):
        code, _, err = _run(cli.eval_main, [model, "--data", data, "--rows", 1, "--length", 16, "--one-pass", "-q",
                                            *bad])
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--one-pass" in err


def test_humaneval_sampling_is_seeded_and_batched(tiny):
    from exl2.runtime.humaneval import HumanEvalParams, sample_completions

    model, _ = tiny
    m, tok = load_model(model), TextTokenizer(model)
    p = HumanEvalParams(max_new_tokens=12, batch_size=3, cache_mode="q4", temperature=1.0, top_p=1.0, top_k=0)
    a = sample_completions(m, tok, "def f(x):\n", 5, p, seed=7)
    b = sample_completions(m, tok, "def f(x):\n", 5, p, seed=7)
    c = sample_completions(m, tok, "def f(x):\n", 5, p, seed=8)
    assert len(a) == 5 and a == b and a != c
    assert all("\n" + ch not in s for s in a for ch in "abcdefghijklmnopqrstuvwxyz")  # truncated at column-0 lines
