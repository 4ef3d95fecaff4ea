"""Checkpoint loading: layouts, errors that name the tensor and file, the EXL2 routing hook."""
import json

import pytest
import torch
from exl2.runtime import linear as rt_linear
from exl2.runtime.arch import UnsupportedArchitectureError
from exl2.runtime.loader import ModelParts, load_model
from exl2.runtime.tensors import CheckpointError, TensorSource
from safetensors.torch import load_file, save_file


def _ids(T=30):
    return torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(0))


def test_sharded_with_index_matches_single(tiny_checkpoint):
    single = tiny_checkpoint("qwen2", seed=1)
    sharded = tiny_checkpoint("qwen2", seed=1, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    with torch.no_grad():
        assert torch.equal(load_model(single)(_ids()), load_model(sharded)(_ids()))


def test_any_safetensors_without_index(tiny_checkpoint, tmp_path):
    """EXL2 dirs: no index, arbitrary shard names; every *.safetensors is read."""
    src = tiny_checkpoint("qwen2", seed=1, max_shard_size="200KB")
    ref = load_model(src)(_ids())
    (src / "model.safetensors.index.json").unlink()
    for i, f in enumerate(sorted(src.glob("*.safetensors"))):
        f.rename(src / f"output-{i:05d}.safetensors")
    with torch.no_grad():
        assert torch.equal(load_model(src)(_ids()), ref)


def test_missing_tensor_names_it(tiny_checkpoint):
    d = tiny_checkpoint("qwen2")
    f = d / "model.safetensors"
    t = load_file(f)
    del t["model.layers.1.self_attn.v_proj.bias"]
    save_file(t, f)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.v_proj\.bias"):
        load_model(d)


def test_index_points_at_tensor_missing_from_shard(tiny_checkpoint):
    d = tiny_checkpoint("qwen2", max_shard_size="200KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key = "model.norm.weight"
    shard = d / index["weight_map"][key]
    t = load_file(shard)
    del t[key]
    save_file(t, shard)
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*model\.norm\.weight"):
        load_model(d)


def test_wrong_shape_names_tensor_and_file(tiny_checkpoint):
    d = tiny_checkpoint("qwen2")
    f = d / "model.safetensors"
    t = load_file(f)
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:, :64].contiguous()
    save_file(t, f)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.up_proj\.weight "
                                              r"has shape \(256, 64\), expected \(256, 128\)"):
        load_model(d)


def test_wrong_dtype_names_tensor(tiny_checkpoint):
    d = tiny_checkpoint("qwen2")
    f = d / "model.safetensors"
    t = load_file(f)
    t["model.norm.weight"] = torch.ones(128, dtype=torch.int32)
    save_file(t, f)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has dtype I32, expected F16, BF16 or F32"):
        load_model(d)


def test_truncated_file_names_file(tiny_checkpoint):
    d = tiny_checkpoint("qwen2")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(d)


