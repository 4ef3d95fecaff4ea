"""llm-compressor GPTQ worker: runs INSIDE .peers/llmc-venv (see setup_llmcompressor.sh), never in the
project's environment. Launched by bench/peers/llmcompressor.py; imports nothing from the project.

    python _llmc_worker.py --src DIR --cal-ids FILE --out-state FILE --out-meta FILE \
        --bits 4 --group-size 64 [--threads N] [--actorder static|none] [--dampening 0.01]

Loads ``src`` in float32 on CPU, runs ``llmcompressor.oneshot`` with one GPTQModifier (symmetric int
weights, group strategy, ``ignore=["lm_head"]``) on exactly the rows of ``--cal-ids`` (int64 [R, L]; fed
as a DataLoader in file order, batch 1, no shuffling or truncation), then writes the dequantized weights
(HF names, float32) to ``--out-state`` and facts to ``--out-meta`` (JSON).

What is exported is what llm-compressor's packed format stores: the scales are rounded to float16
inside the observer (``scale_dtype=float16``, so GPTQ's error feedback already sees the stored scale),
and each quantized weight is rebuilt as ``scale_fp16[row, col // group] * q`` with ``q`` the integer
recovered from GPTQ's fake-quantized weight (checked to be integral and inside the signed range).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings

# This file sits beside bench/peers/llmcompressor.py, which would shadow the real package: drop our dir.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--cal-ids", required=True)
    ap.add_argument("--out-state", required=True)
    ap.add_argument("--out-meta", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--actorder", default="static", choices=["static", "none"])
    ap.add_argument("--dampening", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=128)
    a = ap.parse_args()

    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()

    import importlib.metadata as md

    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from torch.utils.data import DataLoader

    ids = load_file(a.cal_ids)["input_ids"]
    if ids.dtype != torch.int64 or ids.ndim != 2:
        raise SystemExit(f"calibration ids must be int64 [rows, length], got {ids.dtype} {tuple(ids.shape)}")
    rows, length = ids.shape

    # Source tensor names (HF), to export exactly those (tied embedding: no lm_head.weight).
    src_names: list[str] = []
    for f in sorted(os.listdir(a.src)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(a.src, f), "pt") as fh:
                src_names.extend(fh.keys())
    if not src_names:
        raise SystemExit(f"no .safetensors weights in {a.src}")

    model = transformers.AutoModelForCausalLM.from_pretrained(a.src, dtype=torch.float32)
    model.eval()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # Exactly our rows, in order, one per batch: llm-compressor uses a DataLoader as given.
    samples = [{"input_ids": ids[i : i + 1].clone(), "attention_mask": torch.ones(1, length, dtype=torch.int64)}
               for i in range(rows)]
    loader = DataLoader(samples, batch_size=None, shuffle=False)

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=a.bits, type="int", symmetric=True, strategy="group",
                                 group_size=a.group_size, scale_dtype=torch.float16),
    )
    actorder = "static" if a.actorder == "static" else None
    gptq = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], actorder=actorder,
                        dampening_frac=a.dampening, block_size=a.block_size)

    cpu0, t0 = _cpu_s(), time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=[gptq], num_calibration_samples=rows,
            max_seq_length=length, shuffle_calibration_samples=False, output_dir=None)
    quant_wall = time.perf_counter() - t0
    quant_cpu = _cpu_s() - cpu0

    # Rebuild every quantized Linear from the stored representation: fp16 scale * integer q.
    qmin, qmax = -(2 ** (a.bits - 1)), 2 ** (a.bits - 1) - 1
    gs = a.group_size
    deq: dict[str, torch.Tensor] = {}
    max_frac, max_rel_dev = 0.0, 0.0
    observers, actorders = set(), set()
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or not hasattr(mod, "weight_scale"):
            continue
        w = mod.weight.detach().float()
        s = mod.weight_scale.detach()
        s16 = s.to(torch.float16).float()
        if not torch.equal(s.float(), s16):
            raise SystemExit(f"{name}: scale is not float16-representable (scale_dtype ignored?)")
        zp = getattr(mod, "weight_zero_point", None)
        if zp is not None and bool(torch.any(zp != 0)):
            raise SystemExit(f"{name}: non-zero zero point in a symmetric scheme")
        if getattr(mod, "weight_g_idx", None) is not None:
            g = mod.weight_g_idx.detach().long()
            if not torch.equal(g, torch.arange(w.shape[1]) // gs):
                raise SystemExit(f"{name}: non-trivial g_idx (group actorder) is not supported by this exporter")
        if s.shape != (w.shape[0], w.shape[1] // gs):
            raise SystemExit(f"{name}: unexpected scale shape {tuple(s.shape)} for weight {tuple(w.shape)}")
        s_full = s16.repeat_interleave(gs, dim=1)
        qf = w / s_full
        q = torch.round(qf)
        max_frac = max(max_frac, float((qf - q).abs().max()))
        if float(q.min()) < qmin or float(q.max()) > qmax:
            raise SystemExit(f"{name}: integer weights outside [{qmin}, {qmax}]")
        out = s_full * q
        max_rel_dev = max(max_rel_dev, float((out - w).abs().max() / w.abs().max().clamp_min(1e-30)))
        deq[name + ".weight"] = out
        wargs = getattr(getattr(mod, "quantization_scheme", None), "weights", None)
        if wargs is not None:
            observers.add(str(wargs.observer))
            actorders.add(str(wargs.actorder))
    if max_frac > 1e-3:
        raise SystemExit(f"GPTQ output is not on the scale grid (max |q - round(q)| = {max_frac:.3g})")
    if not deq:
        raise SystemExit("llm-compressor quantized no Linear module")

    sd = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for k in src_names:
        t = deq.get(k)
        if t is None:
            if k not in sd:
                raise SystemExit(f"source tensor {k} missing from the quantized model")
            t = sd[k].detach().float()
        state[k] = t.contiguous()
    save_file(state, a.out_state)

    n_q = sum(v.numel() for v in deq.values())
    meta = {
        "version": md.version("llmcompressor"),
        "compressed_tensors": md.version("compressed-tensors"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "quant_wall_s": round(quant_wall, 2),
        "cpu_s": round(quant_cpu, 2),
        "worker_wall_s": round(time.perf_counter() - t_start, 2),
        "worker_cpu_s": round(_cpu_s(), 2),
        "threads": threads,
        "quantized_modules": len(deq),
        "quantized_params": n_q,
        "tied_embeddings": tied,
        "calibration": {"rows": rows, "length": length, "order": "file order, batch 1, no shuffle"},
        "gptq": {
            "actorder": sorted(actorders),
            "dampening_frac": a.dampening,
            "block_size": a.block_size,
            "observer": sorted(observers),
            "rtn_fallback_modules": list(getattr(gptq, "_rtn_fallback_module_names", [])),
        },
        "export_check": {"max_abs_frac_of_q": max_frac, "max_rel_dev_vs_gptq_weight": max_rel_dev},
    }
    with open(a.out_meta, "w") as fh:
        json.dump(meta, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException as e:  # one line for the parent; the traceback goes to stderr first
        import traceback

        traceback.print_exc()
        print(f"llm-compressor worker failed: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(1)
