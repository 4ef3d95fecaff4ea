"""The measurement's sampled error (measure/measure.py, ``--measure-stride``): a module run at chosen positions
gives what the full forward gives there, on every architecture's attention and MLP; the sampled errors are
those of the full outputs at the same positions, weighted to stand for the whole row; a measurement with too
few tokens to sample measures them all."""
from __future__ import annotations

import pytest
import torch

from exl2.layers.moe import specs_for
from exl2.layers.stream import MODULES, embed_rows, run_module
from exl2.measure import measure as mm
from exl2.runtime.loader import ModelParts
from exl2.runtime.model import Rotary


@pytest.mark.parametrize("stride, length, expect", [(1, 8, None), (4, 16, [0, 3, 7, 11, 15]), (4, 10, [0, 3, 7]),
                                                    (2, 5, [0, 1, 3]), (5, 4, [0])])
def test_sample_positions_are_the_first_and_every_stride_th_token(stride, length, expect):
    pos = mm.sample_positions(length, stride)
    assert (pos is None) if expect is None else pos.tolist() == expect
    if pos is not None and pos.numel() > 1:
        w = mm.sample_weights(length, pos)          # the first token for itself, the others share the rest
        assert w[0] == 1 and torch.allclose(w[1:], torch.full((pos.numel() - 1,), (length - 1) / (pos.numel() - 1)))
        assert float(w.sum()) == pytest.approx(length)
    with pytest.raises(ValueError):
        mm.sample_positions(length, 0)


def test_sampled_errors_of_every_position_are_the_full_errors():
    from exl2.layers.stream import rel_error

    g = torch.Generator().manual_seed(0)
    y, r = torch.randn(1, 40, 16, generator=g), torch.randn(1, 40, 16, generator=g) * 3
    r[0, 0] *= 1000                                   # a sink-like token with a huge activation
    w = mm.sample_weights(40, torch.arange(40))
    assert torch.equal(w, torch.ones(40))
    err, tok = mm.sampled_errors(y, r, w)
    assert err == pytest.approx(rel_error(y, r), rel=1e-6) and tok == pytest.approx(mm.token_error(y, r), rel=1e-6)


@pytest.mark.parametrize("rows, length, asked, expect", [
    (16, 2048, 4, 4), (8, 512, 4, 4), (8, 512, 8, 4),      # 8 x 512: stride 8 would sample 512 < 1,024 tokens
    (4, 256, 4, 1), (2, 64, 4, 1),                           # 1,024 or fewer tokens: every one
    (8, 200, 4, 1), (16, 200, 4, 3), (1, 100_000, 7, 7), (3, 5, 1, 1)])
def test_effective_stride_keeps_at_least_min_sampled_tokens(rows, length, asked, expect):
    assert mm.MIN_SAMPLED == 1024
    got = mm.effective_stride(rows, length, asked)
    assert got == expect
    assert rows * (length // got) >= min(mm.MIN_SAMPLED, rows * length)
    with pytest.raises(ValueError):
        mm.effective_stride(rows, length, 0)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama3", "gemma2", "gemma3", "glm4", "granite", "phi3",
                                  "qwen3_moe"])
def test_a_module_at_positions_equals_the_full_forward_there(kind, tiny_checkpoint):
    """Windowed and soft-capped attention (gemma2/3), per-layer RoPE (gemma3), per-head norms (qwen3), partial
    interleaved RoPE (glm4), residual scale (granite), a sparse MLP (qwen3_moe): every layer, both modules."""
    d = tiny_checkpoint(kind, num_hidden_layers=2)
    parts = ModelParts(d, dtype=torch.float32)
    T = 48                                                  # longer than gemma's 16-token window
    x = embed_rows(parts, torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(1)))[0]
    cos, sin = Rotary(parts.cfg).cos_sin(0, T)
    for layer in range(parts.cfg.num_layers):
        block = parts.block(layer)
        for spec in specs_for(parts.cfg, MODULES):
            with torch.no_grad():
                full = run_module(block, spec, x, cos, sin)
                for pos in (mm.sample_positions(T, 4), torch.tensor([0, 5, 16, 17, 47]), torch.arange(T)):
                    at = run_module(block, spec, x, cos, sin, pos)
                    assert at.shape == (1, pos.numel(), x.shape[-1])
                    torch.testing.assert_close(at, full[:, pos], rtol=1e-5, atol=1e-5 * float(full.abs().max()))
            x = full


@pytest.fixture(scope="module")
def tiny(tiny_qwen_rows):
    return tiny_qwen_rows(2)


