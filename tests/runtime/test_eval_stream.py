"""Models larger than memory: streamed (one decoder layer resident) full-mode passes give the resident model's
numbers, exl2-eval chooses between the two by free memory, and the converter's validation streams the source.

Streamed and resident agree bit for bit on the CPU: per row they run the same operations on the same shapes,
and a row state parked on the CPU in its own dtype comes back unchanged (runtime/stream.py).
"""
from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from exl2.runtime import cli
from exl2.runtime import stream as S
from exl2.runtime.evaluate import EvalConfig, evaluate_rows
from exl2.runtime.loader import ModelParts, load_model

from .test_cli import TEXT, write_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tiny_builder, tmp_path_factory):
    """A tiny Qwen2 (tied head) as the model and another (own head, bf16 on disk) as its reference, both with a
    tokenizer, and a text file."""
    d = tmp_path_factory.mktemp("stream")
    model = Path(tiny_builder("qwen2", d / "model", tie=True, seed=4))
    ref = Path(tiny_builder("qwen2", d / "ref", seed=5, dtype=torch.bfloat16))
    for m in (model, ref):
        write_tokenizer(m)
    data = d / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    return model, ref, data


@pytest.fixture(scope="module")
def exl2_pair(tiny_builder, tiny_tokenizer, tmp_path_factory):
    """A tiny Qwen2 source and its 4.0 bpw EXL2 conversion (no validation), made by the converter."""
    import shutil

    from exl2.convert.api import ConvertOptions, convert

    d = tmp_path_factory.mktemp("stream_exl2")
    src = Path(tiny_builder("qwen2", d / "src", tie=True, dtype=torch.bfloat16))
    shutil.copy(tiny_tokenizer, src / "tokenizer.json")
    r = convert(ConvertOptions(in_dir=str(src), work_dir=str(d / "work"), bits=[4.0], rows=4, length=64,
                               measurement_rows=4, measurement_length=64, validate=False))
    return src, Path(r["targets"][0]["output"])


def _rows(n, length, seed=0):
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def _same(a, b):
    """EvalResults equal in every accumulated number."""
    assert a.tokens == b.tokens and a.nll_sum == b.nll_sum and a.kld == b.kld
    assert a.top1_hits == b.top1_hits and a.ref_nll_sum == b.ref_nll_sum


# ---------------------------------------------------------------------------------------------- streamed forward


@pytest.mark.parametrize("kind, kw", [("qwen2", dict(tie=True)), ("llama3", dict(dtype=torch.bfloat16))])
def test_streamed_logits_are_the_resident_models_bit_for_bit(tiny_checkpoint, kind, kw):
    d = tiny_checkpoint(kind, **kw)
    m = load_model(d)
    rows, short = _rows(3, 40), _rows(2, 17, seed=1)
    a, b = S.stream_forward(ModelParts(d), [rows, short])       # two sets of different lengths, one pass
    assert a.head is b.head
    with torch.no_grad():
        for st, rs in ((a, rows), (b, short)):
            for r in range(rs.shape[0]):
                assert torch.equal(st.logits(r), m(rs[r:r + 1])[0])


def test_streamed_exl2_model_is_the_resident_one_bit_for_bit(exl2_pair):
    _, q = exl2_pair
    m = load_model(q)
    assert type(m.layers[0].mlp.up_proj).__name__ == "EXL2Linear"
    rows = _rows(2, 33)
    (st,) = S.stream_forward(ModelParts(q), [rows])
    with torch.no_grad():
        for r in range(2):
            assert torch.equal(st.logits(r), m(rows[r:r + 1])[0])


