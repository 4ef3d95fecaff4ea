"""bench/gpu_check.py (`make gpu-check`, issue #23): the dry run end to end through the Makefile, the SmolLM2 slice
against the fixture it stands in for, and the pieces the GPU run relies on that a CPU can check."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check as G

REPO = Path(__file__).resolve().parents[1]
CUDA_STEPS = {"build", "cuda_tests", "bandwidth", "gemv", "convert_cuda", "exllamav2_logits", "layer_timing"}


@pytest.mark.slow
def test_dry_run_through_make(tmp_path):
    """`make gpu-check ARGS="--dry-run ..."`: every step reported, the CUDA ones skipped with the reason and their
    CPU exercise passed, the CPU ones passed; the report's numbers are the ones the steps checked."""
    out, work = tmp_path / "out", tmp_path / "work"
    args = f"--dry-run --out {out} --work {work} --wheels {tmp_path / 'no-wheels'}"   # the slice packed in the run
    r = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}", f"ARGS={args}"], cwd=REPO,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["mode"] == "dry-run" and rep["passed"] is True
    assert list(rep["steps"]) == [s.name for s in G.STEPS]
    assert {n for n, s in rep["steps"].items() if s["needs_cuda"]} == CUDA_STEPS
    for name, s in rep["steps"].items():
        if s["needs_cuda"]:
            assert s["status"] == "skipped", name
            assert s["reason"].startswith("needs CUDA (") and s["reason"].endswith("dry run"), s["reason"]
            ex = s["cpu_exercise"]
            assert ex["status"] == "passed" and ex["targets"], (name, ex)
            assert all(t["passed"] for t in ex["targets"])
        else:
            assert s["status"] == "passed", (name, s)
            assert all(t["passed"] for t in s["targets"])

    steps = rep["steps"]
    assert steps["install"]["results"]["torch_after"] == steps["install"]["results"]["torch_before"]
    assert steps["install"]["results"]["exl2_from"].startswith(str(REPO))
    tests = steps["cuda_tests"]["cpu_exercise"]["results"]
    assert tests["tests"] >= 1 and tests["skipped"] == tests["tests"] and not tests["failed"]
    assert set(tests["files"]) == set(G.cuda_test_files())
    model = steps["convert_cpu"]["results"]["model"]
    assert model["layers"] == 1 and "packed in this run" in model["source"]
    same = steps["convert_cuda"]["cpu_exercise"]["results"]["layers"]
    assert same["layers"] == 8 and same["bit_identical_layers"] == 8     # 7 projections + the tied head
    read = steps["exllamav2_read"]["results"]
    assert read["exl2_layers"] == 8 and read["tied_head_quantized"] and read["exllamav2_version"] == "0.3.2"
    layer = steps["layer_timing"]["cpu_exercise"]["results"]
    assert layer["end_to_end"]["measure_complete"] and layer["end_to_end"]["quant_complete"]
    assert set(layer["projection"]) == {"7b", "72b"}

    md = (out / "report.md").read_text()
    assert md.startswith("# exl2 GPU check (dry-run)")
    for name in rep["steps"]:
        assert f"| {name} |" in md
    assert (out / "logs.tar.gz").stat().st_size > 0