def test_sampled_errors_are_the_full_outputs_errors_at_those_positions(tiny):
    """module_error at positions against the errors of a full forward cut to the same positions, with the
    quantized weights of one combination in place."""
    from exl2.layers.stream import collect, linears, set_weight
    from exl2.quant_kernels import gptq
    from exl2.quant_kernels.qparams import ATTN_OPTIONS, MLP_OPTIONS

    d, ids = tiny
    parts = ModelParts(d, dtype=torch.float32)
    states = embed_rows(parts, ids)
    cos, sin = Rotary(parts.cfg).cos_sin(0, ids.shape[1])
    block = parts.block(0)
    pos = mm.sample_positions(ids.shape[1], 4)
    for spec, combo in zip(MODULES, (ATTN_OPTIONS[0], MLP_OPTIONS[0])):
        H, ref = collect(block, spec, states, cos, sin, "cpu")
        for p, qp in zip(spec.projections, combo):
            layer = linears(block, spec)[p]
            prep = gptq.prepare(H[spec.hessian_of[p]])
            set_weight(layer, gptq.quantize(layer.weight.data.float(), qp, prep, None if layer.bias is None
                                            else layer.bias.data.float(), pack=False).weight)
        err, tok = mm.module_error(block, spec, states, ref, "cpu", cos, sin, pos)
        with torch.no_grad():
            full = [run_module(block, spec, x, cos, sin) for x in states]
        w = mm.sample_weights(ids.shape[1], pos)
        want = [mm.sampled_errors(y[:, pos], r[:, pos], w) for y, r in zip(full, ref)]
        assert err == pytest.approx(sum(e for e, _ in want) / len(want), rel=1e-5)
        assert tok == pytest.approx(sum(t for _, t in want) / len(want), rel=1e-5)
        # every position: the full measurement's own numbers
        every = mm.module_error(block, spec, states, ref, "cpu", cos, sin, torch.arange(ids.shape[1]))
        assert every == pytest.approx(mm.module_error(block, spec, states, ref, "cpu", cos, sin), rel=1e-5)
        assert tok > 0
        states = ref


def test_rows_too_short_to_sample_are_measured_in_full(tiny, tmp_path):
    """4 x 64 tokens: the default stride falls to 1, so the default run is the same bytes as stride 1."""
    d, ids = tiny
    assert mm.effective_stride(*ids.shape, mm.MEASURE_STRIDE) == 1
    mm.run_measurement(d, ids, tmp_path / "default", provenance={"checkpoint_sha256": "x"})
    mm.run_measurement(d, ids, tmp_path / "full", provenance={"checkpoint_sha256": "x"}, stride=1)
    assert ((tmp_path / "default/measurement.json").read_bytes()
            == (tmp_path / "full/measurement.json").read_bytes())


def test_sampled_measurement_keeps_every_option_and_its_bits(tiny, tmp_path, monkeypatch):
    """Sampling changes the errors a little, never which options are measured or their bits."""
    d, ids = tiny
    full = mm.run_measurement(d, ids, tmp_path / "full", stride=1)["measurement"]
    monkeypatch.setattr(mm, "MIN_SAMPLED", 0)
    seen = mm.run_measurement(d, ids, tmp_path / "s4", stride=4)["measurement"]
    assert list(seen) == list(full)
    for key, entries in full.items():
        if entries is None:
            assert seen[key] is None
            continue
        assert [e["total_bits"] for e in entries] == [e["total_bits"] for e in seen[key]]
        assert [e["token_err"] for e in entries] != [e["token_err"] for e in seen[key]]
        for a, b in zip(entries, seen[key]):                # 64 of 256 tokens: the same order of magnitude
            assert 0.5 < b["token_err"] / a["token_err"] < 2


def test_the_converter_option_states_the_measurement_defaults():
    from exl2.convert.options import BY_NAME

    o = BY_NAME["measure_stride"]
    assert o.default == mm.MEASURE_STRIDE and o.legacy == 1 and "measure" in o.invalidates
    assert f"{mm.MIN_SAMPLED:,} tokens" in o.help


@pytest.mark.parametrize("kind", ["qwen2", "gemma2", "granite"])
@pytest.mark.parametrize("stride", [1, 4])
def test_combinations_finished_from_kept_inputs_measure_the_same(tiny_checkpoint, tiny_tokenizer, tmp_path,
                                                                 monkeypatch, kind, stride):
    """Combinations that differ from the one before only in o_proj or down_proj finish each row from the inputs
    that projection read in the earlier run: the same entries, to the bit, as running every combination
    (REPLAY_BUDGET 0); sampled and every token, with output norms (Gemma2) and a residual scale (Granite)."""
    import shutil

    from exl2.calibration import default_rows
    from exl2.layers import stream

    d = tiny_checkpoint(kind, num_hidden_layers=1)
    shutil.copy(tiny_tokenizer, d / "tokenizer.json")
    ids = default_rows(d / "tokenizer.json", rows=3, length=64, vocab_size=512).input_ids
    monkeypatch.setattr(mm, "MIN_SAMPLED", 0)
    parts = ModelParts(d, dtype=torch.float32)
    cos, sin = Rotary(parts.cfg).cos_sin(0, ids.shape[1])
    finished = []
    real = mm.finish_module
    monkeypatch.setattr(mm, "finish_module", lambda *a: finished.append(a[1].kind) or real(*a))
    got = {}
    for budget in (0, stream.REPLAY_BUDGET):
        monkeypatch.setattr(stream, "REPLAY_BUDGET", budget)
        for spec in MODULES:
            got[budget, spec.kind] = mm.measure_module(parts.block(0), spec, 0, embed_rows(parts, ids), cos, sin,
                                                       "cpu", stride=stride)[0]
        if budget == 0:
            assert finished == []
    assert got[0, "self_attn"] == got[stream.REPLAY_BUDGET, "self_attn"]
    assert got[0, "mlp"] == got[stream.REPLAY_BUDGET, "mlp"]
    # the tables: one attention combination (q/k/v as the one before), three MLP ones (gate/up as before)
    assert finished.count("self_attn") == 1 * ids.shape[0] and finished.count("mlp") == 3 * ids.shape[0]