def test_evaluate_rows_with_streamed_reference_or_model_equals_resident(pair):
    model, ref, _ = pair
    m, rm = load_model(model), load_model(ref)
    rows = _rows(3, 24)
    (ms,) = S.stream_forward(ModelParts(model), [rows])
    (rs,) = S.stream_forward(ModelParts(ref), [rows])
    configs = [EvalConfig("full"), EvalConfig("cache", "q8", 4)]
    resident = evaluate_rows(m, rows, configs, ref_model=rm)
    for a, b in zip(resident, evaluate_rows(m, rows, configs, ref_model=rs)):
        _same(a, b)
    for model_, ref_ in ((ms, rm), (ms, rs)):
        (full,) = evaluate_rows(model_, rows, [EvalConfig("full")], ref_model=ref_)
        _same(full, resident[0])
    assert resident[0].kld_mean > 0.01            # two different models: the comparison is not vacuous
    # the streamed reference can be scored again; reference log-probs collected from it are the resident ones
    lps_s, lps_r = [], []
    evaluate_rows(ms, rows, [EvalConfig("full")], ref_model=rs, ref_lps=lps_s)
    evaluate_rows(m, rows, [EvalConfig("full")], ref_model=rm, ref_lps=lps_r)
    assert all(torch.equal(x, y) for x, y in zip(lps_s, lps_r))


def test_streamed_model_refuses_cache_mode_and_other_rows(pair):
    model, _, _ = pair
    rows = _rows(2, 16)
    (st,) = S.stream_forward(ModelParts(model), [rows])
    with pytest.raises(ValueError, match="cache mode needs the model resident"):
        evaluate_rows(st, rows, [EvalConfig("cache", "q8")])
    with pytest.raises(ValueError, match="not the rows"):
        evaluate_rows(st, _rows(2, 16, seed=9), [EvalConfig("full")])
    with pytest.raises(ValueError, match="not the rows"):
        evaluate_rows(load_model(model), rows[:1], [EvalConfig("full")], ref_model=st)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        S.stream_forward(ModelParts(model), [torch.full((1, 4), 512)])


def test_streamed_pass_holds_one_decoder_layer_at_a_time(pair, monkeypatch):
    """Memory grows with one layer, not with depth: when a layer is built, no earlier one is alive."""
    model, _, _ = pair
    real = ModelParts.block
    alive: list[weakref.ref] = []
    most = [0]

    def tracked(self, i):
        gc.collect()
        most[0] = max(most[0], sum(r() is not None for r in alive))    # alive while the next one is built
        b = real(self, i)
        alive.append(weakref.ref(b))
        return b

    monkeypatch.setattr(ModelParts, "block", tracked)
    parts = ModelParts(model)
    S.stream_forward(parts, [_rows(2, 16)])
    gc.collect()
    assert len(alive) == parts.cfg.num_layers == 2
    assert most[0] == 0 and all(r() is None for r in alive)


# ---------------------------------------------------------------------------------------------- sizing and plan


def test_resident_estimate_matches_a_loaded_model(pair, exl2_pair):
    """The estimate from the headers (and, for EXL2, one probed layer) against the loaded model's tensors."""
    for d in (*pair[:2], exl2_pair[1]):
        est, got = S.resident_bytes(ModelParts(d)), S.module_bytes(load_model(d))
        assert abs(est - got) <= 0.05 * got, (d, est, got)


def test_resident_estimate_follows_how_exl2_layers_are_kept(exl2_pair):
    """An EXL2 layer that keeps its packed tensors is counted at about its stored size, one that keeps a rebuilt
    weight at the weight's size: the estimate asks a loaded layer which it is."""
    _, q = exl2_pair
    for mode in ("packed", "dense"):
        est, got = S.resident_bytes(ModelParts(q, exl2=mode)), S.module_bytes(load_model(q, exl2=mode))
        assert abs(est - got) <= 0.05 * got, (mode, est, got)
    assert S.resident_bytes(ModelParts(q)) < 0.8 * S.resident_bytes(ModelParts(q, exl2="dense"))