@pytest.mark.slow
def test_slice_is_the_fixture(tmp_path, smollm2_dir):
    """The carried slice, dequantized by this script, holds the fixture checkpoint's tensors bit for bit (its
    first layers), the same tokenizer and the same config but for the depth."""
    from safetensors import safe_open

    src = tmp_path / "slice"
    man = G.pack_slice(src, layers=3)
    assert man["layers"] == 3 and man["total_layers"] == 30
    d = G.materialize_slice(src, tmp_path / "model", 2)
    with safe_open(str(d / "model.safetensors"), "pt") as got, \
            safe_open(str(smollm2_dir / "model.safetensors"), "pt") as ref:
        keys = list(got.keys())
        assert len(keys) == 2 + 2 * 9 and "model.layers.1.mlp.down_proj.weight" in keys
        assert "model.layers.2.mlp.down_proj.weight" not in keys
        for k in keys:
            a, b = got.get_tensor(k), ref.get_tensor(k)
            assert a.dtype == b.dtype == torch.float16 and torch.equal(a.view(torch.int16), b.view(torch.int16)), k
    assert json.loads((d / "tokenizer.json").read_text()) == json.loads((smollm2_dir / "tokenizer.json").read_text())
    cfg, ref_cfg = json.loads((d / "config.json").read_text()), json.loads((smollm2_dir / "config.json").read_text())
    assert cfg.pop("num_hidden_layers") == 2 and ref_cfg.pop("num_hidden_layers") == 30 and cfg == ref_cfg
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (d / name).read_text() == (smollm2_dir / name).read_text()
    # reused when asked again; refused when the blocks changed or more layers are asked than carried
    assert G.materialize_slice(src, tmp_path / "model", 2) == d
    with pytest.raises(G.StepFailed, match="holds 3 decoder layers"):
        G.materialize_slice(src, tmp_path / "model4", 4)
    with open(src / "blocks.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(G.StepFailed, match="sha256"):
        G.materialize_slice(src, tmp_path / "model3", 3)


def test_gguf_blocks_dequantize_as_gguf_does():
    """Q8_0 and Q4_1 blocks (fp16 scales, int8 / nibble codes) decoded as gguf.quants does, bit for bit."""
    import gguf.quants as gguf_quants
    import numpy as np
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(0)
    for ttype, size, scales, code in ((G.GGML_Q8_0, 34, 1, T.Q8_0), (G.GGML_Q4_1, 20, 2, T.Q4_1)):
        raw = rng.integers(0, 256, (64, size), dtype=np.uint8)            # codes: every byte value
        for j in range(scales):                                           # d (and Q4_1's m): finite fp16 values
            raw[:, 2 * j:2 * j + 2] = (rng.normal(size=64) * 0.01).astype(np.float16).view(np.uint8).reshape(64, 2)
        ref = gguf_quants.dequantize(raw, code).reshape(-1).astype(np.float32)
        got = G.dequant_blocks(raw, ttype, (64 * 32,))
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    f32 = rng.normal(size=7).astype(np.float32)
    assert np.array_equal(G.dequant_blocks(f32.view(np.uint8), G.GGML_F32, (7,)), f32)


def test_end_to_end_events_extrapolated_when_cut_short(tmp_path):
    """A layer run stopped during the MLP's combinations: each module's measurement is its time before the first
    combination plus its count of combinations at the rate seen; quantization unknown."""
    ev = [{"t": 0.0, "phase": "measure_start"}]
    ev += [{"t": 10.0 + i, "phase": "measure", "module": "model.layers.0.self_attn", "option": i, "of": 19}
           for i in range(19)]                                   # attention: 10 s before, then 1 s per combination
    ev += [{"t": 48.0 + 2 * i, "phase": "measure", "module": "model.layers.0.mlp", "option": i, "of": 17}
           for i in range(5)]                                    # MLP: 20 s before, then 2 s per combination
    p = tmp_path / "events.jsonl"
    p.write_text("\n".join(json.dumps(e) for e in ev) + "\n")
    a = G.analyse_events(p)
    assert not a["measure_complete"] and a["quant_layer_s"] is None
    att, mlp = a["measure_modules"]["model.layers.0.self_attn"], a["measure_modules"]["model.layers.0.mlp"]
    assert att["estimated_s"] == pytest.approx(10 + 19 * 1.0) and mlp["estimated_s"] == pytest.approx(20 + 17 * 2.0)
    assert a["measure_layer_s"] == pytest.approx(29 + 54) and a["measure_layer_how"].startswith("extrapolated")
    p.write_text("\n".join(json.dumps(e) for e in ev[:3]) + "\n")         # attention just started: no estimate
    assert G.analyse_events(p)["measure_layer_s"] is None


def test_targets_and_logit_metrics():
    assert G.Target("x", 0.5, 0.6, ">=").passed is False and G.Target("x", 0.7, 0.6, ">=").passed
    assert G.Target("x", None, 1, "<=").passed is False and G.Target("x", float("nan"), 1.0, "<=").passed is False
    assert G.Target("x", "cuda", "cuda", "==").passed
    a = [torch.randn(5, 11, generator=torch.Generator().manual_seed(0))]
    m = G.logit_metrics(a, [a[0].clone()])
    assert m["max_abs"] == 0 and m["kl_mean"] == 0 and m["top1"] == 1 and m["tokens"] == 5
    b = [a[0] + 0.5]                                            # a constant shift leaves the distribution alone
    m = G.logit_metrics(a, b)
    assert m["max_abs"] == pytest.approx(0.5) and m["kl_mean"] == pytest.approx(0, abs=1e-6) and m["top1"] == 1


def test_wheels_needed_by_the_gpu_image():
    """Of everything the check imports, the GPU image lacks only ExLlamaV2 (pinned); torch is never fetched."""
    need = G.needed_dists()
    assert need["exllamav2"] == "0.3.2" and "torch" in need
    assert {d for d in need if d not in G.GPU_IMAGE_HAS} == {"exllamav2"}
    assert set(G.install_requires()) <= set(need)
