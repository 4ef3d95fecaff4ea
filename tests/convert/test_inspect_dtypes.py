"""exl2-inspect flags tensors stored in a dtype ExLlamaV2's loader cannot take, per layer (or per tensor)."""
from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import save_file

from exl2.convert.inspect import STORABLE, format_report, inspect_dir
from exl2.quant_kernels import codec
from exl2.quant_kernels.qparams import QParams


def layer(seed: int, bias: bool) -> dict[str, torch.Tensor]:
    """A valid EXL2 layer, K = 256, N = 64 (4/3-bit groups of 64 rows)."""
    qp = QParams.make(64, [4, 3], [0.5, 0.5])
    g = torch.Generator().manual_seed(seed)
    groups = qp.row_groups(256)
    q = torch.cat([torch.randint(0, 2 ** b, (r, 64), generator=g) for b, r in groups])
    codes = torch.randint(0, 16, (len(groups), 64), generator=g)
    smax = torch.rand(len(groups), generator=g) * 0.1 + 1e-3
    b = torch.randn(64, generator=g) if bias else None
    return codec.pack_layer(q, groups, codes, smax, torch.randperm(256, generator=g), b)


def write_model(d, changes: dict[str, torch.Tensor]):
    d.mkdir()
    tensors = {"model.embed_tokens.weight": torch.zeros(8, 256, dtype=torch.float16),
               "model.norm.weight": torch.ones(256, dtype=torch.float16)}
    for i, p in enumerate(("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                           "model.layers.0.mlp.up_proj")):
        for s, t in layer(i, bias=p.endswith("k_proj")).items():
            tensors[f"{p}.{s}"] = t
    tensors.update(changes)
    save_file(tensors, str(d / "model.safetensors"))
    return d


def test_a_valid_model_has_no_errors(tmp_path):
    rep = inspect_dir(write_model(tmp_path / "m", {}))
    assert rep["errors"] == [] and rep["tensor_errors"] == [] and len(rep["layers"]) == 3
    assert "all layers valid" in format_report(rep)


@pytest.mark.parametrize("key, dtype, message", [
    # the codec's own check allows any integer permutation; ExLlamaV2's safetensors reader stops at I64
    ("model.layers.0.self_attn.q_proj.q_invperm", torch.int64,
     "model.layers.0.self_attn.q_proj.q_invperm: dtype int64 cannot be loaded by ExLlamaV2 (it needs int16 or int32)"),
    ("model.layers.0.mlp.up_proj.q_perm", torch.int64,
     "model.layers.0.mlp.up_proj.q_perm: dtype int64 cannot be loaded by ExLlamaV2 (it needs int16 or int32)"),
])
def test_permutation_dtypes(tmp_path, key, dtype, message):
    base = layer(0 if "q_proj" in key else 2, bias=False)
    inv = base["q_invperm"]
    t = (inv if key.endswith("q_invperm") else torch.argsort(inv.to(torch.int64))).to(dtype)
    rep = inspect_dir(write_model(tmp_path / "m", {key: t}))
    assert rep["errors"] == [message]
    bad = [r for r in rep["layers"] if "error" in r]
    assert [r["layer"] for r in bad] == [key.rsplit(".", 1)[0]]
    text = format_report(rep)
    assert f"INVALID: {message}" in text and "format check: 1 invalid layer(s)" in text


def test_int16_and_int32_permutations_are_fine(tmp_path):
    inv = layer(0, bias=False)["q_invperm"]
    rep = inspect_dir(write_model(tmp_path / "m", {"model.layers.0.self_attn.q_proj.q_invperm": inv.to(torch.int16),
                                                   "model.layers.0.self_attn.q_proj.q_perm":
                                                       torch.argsort(inv.to(torch.int64)).to(torch.int32)}))
    assert rep["errors"] == []


def test_bias_must_be_float16(tmp_path):
    b = layer(1, bias=True)["bias"].to(torch.float32)
    rep = inspect_dir(write_model(tmp_path / "m", {"model.layers.0.self_attn.k_proj.bias": b}))
    assert len(rep["errors"]) == 1 and rep["errors"][0].startswith("model.layers.0.self_attn.k_proj.bias: dtype")


def test_other_tensors_in_an_unreadable_dtype(tmp_path):
    rep = inspect_dir(write_model(tmp_path / "m", {"model.norm.weight": torch.ones(256, dtype=torch.float64)}))
    assert rep["tensor_errors"] == ["model.norm.weight: dtype F64 cannot be read by ExLlamaV2 (its loader reads "
                                    "I32, I16, F16, BF16, F32)"]
    assert rep["errors"] == rep["tensor_errors"]
    text = format_report(rep)
    assert "UNREADABLE: model.norm.weight: dtype F64" in text and "format check: 1 unreadable tensor(s)" in text


def test_storable_dtypes_match_exllamav2s_reader(exllamav2):
    """Our list of readable safetensors dtypes is the one ExLlamaV2's own reader accepts."""
    stloader = importlib.import_module("exllamav2.stloader")
    every = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
             "F8_E4M3", "F8_E5M2")
    readable = []
    for dt in every:
        try:
            stloader.convert_dtype(dt)
            readable.append(dt)
        except ValueError:
            pass
    assert sorted(readable) == sorted(STORABLE)
