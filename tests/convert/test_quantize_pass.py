"""The quantization pass module by module: states consumed in place, and the benchmark levers (off in the
converter: sequential Hessians, polish, weighted refinement, asymmetric calibration), each still writing layers
that reload bit for bit (checked inside the pass)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exl2.convert import accounting
from exl2.convert.quantize import error_rows, quantize_module, run_quantization
from exl2.layers.stream import (MODULES, LayerError, advance, collect, embed_rows, inputs_of, linears, rel_error,
                                run_module)
from exl2.quant_kernels.gptq import GPTQOptions
from exl2.quant_kernels.qparams import QParams
from exl2.runtime.loader import ModelParts, load_config
from exl2.runtime.model import Rotary


@pytest.fixture(scope="module")
def tiny(tiny_qwen_rows):
    return tiny_qwen_rows(2)


def uniform_strategy(model_dir, qp: QParams) -> dict:
    return accounting.uniform_strategy(load_config(model_dir), qp)[0]


def layer0(d, ids):
    """(parts, the embedded rows, cos, sin, layer 0's block) of a tiny checkpoint and its rows."""
    parts = ModelParts(d)
    cos, sin = Rotary(parts.cfg).cos_sin(0, ids.shape[1])
    return parts, embed_rows(parts, ids), cos, sin, parts.block(0)


def layer_tensors(work: Path, name: str) -> dict:
    return load_file(str(work / "out_tensor" / f"{name}.safetensors"))


def test_collect_limited_to_one_input_matches_the_full_collection(tiny):
    d, ids = tiny
    parts, states, cos, sin, block = layer0(d, ids)
    attn = MODULES[0]
    before = linears(block, attn)
    H_all, out_all = collect(block, attn, states, cos, sin, "cpu")
    H_o, out_o = collect(block, attn, states, cos, sin, "cpu", owners=("o_proj",))
    assert set(H_o) == {"o_proj"}
    assert torch.equal(H_o["o_proj"], H_all["o_proj"])
    assert all(torch.equal(a, b) for a, b in zip(out_all, out_o))
    assert all(m is before[p] for p, m in linears(block, attn).items())     # the recorders are removed again


@pytest.mark.parametrize("kind", [0, 1])
def test_inputs_without_the_output_stop_the_module_early(tiny, kind):
    """inputs_of(output=False): the same captured inputs as a full run, no output, and the projections after
    the last captured one never run (the asymmetric calibration's full-precision passes use it)."""
    d, ids = tiny
    parts = ModelParts(d)
    x = embed_rows(parts, ids)[0]
    cos, sin = Rotary(parts.cfg).cos_sin(0, ids.shape[1])
    block, spec = parts.block(0), MODULES[kind]
    first = spec.hessian_of[spec.projections[0]]
    full, y = inputs_of(block, spec, [first], x, cos, sin)
    calls = []
    hooks = [m.register_forward_hook(lambda mod, i, o, p=p: calls.append(p)) for p, m in linears(block, spec).items()]
    try:
        got, none = inputs_of(block, spec, [first], x, cos, sin, output=False)
    finally:
        for h in hooks:
            h.remove()
    assert y is not None and none is None and torch.equal(got[first], full[first])
    assert calls == []                          # stopped before the first projection ran (it reads the input)
    both, _ = inputs_of(block, spec, list(dict.fromkeys(spec.hessian_of.values())), x, cos, sin, output=False)
    assert all(torch.equal(both[o], full_o) for o, full_o in
               inputs_of(block, spec, list(both), x, cos, sin)[0].items())


def test_collect_without_outputs_stops_after_the_recorded_input(tiny):
    """collect(output=False): the same Hessian, no outputs, and nothing after the recorded projection runs
    (the later sequential collects of the quantization pass use it; their outputs were never read)."""
    d, ids = tiny
    parts, states, cos, sin, block = layer0(d, ids)
    spec = MODULES[1]
    owner = spec.hessian_of["down_proj"]
    H, outs = collect(block, spec, states, cos, sin, "cpu", owners=(owner,))
    calls = []
    down = linears(block, spec)["down_proj"]
    hook = down.register_forward_hook(lambda *a: calls.append(1))
    try:
        H2, outs2 = collect(block, spec, states, cos, sin, "cpu", owners=(owner,), output=False)
    finally:
        hook.remove()
    assert outs2 == [] and len(outs) == len(states) and calls == []
    assert torch.equal(H["down_proj"], H2["down_proj"])


def test_sequential_changes_only_the_projections_after_the_first_input(tiny, tmp_path):
    """Layer 0's q/k/v see the same Hessian either way and come out byte-identical; o_proj's Hessian is
    collected after q/k/v are quantized, so it differs."""
    d, ids = tiny
    strat = uniform_strategy(d, QParams.make(32, [3], [1.0]))
    run_quantization(d, ids, strat, 6, tmp_path / "plain")
    run_quantization(d, ids, strat, 6, tmp_path / "seq", opts=GPTQOptions(sequential=True))
    for p in ("q_proj", "k_proj", "v_proj"):
        a = layer_tensors(tmp_path / "plain", f"model.layers.0.self_attn.{p}")
        b = layer_tensors(tmp_path / "seq", f"model.layers.0.self_attn.{p}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), p
    a = layer_tensors(tmp_path / "plain", "model.layers.0.self_attn.o_proj")
    b = layer_tensors(tmp_path / "seq", "model.layers.0.self_attn.o_proj")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_polish_and_weighted_refinement_run_through_the_pass(tiny, tmp_path):
    d, ids = tiny
    strat = uniform_strategy(d, QParams.make(32, [3], [1.0]))
    plain = run_quantization(d, ids, strat, 6, tmp_path / "plain")
    lev = run_quantization(d, ids, strat, 6, tmp_path / "lev", opts=GPTQOptions(polish_sweeps=1, refine_weighted=True))
    assert plain["errors"].keys() == lev["errors"].keys()
    a = layer_tensors(tmp_path / "plain", "model.layers.0.mlp.down_proj")
    b = layer_tensors(tmp_path / "lev", "model.layers.0.mlp.down_proj")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_quantize_module_replaces_its_input_rows_with_the_outputs(tiny, tmp_path):
    """The states list passed in comes back holding the module's outputs (two copies of the states alive at
    the end of a module, not three); they are the quantized module's outputs on the original inputs."""
    d, ids = tiny
    parts, states, cos, sin, block = layer0(d, ids)
    inputs = [s.clone() for s in states]
    strat = uniform_strategy(d, QParams.make(32, [4], [1.0]))
    (tmp_path / "out").mkdir()
    out, err = quantize_module(block, MODULES[0], 0, strat, states, cos, sin, "cpu", tmp_path / "out")
    assert out is states and len(out) == len(inputs) and 0 < err < 1
    with torch.no_grad():
        for x, y in zip(inputs, out):
            assert torch.equal(run_module(block, MODULES[0], x, cos, sin).float(), y)


def test_error_rows_are_evenly_spaced():
    assert error_rows(16) == [0, 4, 8, 12] and error_rows(100) == [0, 25, 50, 75]
    assert error_rows(6) == [0, 1, 3, 4] and error_rows(3) == [0, 1, 2] and error_rows(1) == [0]


def test_collect_out_rows_runs_only_those_rows_to_the_end(tiny):
    """The Hessians are those of the full collection; the outputs are the chosen rows' outputs, in row order."""
    d, ids = tiny
    parts, states, cos, sin, block = layer0(d, ids)
    for spec in MODULES:
        H_all, out_all = collect(block, spec, states, cos, sin, "cpu")
        H, out = collect(block, spec, states, cos, sin, "cpu", out_rows=[1, 3])
        assert H.keys() == H_all.keys() and all(torch.equal(H[p], H_all[p]) for p in H)
        assert len(out) == 2 and torch.equal(out[0], out_all[1]) and torch.equal(out[1], out_all[3])
    with pytest.raises(ValueError, match="max_abs needs every output"):
        collect(block, MODULES[0], states, cos, sin, "cpu", max_abs=[], out_rows=[0])


def test_advance_refuses_a_nan_output_in_any_row(tiny):
    """Rows without a reference are checked too (the first collect no longer runs them to the end)."""
    d, ids = tiny
    parts, states, cos, sin, block = layer0(d, ids)
    ref = [None] * len(states)
    ref[0] = states[0].clone()
    states[2][0, 5, 0] = float("nan")
    with pytest.raises(LayerError, match="NaN in the output with the quantized weights \\(row 2\\)"):
        advance(block, MODULES[1], states, ref, "cpu", cos, sin)


@pytest.mark.parametrize("asym", (0.0, 1.0))
def test_reported_error_is_measured_on_the_error_rows(tiny, tmp_path, asym):
    """The error quantize_module returns is the mean relative error, over error_rows only, of the quantized module's
    outputs against the full-precision module's on the same inputs; the outputs of every row still advance."""
    d, ids = tiny
    ids = torch.cat([ids, ids[:2].flip(1)])              # 6 rows: the error is measured on rows 0, 1, 3 and 4
    parts, states, cos, sin, block = layer0(d, ids)
    inputs = [s.clone() for s in states]
    fp_block = parts.block(0)
    strat = uniform_strategy(d, QParams.make(32, [3], [1.0]))
    (tmp_path / "out").mkdir()
    spec = MODULES[1]
    fstates = [s.clone() for s in states] if asym else None
    out, err = quantize_module(block, spec, 0, strat, states, cos, sin, "cpu", tmp_path / "out",
                               fstates=fstates, asym=asym)
    with torch.no_grad():
        errs = [rel_error(out[i], run_module(fp_block, spec, inputs[i], cos, sin)) for i in range(len(inputs))]
        for x, y in zip(inputs, out):
            assert torch.equal(run_module(block, spec, x, cos, sin).float(), y)
    assert err == pytest.approx(sum(errs[i] for i in (0, 1, 3, 4)) / 4, rel=1e-6)
    assert err != pytest.approx(sum(errs) / len(errs), rel=1e-6)


def test_asymmetric_calibration_corrects_only_where_the_inputs_differ(tiny, tmp_path):
    """Layer 0's q/k/v read the embeddings, the same in both models: no correction, bytes identical to the
    sequential run (which asymmetric calibration implies).  o_proj reads quantized q/k/v's output, and every
    projection of layer 1 reads a perturbed residual stream: they change."""
    d, ids = tiny
    strat = uniform_strategy(d, QParams.make(32, [3], [1.0]))
    run_quantization(d, ids, strat, 6, tmp_path / "seq", opts=GPTQOptions(sequential=True))
    run_quantization(d, ids, strat, 6, tmp_path / "asym", asym=1.0)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"):
        a, b = layer_tensors(tmp_path / "seq", name), layer_tensors(tmp_path / "asym", name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                 "lm_head"):
        a, b = layer_tensors(tmp_path / "seq", name), layer_tensors(tmp_path / "asym", name)
        assert not all(torch.equal(a[k], b[k]) for k in a), name


def test_asymmetric_calibration_resumes_to_the_same_bytes(tiny, tmp_path):
    """Killed after layer 0, the checkpoint holds both models' states; resuming with another alpha is refused,
    resuming with the same one writes what an uninterrupted run writes."""
    from exl2.convert.quantize import QuantizeError
    from exl2.layers.checkpoint import load_checkpoint

    d, ids = tiny
    strat = uniform_strategy(d, QParams.make(32, [4], [1.0]))
    run_quantization(d, ids, strat, 6, tmp_path / "whole", asym=0.5)

    class Killed(Exception):
        pass

    def stop_after_layer0(ev):
        if ev.get("layer") == 0:
            raise Killed

    with pytest.raises(Killed):
        run_quantization(d, ids, strat, 6, tmp_path / "part", asym=0.5, status=stop_after_layer0)
    report, states = load_checkpoint(tmp_path / "part", "quant")
    assert report["next_layer"] == 1 and report["asym"] == 0.5 and len(states) == 2 * ids.shape[0]
    with pytest.raises(QuantizeError, match=r"ran with --asym 0.5, this run asks for 0; rerun with --asym 0.5"):
        run_quantization(d, ids, strat, 6, tmp_path / "part")
    run_quantization(d, ids, strat, 6, tmp_path / "part", asym=0.5)
    files = sorted(p.name for p in (tmp_path / "whole" / "out_tensor").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "part" / "out_tensor").iterdir())
    for f in files:
        assert (tmp_path / "whole" / "out_tensor" / f).read_bytes() == (tmp_path / "part" / "out_tensor" / f).read_bytes(), f


@pytest.mark.parametrize("spec", MODULES, ids=lambda s: s.kind)
def test_asymmetric_calibration_leaves_the_full_precision_outputs_in_fstates(tiny, tmp_path, spec):
    """quantize_module replaces each row of ``fstates`` by the full-precision module's output on it (taken from
    the last collect's full-precision run), exactly what running the unquantized module gives, while the
    quantized states move on to the quantized module's outputs."""
    d, ids = tiny
    parts, states, cos, sin, block = layer0(d, ids)
    strategy = uniform_strategy(d, QParams.make(32, [3], [1.0]))
    fstates = [x.clone() for x in states]
    with torch.no_grad():
        want = [run_module(block, spec, x, cos, sin).float() for x in fstates]
    states, _ = quantize_module(block, spec, 0, strategy, states, cos, sin, "cpu", tmp_path, fstates=fstates,
                                asym=1.0)
    assert all(torch.equal(a, b) for a, b in zip(fstates, want))
    assert not all(torch.equal(a, b) for a, b in zip(states, want))      # the 3-bit module's outputs differ


@pytest.mark.parametrize("kind", ["qwen2", "gemma2", "granite"])
def test_finishing_modules_from_kept_inputs_writes_the_same_bytes(tiny_checkpoint, tiny_tokenizer, tmp_path,
                                                                  monkeypatch, kind):
    """With asymmetric calibration the last collect keeps each row's o_proj / down_proj input and advance finishes
    the module from it: the same layers, errors and states as running every module again (REPLAY_BUDGET 0),
    on architectures with output norms (Gemma2) and a residual scale (Granite)."""
    import shutil

    from exl2.calibration import default_rows
    from exl2.layers import stream

    d = tiny_checkpoint(kind, num_hidden_layers=2)
    shutil.copy(tiny_tokenizer, Path(d) / "tokenizer.json")
    ids = default_rows(Path(d) / "tokenizer.json", rows=3, length=48, vocab_size=512).input_ids
    strat = uniform_strategy(d, QParams.make(32, [3], [1.0]))
    finished = []
    real_finish = stream.finish_module
    monkeypatch.setattr(stream, "finish_module", lambda *a: finished.append(a[1].kind) or real_finish(*a))
    monkeypatch.setattr(stream, "REPLAY_BUDGET", 0)
    rerun = run_quantization(d, ids, strat, 6, tmp_path / "rerun", asym=0.5)
    assert finished == []
    monkeypatch.undo()
    monkeypatch.setattr(stream, "finish_module", lambda *a: finished.append(a[1].kind) or real_finish(*a))
    kept = run_quantization(d, ids, strat, 6, tmp_path / "kept", asym=0.5)
    assert sorted(set(finished)) == ["mlp", "self_attn"] and len(finished) == 2 * 2 * ids.shape[0]
    assert kept["errors"] == rerun["errors"] and kept["head"] == rerun["head"]
    files = sorted(p.name for p in (tmp_path / "rerun" / "out_tensor").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "kept" / "out_tensor").iterdir())
    for f in files:
        assert (tmp_path / "rerun" / "out_tensor" / f).read_bytes() == (tmp_path / "kept" / "out_tensor" / f).read_bytes(), f


def test_replay_budget_bounds_the_kept_inputs():
    from exl2.layers.stream import REPLAY_BUDGET, replay_bytes

    assert replay_bytes(16, 512, 1536) == 4 * 16 * 512 * 1536
    assert replay_bytes(100, 2048, 18944) == 0 and 4 * 100 * 2048 * 18944 > REPLAY_BUDGET
