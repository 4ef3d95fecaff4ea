"""Measurement memory: variants kept in fp16 or spilled to disk give exactly the numbers of the original loop.

The original ``measure_module`` held every quantized variant of a module in a list and swapped them in per
combination.  The current one keeps them in a :class:`Variants` store that spills to a temporary folder past
a byte budget.  Both must give bit-identical entries; ``reference_measure_module`` below is the original
loop, kept here as the oracle.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from exl2.measure import measure as M
from exl2.measure import measurement as mj
from exl2.layers.stream import ATTN, MLP, MODULES, collect, embed_rows, linears, rel_error, run_module, set_weight
from exl2.quant_kernels import gptq
from exl2.quant_kernels.qparams import MLP_OPTIONS, distinct_options
from exl2.runtime.loader import ModelParts
from exl2.runtime.model import Rotary


def reference_measure_module(block, spec, states, cos, sin):
    """The measurement loop as it was before the spill store: all variants in memory, a swap per combination."""
    H, ref = collect(block, spec, states, cos, sin, "cpu")
    layers = linears(block, spec)
    original = {p: m.weight.data.clone() for p, m in layers.items()}
    prepared = {}
    for p, owner in spec.hessian_of.items():
        if owner not in prepared:
            prepared[owner] = gptq.prepare(H[p].cpu())
    variants = {}
    for p, opts in zip(spec.projections, distinct_options(spec.options)):
        b = layers[p].bias
        variants[p] = [(qp, gptq.quantize(original[p].float(), qp, prepared[spec.hessian_of[p]],
                                         None if b is None else b.data.float()).weight) for qp in opts]
    shapes = M.shapes_of(layers)
    entries = []
    for combo in spec.options:
        for p, qp in zip(spec.projections, combo):
            set_weight(layers[p], next(v for q, v in variants[p] if q == qp))
        errs, tok_errs = [], []
        with torch.no_grad():
            for x, r in zip(states, ref):
                y = run_module(block, spec, x, cos, sin)
                errs.append(rel_error(y, r))
                tok_errs.append(M.token_error(y, r))
        e = mj.entry(max(1e-6, 1.0 - sum(errs) / len(errs)), dict(zip(spec.projections, combo)), shapes)
        e["token_err"] = sum(tok_errs) / len(tok_errs)
        entries.append(e)
    for p, w in original.items():
        set_weight(layers[p], w)
    return entries, ref


def _layer0(model_dir, rows: int, length: int, seed: int = 0):
    parts = ModelParts(model_dir)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, parts.cfg.vocab_size, (rows, length), generator=g)
    states = embed_rows(parts, ids)
    cos, sin = Rotary(parts.cfg).cos_sin(0, length)
    return parts, states, cos, sin


def _weights(block):
    return {f"{s.kind}.{p}": m.weight.data.clone() for s in MODULES for p, m in linears(block, s).items()}


def _check_module_paths_agree(parts, states, cos, sin, tmp_path, budgets=(None, 0)):
    """For both modules of layer 0: reference loop == the store at each budget, bit for bit.

    Budget None is the default (in memory on small models), 0 always spills."""
    for spec in MODULES:
        ref_entries, ref_out = reference_measure_module(parts.block(0), spec, states, cos, sin)
        for budget in budgets:
            block = parts.block(0)
            before = _weights(block)
            entries, out = M.measure_module(block, spec, 0, states, cos, sin, "cpu",
                                            variant_budget=budget, spill_dir=tmp_path)
            assert entries == ref_entries, (spec.kind, budget)
            assert all(torch.equal(a, b) for a, b in zip(out, ref_out))
            after = _weights(block)               # the layer's own weights are back, untouched
            assert all(torch.equal(before[k], after[k]) for k in before)
            assert list(tmp_path.glob("exl2-variants-*")) == []     # the spill folder is removed


def test_quantized_weight_is_fp16_exact():
    """The variant is fp16 and is what the fp32 layer receives: fp16 storage loses nothing."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 256, generator=g) * 0.02
    x = torch.randn(512, 256, generator=g)
    prep = gptq.prepare(x.t() @ x / 512)
    for qp in distinct_options(MLP_OPTIONS)[2][:3]:
        res = gptq.quantize(w, qp, prep)
        assert res.weight.dtype == torch.float16
        assert torch.equal(res.weight.float().half(), res.weight)


def test_spill_round_trip_is_bit_exact(tmp_path):
    qps = distinct_options(MLP_OPTIONS)[0][:2]
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(64, 128, generator=g).half() for _ in qps]
    store = M.Variants(total_bytes=10, budget=0, spill_dir=tmp_path)
    assert store.spilled
    for qp, w in zip(qps, ws):
        store.add("gate_proj", qp, w)
    assert len(list(tmp_path.glob("exl2-variants-*/*.safetensors"))) == 2
    for qp, w in zip(qps, ws):
        got = store.get("gate_proj", qp)
        assert got.dtype == torch.float16 and torch.equal(got, w)
    store.close()
    assert list(tmp_path.iterdir()) == []
    assert not M.Variants(total_bytes=10, budget=10).spilled


def test_variant_bytes_counts_distinct_options():
    class Lin:
        def __init__(self, k, n):
            self.in_features, self.out_features = k, n

    # Qwen2-7B's MLP: 13 + 13 + 14 distinct options of 3584 x 18944 fp16 matrices
    layers = {"gate_proj": Lin(3584, 18944), "up_proj": Lin(3584, 18944), "down_proj": Lin(18944, 3584)}
    assert M.variant_bytes(layers, MLP) == 40 * 3584 * 18944 * 2
    assert M.variant_bytes(layers, MLP) > M.VARIANT_BUDGET       # spilled at the default budget


def test_tiny_qwen2_store_equals_original_loop(tmp_path, tiny_checkpoint):
    d = Path(tiny_checkpoint("qwen2", num_hidden_layers=1))
    parts, states, cos, sin = _layer0(d, rows=3, length=48)
    _check_module_paths_agree(parts, states, cos, sin, tmp_path)


@pytest.mark.slow
def test_smollm2_layer0_store_equals_original_loop(smollm2_dir, tmp_path):
    parts, states, cos, sin = _layer0(smollm2_dir, rows=2, length=64)
    # the path SmolLM2 takes (in memory at the default budget); the spill path is checked on the tiny model
    _check_module_paths_agree(parts, states, cos, sin, tmp_path, budgets=(None,))


def test_run_measurement_spilled_equals_in_memory(tmp_path, tiny_checkpoint, tiny_tokenizer):
    d = Path(tiny_checkpoint("qwen2", num_hidden_layers=2))
    shutil.copy(tiny_tokenizer, d / "tokenizer.json")
    ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(3))
    (tmp_path / "b" / "exl2-variants-stale").mkdir(parents=True)     # left by a killed run: removed
    a = M.run_measurement(d, ids, tmp_path / "a")
    b = M.run_measurement(d, ids, tmp_path / "b", variant_budget=0)
    assert a["measurement"] == b["measurement"]
    assert list((tmp_path / "b").glob("exl2-variants-*")) == []
    assert [len(a["measurement"][f"model.layers.{i}.{s.kind}"]) for i in range(2) for s in (ATTN, MLP)] == [19, 17] * 2