def test_plan_decides_by_free_memory(pair):
    model, ref, _ = pair
    mp, rp = ModelParts(model), ModelParts(ref)
    m, r, h, w = S.resident_bytes(mp), S.resident_bytes(rp), S.head_bytes(rp), S.work_bytes(mp.cfg, 64)
    assert h < r
    free = lambda need: int(need / S.FIT_FRACTION) + 1        # noqa: E731  just enough for `need`
    both = S.plan(mp, rp, 64, available=free(m + r + w))
    assert (both.model, both.ref, both.model_fits) == (False, False, True)
    ref_only = S.plan(mp, rp, 64, available=free(m + h + w))
    assert (ref_only.model, ref_only.ref) == (False, True)
    neither = S.plan(mp, rp, 64, available=free(m + w) // 2)
    assert (neither.model, neither.ref, neither.model_fits) == (True, True, False)
    alone = S.plan(mp, None, 64, available=free(m + w))
    assert (alone.model, alone.ref) == (False, False)
    assert (S.plan(mp, rp, 64, "always").model, S.plan(mp, rp, 64, "always").ref) == (True, True)
    assert (S.plan(mp, rp, 64, "never", available=1).model, S.plan(mp, rp, 64, "never", available=1).ref) == \
        (False, False)
    assert "reference streamed" in ref_only.describe()
    with pytest.raises(ValueError, match="stream mode"):
        S.plan(mp, rp, 64, "sometimes")


def test_available_and_peak_memory():
    assert S.available_bytes("cpu") > 0
    peak = S.peak_memory("cpu")
    assert set(peak) == {"peak_rss_bytes"} and peak["peak_rss_bytes"] > 50 * 2**20


# ---------------------------------------------------------------------------------------------- exl2-eval


def _eval(args):
    r = CliRunner().invoke(cli.eval_main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def test_eval_stream_always_and_never_give_the_same_table(pair, tmp_path):
    model, ref, data = pair
    out = {}
    for how in ("always", "never"):
        f = tmp_path / f"{how}.json"
        code, stdout, err = _eval([model, "--data", data, "--rows", 2, "--length", 24, "--kld-ref", ref,
                                   "--mode", "both", "--cache", "fp16,q4", "--stream", how, "--json", f, "-q"])
        assert code == 0, err
        out[how] = stdout, json.loads(f.read_text())
    assert out["always"][0] == out["never"][0]
    always, never = out["always"][1], out["never"][1]
    drop = ("model_run", "ref_run", "peak_rss_bytes")
    assert [{k: v for k, v in r.items() if k not in drop} for r in always] == \
        [{k: v for k, v in r.items() if k not in drop} for r in never]
    assert [(r["mode"], r["model_run"], r["ref_run"]) for r in always] == \
        [("full", "streamed", "streamed"), ("cache", "resident", "streamed"), ("cache", "resident", "streamed")]
    assert {(r["model_run"], r["ref_run"]) for r in never} == {("resident", "resident")}
    assert always[0]["kld_mean"] > 0.01
    for r in always + never:
        assert isinstance(r["peak_rss_bytes"], int) and r["peak_rss_bytes"] > 50 * 2**20


def test_eval_auto_streams_what_does_not_fit(pair, tmp_path, monkeypatch):
    model, ref, data = pair
    mp, rp = ModelParts(model), ModelParts(ref)
    m, h, w = S.resident_bytes(mp), S.head_bytes(rp), S.work_bytes(mp.cfg, 24)
    base = [model, "--data", data, "--rows", 2, "--length", 24, "--kld-ref", ref, "-q"]
    runs = {}
    for name, free in (("plenty", 1 << 40), ("ref", int((m + h + w) / S.FIT_FRACTION) + 1), ("both", 1 << 20)):
        monkeypatch.setattr(S, "available_bytes", lambda device="cpu", free=free: free)
        f = tmp_path / f"{name}.json"
        code, stdout, err = _eval(base + ["--json", f])
        assert code == 0, err
        (rec,) = json.loads(f.read_text())
        runs[name] = stdout, rec
    assert (runs["plenty"][1]["model_run"], runs["plenty"][1]["ref_run"]) == ("resident", "resident")
    assert (runs["ref"][1]["model_run"], runs["ref"][1]["ref_run"]) == ("resident", "streamed")
    assert (runs["both"][1]["model_run"], runs["both"][1]["ref_run"]) == ("streamed", "streamed")
    assert runs["plenty"][0] == runs["ref"][0] == runs["both"][0]          # the same table every way
    # cache mode needs the model whole: refused up front when it does not fit
    code, _, err = _eval(base + ["--cache", "q4"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "error: " in err and "loaded whole" in err and "--mode full" in err


def test_eval_rejects_unknown_stream_setting(pair):
    model, _, data = pair
    code, _, err = _eval([model, "--data", data, "--stream", "sometimes"])
    assert code == 2 and "--stream" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- validation


def test_validation_streams_the_source_and_matches_resident_scoring(exl2_pair, monkeypatch):
    """compare() never loads the FP16 source whole (one of its layers at a time); its numbers are those of
    scoring both models resident, and the same whichever way the EXL2 model's full mode runs."""
    from exl2.calibration import default_rows
    from exl2.convert import validate as V

    src, q = exl2_pair
    rows = default_rows(src / "tokenizer.json", rows=2, length=48, vocab_size=512).input_ids
    loaded, alive, most = [], [], [0]
    real_load, real_block = V.load_model, ModelParts.block

    def load(d, **kw):
        loaded.append(Path(d))
        return real_load(d, **kw)

    def block(self, i):
        if self.dir == src:
            gc.collect()
            most[0] = max(most[0], sum(r() is not None for r in alive))
            b = real_block(self, i)
            alive.append(weakref.ref(b))
            return b
        return real_block(self, i)

    monkeypatch.setattr(V, "load_model", load)
    monkeypatch.setattr(ModelParts, "block", block)
    auto = V.compare(src, q, rows, cache_length=24)
    assert loaded == [q] and len(alive) == 2 and most[0] == 0
    monkeypatch.undo()

    fp, qm = load_model(src), load_model(q)
    (full,) = evaluate_rows(qm, rows, [EvalConfig("full")], ref_model=fp)
    assert (auto["ppl_fp16"], auto["ppl_exl2"], auto["kld_mean"], auto["top1_agreement"]) == \
        (full.ref_ppl, full.ppl, full.kld_mean, full.top1)
    # the cache check scores each mode in one pass per row (runtime/onepass.py): token by token up to rounding
    c4, t4 = evaluate_rows(qm, rows[:1, :24], [EvalConfig("cache", "q4", 1, one_pass=True),
                                                EvalConfig("cache", "q4", 1)], ref_model=fp)
    assert auto["cache"]["q4"]["kld_mean"] == c4.kld_mean and auto["cache"]["q4"]["length"] == 24
    assert c4.kld_mean == pytest.approx(t4.kld_mean, rel=1e-4)
    assert V.compare(src, q, rows, cache_length=24, stream="always") == {**auto, "exl2_streamed": True}
    assert V.compare(src, q, rows, cache_length=24, stream="never") == auto
    assert "exl2_streamed" not in auto and "cache_skipped" not in auto

    tight = V.compare(src, q, rows, cache_length=24, available=1)      # the EXL2 model does not fit either
    assert tight["exl2_streamed"] is True and "cache" not in tight and "loaded whole" in tight["cache_skipped"]
    cache_keys = ("cache", "recommended_cache", "recommended_cache_exllamav2", "cache_x_skipped")
    assert {k: tight[k] for k in auto if k not in cache_keys} == {k: v for k, v in auto.items() if k not in cache_keys}

    # exl2's own modes read the KV profile the converter wrote; without it they are left out, not measured here
    from exl2.runtime.kv_profile import PROFILE_FILE

    assert list(auto["cache"]) == list(V.CACHE_MODES) and "cache_x_skipped" not in auto
    (q / PROFILE_FILE).rename(q / "kv.json.away")
    try:
        without = V.compare(src, q, rows, cache_length=24)
    finally:
        (q / "kv.json.away").rename(q / PROFILE_FILE)
    assert list(without["cache"]) == ["fp16", "q8", "q6", "q4"] and f"no {PROFILE_FILE}" in without["cache_x_skipped"]
    assert without["cache"]["q4"] == auto["cache"]["q4"] and auto["cache"]["q4x"]["kld_mean"] >= 0
