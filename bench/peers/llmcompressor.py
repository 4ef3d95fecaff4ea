"""llm-compressor (vLLM project) GPTQ as a benchmark peer.

llm-compressor pins its own transformers and pulls datasets/accelerate/auto-round, so it runs in a private
venv (``.peers/llmc-venv``, made by ``bench/peers/setup_llmcompressor.sh``) through the worker
``_llmc_worker.py``; this module runs in the project's python and only launches it.

Schemes: ``W{bits}A16-g{group}`` (e.g. W4A16-g64, W4A16-g192, W8A16-g64): symmetric int weights, one fp16
scale per group of ``group`` input columns, no zero point (llm-compressor's ``pack-quantized`` format),
GPTQ with its default activation ordering ("static" = "weight": columns processed in descending Hessian
diagonal order, groups stay contiguous so no g_idx is stored), dampening 0.01, block 128, min-max
observer. Every ``nn.Linear`` of the decoder is quantized; ``lm_head`` is ignored as in llm-compressor's
usual recipe (SmolLM2 ties it to the embedding, which is never quantized, so it stays FP16 either way).
The group size must divide every linear's input width (576 and 1536 on SmolLM2: 64 or 192, not 128).

    python bench/peers/llmcompressor.py --src DIR --cal CALDIR --out DIR --scheme W4A16-g64
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("LLMC_VENV", ROOT / ".peers" / "llmc-venv"))
WORKER = Path(__file__).resolve().with_name("_llmc_worker.py")
SETUP = "bench/peers/setup_llmcompressor.sh"
SCALE_BITS = 16  # fp16 scale per group; symmetric, so no zero point is stored

_SCHEME = re.compile(r"^W(\d)A16-g(\d+)$")


def _python() -> Path:
    return VENV / "bin" / "python"


def available() -> str | None:
    """None when the llm-compressor venv works, else a one-line reason."""
    py = _python()
    if not py.is_file():
        return f"llm-compressor venv missing at {VENV}: run {SETUP}"
    try:
        r = subprocess.run([str(py), "-c", "import importlib.metadata as m, llmcompressor, torch; "
                            "print(m.version('llmcompressor'), torch.__version__)"],
                           capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"llm-compressor venv at {VENV} does not run ({type(e).__name__}): re-run {SETUP}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"llm-compressor does not import in {VENV} ({last}): re-run {SETUP}"
    return None


def parse_scheme(scheme: str) -> tuple[int, int]:
    m = _SCHEME.match(scheme)
    if not m:
        raise ValueError(f"scheme {scheme!r} not understood: expected W<bits>A16-g<group>, e.g. W4A16-g64")
    bits, gs = int(m.group(1)), int(m.group(2))
    if not 2 <= bits <= 8 or gs <= 0:
        raise ValueError(f"scheme {scheme!r}: bits must be 2..8 and the group size positive")
    return bits, gs


def _check_group_size(src: Path, gs: int) -> None:
    cfg = json.loads((src / "config.json").read_text())
    widths = {cfg.get("hidden_size"), cfg.get("intermediate_size")} - {None}
    bad = sorted(w for w in widths if w % gs)
    if bad:
        raise ValueError(f"group size {gs} does not divide the linear input widths {bad} of {src.name}; "
                         f"llm-compressor refuses it")


def run(src, cal_dir, out, scheme: str, *, threads: int | None = None, actorder: str = "static",
        dampening: float = 0.01, timeout_s: float | None = None) -> dict:
    """Quantize ``src`` with llm-compressor GPTQ on the rows of ``cal_dir`` and write the dequantized
    weights to ``out`` (see bench.peers.write_checkpoint). Returns the meta written to ``out/peer.json``."""
    from safetensors.torch import load_file

    from bench.peers import write_checkpoint

    src, cal_dir, out = Path(src), Path(cal_dir), Path(out)
    bits, gs = parse_scheme(scheme)
    _check_group_size(src, gs)
    reason = available()
    if reason:
        raise RuntimeError(reason)
    ids = cal_dir / "input_ids.safetensors"
    if not ids.is_file():
        raise FileNotFoundError(f"{ids} missing (make it with bench.peers.make_cal_dir)")
    threads = threads or int(os.environ.get("PEER_THREADS", 0)) or (os.cpu_count() or 1)

    with tempfile.TemporaryDirectory(prefix="llmc.") as tmp:
        state_f, meta_f, log_f = Path(tmp, "state.safetensors"), Path(tmp, "meta.json"), Path(tmp, "worker.log")
        cmd = [str(_python()), "-P", str(WORKER), "--src", str(src), "--cal-ids", str(ids),
               "--out-state", str(state_f), "--out-meta", str(meta_f), "--bits", str(bits),
               "--group-size", str(gs), "--threads", str(threads), "--actorder", actorder,
               "--dampening", str(dampening)]
        env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
                   OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        env.pop("PYTHONPATH", None)  # the worker must see only its venv
        t0 = time.perf_counter()
        with open(log_f, "w") as log:
            try:
                r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"llm-compressor worker timed out after {timeout_s} s") from None
        wall = time.perf_counter() - t0
        if r.returncode != 0 or not meta_f.is_file():
            lines = [ln for ln in log_f.read_text(errors="replace").splitlines() if ln.strip()]
            keep = os.environ.get("PEER_KEEP_LOG")
            if keep:
                Path(keep).write_text(log_f.read_text(errors="replace"))
            raise RuntimeError(lines[-1] if lines else f"llm-compressor worker exited {r.returncode}")
        w = json.loads(meta_f.read_text())
        state = load_file(str(state_f))

    g = w["gptq"]
    meta = {
        "tool": "llm-compressor",
        "version": w["version"],
        "scheme": scheme,
        # per decoder linear weight: the int code plus one fp16 scale per group (symmetric: no zero point)
        "bpw": bits + SCALE_BITS / gs,
        "quant_wall_s": w["quant_wall_s"],
        "cpu_s": w["cpu_s"],
        "threads": w["threads"],
        "details": {
            "method": "GPTQ (llmcompressor.oneshot + GPTQModifier), float32 on CPU",
            "weights": f"int{bits} symmetric, group {gs} along input columns, fp16 scale = max|w|/"
                       f"{(2 ** bits - 1) / 2:g}, codes in [{-2 ** (bits - 1)}, {2 ** (bits - 1) - 1}]",
            "actorder": g["actorder"],
            "dampening_frac": g["dampening_frac"],
            "block_size": g["block_size"],
            "observer": g["observer"],
            "rtn_fallback_modules": g["rtn_fallback_modules"],
            "ignore": ["lm_head"],
            "tied_embeddings": w["tied_embeddings"],
            "unquantized": "embedding (= tied lm_head), norms",
            "quantized_modules": w["quantized_modules"],
            "calibration": w["calibration"],
            "export": "dequantized fp16_scale * int code, rebuilt from the in-memory GPTQ result",
            "export_check": w["export_check"],
            "compressed_tensors": w["compressed_tensors"],
            "transformers": w["transformers"],
            "torch": w["torch"],
            "worker_wall_s": w["worker_wall_s"],
            "worker_cpu_s": w["worker_cpu_s"],
            "total_wall_s": round(wall, 2),
        },
    }
    write_checkpoint(src, state, out, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="llm-compressor GPTQ peer: quantize, write dequantized checkpoint")
    ap.add_argument("--src", required=True)
    ap.add_argument("--cal", required=True, help="calibration dir (bench.peers.make_cal_dir)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scheme", default="W4A16-g64")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--actorder", default="static", choices=["static", "none"])
    ap.add_argument("--dampening", type=float, default=0.01)
    a = ap.parse_args(argv)
    try:
        meta = run(a.src, a.cal, a.out, a.scheme, threads=a.threads, actorder=a.actorder, dampening=a.dampening)
    except Exception as e:  # one line, non-zero exit
        print(f"error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