def test_unexpected_bias_is_an_error(tiny_checkpoint):
    d = tiny_checkpoint("qwen2")
    f = d / "model.safetensors"
    t = load_file(f)
    t["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(128)
    save_file(t, f)
    with pytest.raises(CheckpointError, match=r"o_proj\.bias is present but not expected"):
        load_model(d)


def test_bin_only_dir_refused(tmp_path, tiny_checkpoint):
    d = tiny_checkpoint("qwen2")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*refusing to unpickle"):
        load_model(d)


def test_unknown_architecture_lists_supported(tiny_checkpoint):
    d = tiny_checkpoint("qwen2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"GPTNeoXForCausalLM.*LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Phi3ForCausalLM, "
                             r"Qwen2ForCausalLM"):
        load_model(d)


def test_tensor_source_lazy_lookup(tiny_checkpoint):
    src = TensorSource(tiny_checkpoint("qwen2", max_shard_size="200KB"))
    assert "model.embed_tokens.weight" in src
    assert src.file_of("model.norm.weight").suffix == ".safetensors"
    with pytest.raises(CheckpointError, match="nope.weight"):
        src.get("nope.weight")


def _fake_exl2(d, prefix, n, k):
    """Replace <prefix>.weight by EXL2-named tensors (content irrelevant: the hook is what is tested)."""
    f = d / "model.safetensors"
    t = load_file(f)
    t.pop(f"{prefix}.weight", None)  # a tied head has none
    t[f"{prefix}.q_weight"] = torch.zeros(k * 4 // 32, n, dtype=torch.int32)
    t[f"{prefix}.q_invperm"] = torch.arange(k, dtype=torch.int16)
    t[f"{prefix}.q_scale"] = torch.zeros(k // 32, n // 8, dtype=torch.int32)
    t[f"{prefix}.q_scale_max"] = torch.ones(k // 32, dtype=torch.float16)
    t[f"{prefix}.q_groups"] = torch.tensor([4, 0] * (k // 32), dtype=torch.int16)
    save_file(t, f)


def test_exl2_layer_routed_to_hook(tiny_checkpoint, monkeypatch):
    d = tiny_checkpoint("qwen2", tie=True)
    _fake_exl2(d, "lm_head", 512, 128)
    # The fake tensors are not a valid EXL2 layer: the real hook refuses them, naming the file and tensor.
    with pytest.raises(CheckpointError, match=r"\.safetensors: lm_head\.q_"):
        load_model(d)
    seen = {}

    def fake_hook(prefix, tensors, *, in_features, out_features, dtype, device, mode):
        seen[prefix] = (sorted(tensors), in_features, out_features)
        return rt_linear.Linear(torch.zeros(out_features, in_features, dtype=dtype))

    monkeypatch.setattr(rt_linear, "load_exl2_linear", fake_hook)
    m = load_model(d)
    assert seen == {"lm_head": (["q_groups", "q_invperm", "q_scale", "q_scale_max", "q_weight"], 128, 512)}
    with torch.no_grad():
        assert torch.equal(m(_ids()), torch.zeros(1, 30, 512))  # the quantized head wins over tying


def test_partially_quantized_attention_refused(tiny_checkpoint):
    d = tiny_checkpoint("llama3")
    _fake_exl2(d, "model.layers.0.self_attn.o_proj", 128, 256)
    with pytest.raises(CheckpointError, match="layer 0: partially quantized attention"):
        load_model(d)


def test_custom_linear_factory(tiny_checkpoint):
    """The swap point: a factory sees every linear prefix with its K/N."""
    from exl2.runtime.loader import make_linear

    d = tiny_checkpoint("llama3")
    calls = []

    def factory(prefix, source, **kw):
        calls.append((prefix, kw["in_features"], kw["out_features"]))
        return make_linear(prefix, source, **kw)

    load_model(d, linear_factory=factory)
    assert len(calls) == 2 * 7 + 1
    assert ("model.layers.1.self_attn.q_proj", 128, 256) in calls  # head_dim 64 x 4 heads
    assert ("lm_head", 128, 512) in calls


# ---- fused projections (Phi-3's qkv_proj and gate_up_proj, read as their parts' rows) ----

def _phi3_tensors(d):
    return load_file(d / "model.safetensors")


def test_fused_checkpoint_loads_like_its_split_form(tiny_checkpoint):
    """The same Phi-3 stored with q/k/v and gate/up as separate tensors (the rows the loader reads) gives the same
    logits; keys() lists the stored tensors only, so byte totals (plan, memory estimates) count them once."""
    d = tiny_checkpoint("phi3")
    t = _phi3_tensors(d)
    ref = load_model(d)
    plain, parts = TensorSource(d), ModelParts(d)
    v = "model.layers.0.self_attn.v_proj.weight"
    assert v not in plain and v in parts.src and parts.src.file_of(v) == d / "model.safetensors"
    assert parts.src.keys() == plain.keys()
    assert parts.src.shape("model.layers.1.mlp.up_proj.weight") == (256, 128)
    for i in range(2):
        qkv = t.pop(f"model.layers.{i}.self_attn.qkv_proj.weight")
        gate_up = t.pop(f"model.layers.{i}.mlp.gate_up_proj.weight")
        for name, w in zip(("q_proj", "k_proj", "v_proj"), qkv.split([128, 64, 64])):
            t[f"model.layers.{i}.self_attn.{name}.weight"] = w.contiguous()
        t[f"model.layers.{i}.mlp.gate_proj.weight"], t[f"model.layers.{i}.mlp.up_proj.weight"] = \
            (w.contiguous() for w in gate_up.chunk(2))
    save_file(t, d / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(load_model(d)(_ids()), ref(_ids()))


def test_fused_tensor_of_the_wrong_shape_names_it(tiny_checkpoint):
    d = tiny_checkpoint("phi3")
    t = _phi3_tensors(d)
    t["model.layers.1.self_attn.qkv_proj.weight"] = t["model.layers.1.self_attn.qkv_proj.weight"][:-64].contiguous()
    save_file(t, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.1.self_attn.qkv_proj.weight "
                                              r"has shape \(192, 128\), expected \(256, 128\) \(128 \+ 64 \+ 64 rows "
                                              r"of q, k, v"):
        load_model(d)


def test_fused_and_split_forms_together_are_refused(tiny_checkpoint):
    d = tiny_checkpoint("phi3")
    t = _phi3_tensors(d)
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.gate_up_proj.weight"][256:].clone()
    save_file(t, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensor model.layers.0.mlp.gate_up_proj.weight and "
                                              "model.layers.0.mlp.up_proj.weight are both stored"):
        load_model(d)


def test_nan_in_a_fused_tensor_names_the_stored_tensor(tiny_checkpoint):
    d = tiny_checkpoint("phi3")
    t = _phi3_tensors(d)
    t["model.layers.0.self_attn.qkv_proj.weight"][200, 3] = float("nan")     # a row of v
    save_file(t, d / "model.safetensors")
    match = r"tensor model.layers.0.self_attn.qkv_proj.weight \(rows 192:256, read as .*v_proj.weight\) holds 1 NaN"
    with pytest.raises(CheckpointError, match=match):
        ModelParts(d).check_finite()
    with pytest.raises(CheckpointError, match=match):
        load_model(d)
