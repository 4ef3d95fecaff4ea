"""Conversion at scale on this machine: peak memory vs depth, time per decoder layer, whole-model projections.

    python bench/bench_scaling.py [--parts mem,full,time7,time72,smol,smoldefault] [--write]

Parts (each writes ``OUT/<part>.json``; ``--write`` composes the section from every JSON in OUT, so parts
may run separately, e.g. the slow ones in the background):

* ``mem``: synthetic Qwen2-7B-shaped checkpoints (random N(0, 0.02) fp16 weights, vocabulary 1024) of
  ``--depths`` layers; ``run_measurement`` in a fresh subprocess each, with the option tables restricted
  to ``RESTRICTED`` (written in the section); peak RSS (VmHWM), peak anonymous and file-backed RSS (sampled
  every 20 ms from /proc/self/status) per depth.
* ``full``: the same on one layer with the full option tables (19 + 17 combinations): the true per-layer peak.
* ``layer7`` / ``layer72``: one Qwen2-7B- / 72B-shaped layer measured in a fresh subprocess (``--threads``
  torch threads) on ``--mem-rows`` x ``--mem-length`` tokens, with the full option tables or, with
  ``--layer-restricted``, the ``RESTRICTED`` ones: peak RSS (anonymous and file-backed), wall and CPU time,
  and the same per module.  These go to their own section (``bench_scaling_layer``), which ends with a link
  to the hand-written reading in ``DECISION``.
* ``time7`` / ``time72``: one Qwen2-7B- / 72B-shaped layer: GPTQ seconds per projection shape for a few
  options, ``gptq.prepare`` per Hessian size, and the module forward / Hessian collection per token; then
  whole-model measurement and quantization time projected from the option counts of the tables.
* ``smol``: SmolLM2-135M, the demo preset (``-b 4.0 -mr 8 -ml 512 -r 16 -l 512``): stage times from
  ``--status-json`` and peak RSS of the whole conversion.
* ``smoldefault``: SmolLM2-135M measurement only (``-om``) with the default 16 x 2048 measurement rows.

The section ends with a link to the hand-written reading and its decision (``DECISION``, in docs/decisions/).

Every timing reports wall and process CPU seconds: the machine is shared, CPU seconds are the steadier.
A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DECISION = "docs/decisions/0002-measurement-memory.md"   # the hand-written reading of both sections
sys.path.insert(0, str(REPO))

from bench.report import header, write_section  # noqa: E402

SHAPES = {   # Qwen2 config facts (config.json of Qwen/Qwen2-7B and Qwen/Qwen2-72B)
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4, layers=28),
    "72b": dict(hidden_size=8192, intermediate_size=29568, num_attention_heads=64, num_key_value_heads=8, layers=80),
}
VOCAB = 1024
RESTRICTED = {"self_attn": (6,), "mlp": (7,)}   # combination indices kept in the memory-vs-depth runs
MEAS_ROWS, MEAS_LEN = 16, 2048      # exl2-convert defaults: measurement rows x length
QUANT_ROWS, QUANT_LEN = 100, 2048   # exl2-convert defaults: quantization rows x length
MAIN_PARTS = ("mem", "full", "time7", "time72", "smol", "smoldefault")   # the bench_scaling section's parts


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timer:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), cpu_self()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, cpu_self() - self.c


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0])
    return out


class RssSampler(threading.Thread):
    """Samples /proc/self/status every ``period`` s; keeps the peaks of anonymous and file-backed RSS."""

    def __init__(self, period: float = 0.02):
        super().__init__(daemon=True)
        self.period, self.peak_anon, self.peak_file, self._halt = period, 0, 0, threading.Event()
        self.phase_anon = 0

    def run(self):
        while not self._halt.is_set():
            s = proc_status()
            self.peak_anon = max(self.peak_anon, s["RssAnon"])
            self.phase_anon = max(self.phase_anon, s["RssAnon"])
            self.peak_file = max(self.peak_file, s["RssFile"])
            self._halt.wait(self.period)

    def take_phase_peak(self) -> int:
        """The anonymous peak since the last call (KiB), then start a new phase."""
        peak = max(self.phase_anon, proc_status()["RssAnon"])
        self.phase_anon = 0
        return peak

    def stop(self):
        self._halt.set()
        self.join()


def gib(kib: float) -> float:
    return kib / 2**20


def build_synthetic_qwen2(out_dir: Path, shape: str, layers: int, seed: int = 0) -> Path:
    """A Qwen2 checkpoint of ``layers`` decoder layers with ``shape``'s dimensions: N(0, 0.02) fp16 weights
    and biases, norms U(0.9, 1.1), vocabulary 1024 (so the embedding and head stay small)."""
    from safetensors.torch import save_file

    s = SHAPES[shape]
    C, I, H, Hkv = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
    D = C // H
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": C, "intermediate_size": I,
           "num_attention_heads": H, "num_key_value_heads": Hkv, "num_hidden_layers": layers, "vocab_size": VOCAB,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "hidden_act": "silu",
           "tie_word_embeddings": False, "torch_dtype": "float16"}
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape_):
        return (torch.randn(*shape_, generator=g) * 0.02).half()

    def norm(n):
        return (torch.rand(n, generator=g) * 0.2 + 0.9).half()

    t = {"model.embed_tokens.weight": rnd(VOCAB, C), "model.norm.weight": norm(C), "lm_head.weight": rnd(VOCAB, C)}
    for i in range(layers):
        p = f"model.layers.{i}"
        t.update({f"{p}.input_layernorm.weight": norm(C), f"{p}.post_attention_layernorm.weight": norm(C),
                  f"{p}.self_attn.q_proj.weight": rnd(H * D, C), f"{p}.self_attn.q_proj.bias": rnd(H * D),
                  f"{p}.self_attn.k_proj.weight": rnd(Hkv * D, C), f"{p}.self_attn.k_proj.bias": rnd(Hkv * D),
                  f"{p}.self_attn.v_proj.weight": rnd(Hkv * D, C), f"{p}.self_attn.v_proj.bias": rnd(Hkv * D),
                  f"{p}.self_attn.o_proj.weight": rnd(C, H * D),
                  f"{p}.mlp.gate_proj.weight": rnd(I, C), f"{p}.mlp.up_proj.weight": rnd(I, C),
                  f"{p}.mlp.down_proj.weight": rnd(C, I)})
    save_file(t, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    return out_dir


def restrict_options(keep: dict[str, tuple[int, ...]]) -> None:
    """Restrict the combination tables the measurement pass iterates (the bench's memory runs only)."""
    from exl2.measure import measure as M

    M.MODULES = tuple(replace(s, options=[s.options[i] for i in keep[s.kind]]) for s in M.MODULES)


# ------------------------------------------------------------------------------------------------
# child: one measurement in a fresh process
# ------------------------------------------------------------------------------------------------

def child_measure(args) -> int:
    from exl2.measure.measure import run_measurement

    if args.restricted:
        restrict_options(RESTRICTED)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (args.rows, args.length))
    sampler = RssSampler()
    sampler.start()
    layer_times = []
    last = [time.perf_counter(), cpu_self()]

    def progress(done, total):
        now = [time.perf_counter(), cpu_self()]
        layer_times.append({"layer": done - 1, "wall_s": now[0] - last[0], "cpu_s": now[1] - last[1],
                            "rss_kib": proc_status()["VmRSS"]})
        last[:] = now

    modules = []            # per module: wall, CPU and the anonymous peak while it ran (from the status events)
    mark = [time.perf_counter(), cpu_self()]

    def status(ev):
        if ev.get("option") is not None and ev["option"] + 1 == ev["of"]:      # a module's last combination
            now = [time.perf_counter(), cpu_self()]
            modules.append({"module": ev["module"], "wall_s": now[0] - mark[0], "cpu_s": now[1] - mark[1],
                            "peak_anon_kib": sampler.take_phase_peak()})
            mark[:] = now

    with Timer() as t:
        run_measurement(args.model, ids, args.work, progress=progress, status=status)
    sampler.stop()
    st = proc_status()
    res = {"wall_s": t.wall, "cpu_s": t.cpu, "vmhwm_kib": st["VmHWM"], "peak_anon_kib": sampler.peak_anon,
           "peak_file_kib": sampler.peak_file, "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           "layers": layer_times, "modules": modules, "rows": args.rows, "length": args.length,
           "restricted": args.restricted, "threads": torch.get_num_threads()}
    Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


def run_child(model: Path, work: Path, rows: int, length: int, restricted: bool, out_json: Path,
              threads: int = 0) -> dict:
    cmd = [sys.executable, __file__, "_child", "--model", str(model), "--work", str(work), "--rows", str(rows),
           "--length", str(length), "--json", str(out_json), "--threads", str(threads)] + (
        ["--restricted"] if restricted else [])
    subprocess.run(cmd, check=True)
    return json.loads(out_json.read_text())


def part_mem(args, out: Path, full: bool = False) -> dict:
    import shutil

    res = {"rows": args.mem_rows, "length": args.mem_length, "runs": []}
    for depth in ([1] if full else args.depths):
        model = build_synthetic_qwen2(out / "ckpt" / f"7b-{depth}", "7b", depth)
        work = out / "work" / f"mem-{'full' if full else 'r'}-{depth}"
        shutil.rmtree(work, ignore_errors=True)
        r = run_child(model, work, args.mem_rows, args.mem_length, not full, out / f"child-{depth}.json")
        r["depth"] = depth
        res["runs"].append(r)
        print(f"depth {depth}: VmHWM {gib(r['vmhwm_kib']):.2f} GiB, anon {gib(r['peak_anon_kib']):.2f} GiB, "
              f"file {gib(r['peak_file_kib']):.2f} GiB, {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return res


def part_layer(args, out: Path, shape: str) -> dict:
    """One ``shape`` layer measured (full or restricted option tables): the per-layer peak and time."""
    import shutil

    model = build_synthetic_qwen2(out / "ckpt" / f"{shape}-1", shape, 1)
    work = out / "work" / f"layer-{shape}"
    shutil.rmtree(work, ignore_errors=True)
    r = run_child(model, work, args.mem_rows, args.mem_length, args.layer_restricted,
                  out / f"child-layer-{shape}.json", args.threads)
    shutil.rmtree(work, ignore_errors=True)
    r.update(shape=shape, conditions=args.conditions)
    print(f"{shape} layer: VmHWM {gib(r['vmhwm_kib']):.2f} GiB, anon {gib(r['peak_anon_kib']):.2f} GiB, "
          f"{r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU", flush=True)
    return r


def report_layer(out: Path) -> str | None:
    """The ``bench_scaling_layer`` section from layer7.json / layer72.json (None when neither exists)."""
    from exl2.quant_kernels.qparams import ATTN_OPTIONS, MLP_OPTIONS, distinct_options

    runs = [json.loads((out / f"{n}.json").read_text()) for n in ("layer7", "layer72") if (out / f"{n}.json").exists()]
    if not runs:
        return None
    cmds = []
    for n in ("layer7", "layer72"):
        m = out / f"meta-{n}.json"
        if m.exists():
            cmds.append(json.loads(m.read_text())["command"])
    def gptq_calls(tables) -> int:      # one per distinct option of each projection
        return sum(len(o) for t in tables for o in distinct_options(t))

    cut = [[ATTN_OPTIONS[i] for i in RESTRICTED["self_attn"]], [MLP_OPTIONS[i] for i in RESTRICTED["mlp"]]]
    tables = {False: f"full tables: {len(ATTN_OPTIONS)} attention + {len(MLP_OPTIONS)} MLP combinations, "
                     f"{gptq_calls([ATTN_OPTIONS, MLP_OPTIONS])} GPTQ calls",
              True: f"restricted: attention {RESTRICTED['self_attn']} + MLP {RESTRICTED['mlp']}, "
                    f"{gptq_calls(cut)} GPTQ calls"}
    L = header("One decoder layer measured: peak memory and time (bench/bench_scaling.py)", "; ".join(cmds),
               f", {os.cpu_count()} cores, "
               f"{gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024):.0f} GiB RAM") + [
         f"`run_measurement` on a synthetic Qwen2 checkpoint of one decoder layer (random N(0, 0.02) fp16 weights, "
         f"vocabulary {VOCAB}), in a fresh subprocess on random token rows, with the option tables named per run. "
         "VmHWM is the kernel's peak RSS; anon/file are the peaks of RssAnon/RssFile sampled every 20 ms (file: "
         "pages of the memory-mapped checkpoint and of the spilled variants, reclaimable). The per-module peak is "
         "the anonymous peak while that module was measured (its Hessians, `gptq.prepare`, its GPTQ calls and "
         "combinations).", "",
         "| shape | options | rows x tokens | threads | VmHWM GiB | peak anon GiB | peak file GiB | wall s | CPU s "
         "| run conditions |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        L.append(f"| Qwen2-{r['shape'].upper()} | {tables[bool(r['restricted'])]} | {r['rows']} x {r['length']} | "
                 f"{r['threads']} | {gib(r['vmhwm_kib']):.2f} | {gib(r['peak_anon_kib']):.2f} | "
                 f"{gib(r['peak_file_kib']):.2f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r.get('conditions') or ''} |")
    L += ["", "| shape | module | wall s | CPU s | peak anon GiB |", "|---|---|---:|---:|---:|"]
    for r in runs:
        for m in r.get("modules", []):
            L.append(f"| Qwen2-{r['shape'].upper()} | {m['module'].split('.')[-1]} | {m['wall_s']:.0f} | "
                     f"{m['cpu_s']:.0f} | {gib(m['peak_anon_kib']):.2f} |")
    L.append("")
    L += [f"Reading and decision: {DECISION}.", ""]
    return "\n".join(L)


# ------------------------------------------------------------------------------------------------
# per-layer timings
# ------------------------------------------------------------------------------------------------

def time_options():
    from exl2.quant_kernels.qparams import QParams

    return {"4b_128g": QParams.make(128, [4], [1.0]), "8b_128g": QParams.make(128, [8], [1.0]),
            "mixed 0.1:4b/0.9:3b g128": QParams.make(128, [4, 3], [0.1, 0.9])}


def part_time(args, out: Path, shape: str) -> dict:
    """GPTQ per projection shape, prepare per Hessian size, forward/collect per token, for one layer."""
    from exl2.layers.stream import MODULES, collect, embed_rows, linears, run_module
    from exl2.measure.measure import MEASURE_STRIDE, sample_positions
    from exl2.quant_kernels import gptq
    from exl2.quant_kernels.qparams import distinct_options
    from exl2.runtime.loader import ModelParts
    from exl2.runtime.model import Rotary

    model = build_synthetic_qwen2(out / "ckpt" / f"{shape}-1", shape, 1)
    parts = ModelParts(model)
    block = parts.block(0)
    L = args.time_length
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, L))
    x = embed_rows(parts, ids)
    cos, sin = Rotary(parts.cfg).cos_sin(0, L)
    res = {"shape": shape, "tokens": L, "modules": {}, "gptq": {}, "prepare": {}, "distinct": {}, "combos": {}}
    opts = time_options()
    only = set(args.gptq_shapes.split(",")) if args.gptq_shapes else None
    for spec in MODULES:
        with Timer() as tc:
            H, _ = collect(block, spec, x, cos, sin, "cpu")
        with Timer() as tf, torch.no_grad():
            for xi in x:
                run_module(block, spec, xi, cos, sin)
        # the measurement's combination passes at its default stride (errors on every 4th token)
        pos = sample_positions(L, MEASURE_STRIDE)
        with Timer() as ts, torch.no_grad():
            for xi in x:
                run_module(block, spec, xi, cos, sin, pos)
        res["modules"][spec.kind] = {"collect_wall_s": tc.wall, "collect_cpu_s": tc.cpu,
                                     "forward_wall_s": tf.wall, "forward_cpu_s": tf.cpu,
                                     "sampled_wall_s": ts.wall, "sampled_cpu_s": ts.cpu}
        res["combos"][spec.kind] = len(spec.options)
        print(spec.kind, res["modules"][spec.kind], flush=True)
        layers = linears(block, spec)
        prepared = {}
        for p, owner in spec.hessian_of.items():
            if owner in prepared:
                continue
            k = layers[owner].in_features
            with Timer() as tp:
                prepared[owner] = gptq.prepare(H[owner])
            res["prepare"][f"{owner} K={k}"] = {"wall_s": tp.wall, "cpu_s": tp.cpu, "projections": owner}
            print("prepare", k, tp.wall, tp.cpu, flush=True)
        del H
        for p, dopts in zip(spec.projections, distinct_options(spec.options)):
            m = layers[p]
            key = f"{m.in_features}x{m.out_features}"
            res["distinct"][p] = {"shape": key, "options": len(dopts)}
            if key in res["gptq"] or (only is not None and p not in only):
                continue
            res["gptq"][key] = {}
            w = m.weight.data.float()
            b = None if m.bias is None else m.bias.data.float()
            for name, qp in opts.items():
                if args.gptq_options and name not in args.gptq_options.split(";"):
                    continue
                with Timer() as tq:
                    gptq.quantize(w, qp, prepared[spec.hessian_of[p]], b)
                res["gptq"][key][name] = {"wall_s": tq.wall, "cpu_s": tq.cpu}
                print("gptq", p, key, name, round(tq.wall, 1), round(tq.cpu, 1), flush=True)
            del w
        del prepared, layers
    return res


def project(t: dict, shape: str, sampled: bool = False) -> dict:
    """Whole-model projections from a per-layer timing (CPU seconds; see the section for the method); with
    ``sampled`` the measurement's combination passes are the timed sampled forwards (the default
    ``--measure-stride``), else full ones."""
    tok = t["tokens"]
    n_layers = SHAPES[shape]["layers"]

    def gptq_mean(key, field="cpu_s"):
        v = [o[field] for o in t["gptq"].get(key, {}).values()]
        return sum(v) / len(v) if v else None

    out = {}
    for field in ("cpu_s", "wall_s"):
        fw = field.replace("_s", "")
        prep = sum(p[field] for p in t["prepare"].values())
        g_meas, g_quant, missing = 0.0, 0.0, []
        for p, d in t["distinct"].items():
            m = gptq_mean(d["shape"], field)
            if m is None:
                missing.append(p)
                continue
            g_meas += d["options"] * m
            g_quant += m
        fwd_tok = {k: v[f"forward_{fw}_s"] / tok for k, v in t["modules"].items()}
        combo_tok = {k: v[f"sampled_{fw}_s"] / tok for k, v in t["modules"].items()} if sampled else fwd_tok
        col_tok = {k: v[f"collect_{fw}_s"] / tok for k, v in t["modules"].items()}
        mt, qt = MEAS_ROWS * MEAS_LEN, QUANT_ROWS * QUANT_LEN
        meas = sum(col_tok[k] * mt + t["combos"][k] * combo_tok[k] * mt for k in fwd_tok) + prep + g_meas
        quant = sum(col_tok[k] * qt + fwd_tok[k] * qt for k in fwd_tok) + prep + g_quant
        out[field] = {"measure_layer_s": meas, "quant_layer_s": quant, "measure_model_h": meas * n_layers / 3600,
                      "quant_model_h": quant * n_layers / 3600, "gptq_measure_layer_s": g_meas,
                      "forward_measure_layer_s": meas - g_meas - prep, "missing": missing}
    return out


def dims(shape: str) -> dict:
    s = SHAPES[shape]
    C, I, H, Hkv = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
    D = C // H
    return {"q_proj": (C, H * D), "k_proj": (C, Hkv * D), "v_proj": (C, Hkv * D), "o_proj": (H * D, C),
            "gate_proj": (C, I), "up_proj": (C, I), "down_proj": (I, C)}


def scale_timing(t: dict, src: str, dst: str) -> dict:
    """A per-layer timing of shape ``src`` rescaled to shape ``dst`` by operation counts: forward per token
    by the module's weight count, Hessian accumulation (collect - forward) by sum K^2 of its Hessians,
    ``prepare`` by K^3, a GPTQ call by K^2 N (the error-feedback updates; the scale search is K N)."""
    a, b = dims(src), dims(dst)
    mods = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
    owners = {"self_attn": ("q_proj", "o_proj"), "mlp": ("gate_proj", "down_proj")}
    out = {"shape": dst, "tokens": t["tokens"], "modules": {}, "gptq": {}, "prepare": {}, "distinct": {},
           "combos": t["combos"], "scaled_from": src}
    for kind, v in t["modules"].items():
        wr = sum(b[p][0] * b[p][1] for p in mods[kind]) / sum(a[p][0] * a[p][1] for p in mods[kind])
        hr = sum(b[p][0] ** 2 for p in owners[kind]) / sum(a[p][0] ** 2 for p in owners[kind])
        out["modules"][kind] = {}
        for f in ("wall", "cpu"):
            fw, col = v[f"forward_{f}_s"], v[f"collect_{f}_s"]
            out["modules"][kind][f"forward_{f}_s"] = fw * wr
            out["modules"][kind][f"collect_{f}_s"] = fw * wr + max(col - fw, 0.0) * hr
    for key, v in t["prepare"].items():
        owner = v["projections"]
        r = (b[owner][0] / a[owner][0]) ** 3
        out["prepare"][f"{owner} K={b[owner][0]}"] = {"wall_s": v["wall_s"] * r, "cpu_s": v["cpu_s"] * r,
                                                      "projections": owner}
    for p, d in t["distinct"].items():
        (ka, na), (kb, nb) = a[p], b[p]
        key = f"{kb}x{nb}"
        out["distinct"][p] = {"shape": key, "options": d["options"]}
        src_t = t["gptq"].get(d["shape"])
        if src_t and key not in out["gptq"]:
            r = (kb * kb * nb) / (ka * ka * na)
            out["gptq"][key] = {n: {"wall_s": x["wall_s"] * r, "cpu_s": x["cpu_s"] * r} for n, x in src_t.items()}
    return out


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M
# ------------------------------------------------------------------------------------------------

def run_convert(args_list: list[str], log: Path) -> dict:
    """exl2-convert in a child; stage seconds from --status-json, wall/CPU/peak RSS from rusage."""
    cmd = ["exl2-convert", *args_list, "--status-json"]
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    events = []
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:
            f.write(line)
            try:
                e = json.loads(line)
            except ValueError:
                continue
            e["_t"] = time.perf_counter() - t0
            events.append(e)
        rc = p.wait()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    stages: dict[str, float] = {}
    prev_t = 0.0
    for e in events:        # time between consecutive events is charged to the stage of the later event
        st = e.get("stage", "?")
        stages[st] = stages.get(st, 0.0) + e["_t"] - prev_t
        prev_t = e["_t"]
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": time.perf_counter() - t0,
            "cpu_s": (ru.ru_utime - before.ru_utime) + (ru.ru_stime - before.ru_stime),
            "maxrss_kib": ru.ru_maxrss, "stages_wall_s": stages}


def part_smol(args, out: Path, default: bool) -> dict:
    import shutil

    from fixtures.smollm2 import build_smollm2

    src = build_smollm2()
    work = out / "work" / ("smol-om" if default else "smol-demo")
    shutil.rmtree(work, ignore_errors=True)
    if default:
        a = ["-i", str(src), "-o", str(work), "-om", str(out / "smol-measurement.json")]
    else:
        a = ["-i", str(src), "-o", str(work), "-b", "4.0", "-mr", "8", "-ml", "512", "-r", "16", "-l", "512"]
    r = run_convert(a, out / f"smol-{'default' if default else 'demo'}.log")
    job = work / "job.json"
    if job.exists():
        r["job"] = json.loads(job.read_text())
    print(json.dumps({k: v for k, v in r.items() if k != "job"}, indent=1), flush=True)
    return r


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def report(out: Path) -> str:
    from exl2.quant_kernels.qparams import ATTN_OPTIONS, MLP_OPTIONS

    def load(name):
        p = out / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    meta = load("meta") or {}
    L = ["## Conversion at scale: memory vs depth, time per layer, projections (bench/bench_scaling.py)", "",
         f"Command: `{meta.get('command', 'python bench/bench_scaling.py --write')}`  ",
         f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average 8-12 during "
         f"the runs), {gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024):.0f} GiB RAM, "
         f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU only  ",
         f"Date: {meta.get('date', datetime.date.today())}", "",
         "Wall seconds depend on what else ran on the two cores; CPU seconds (user + system of the process) are "
         "the steadier number and the one the projections use.", ""]
    mem, full = load("mem"), load("full")
    if mem or full:
        L += ["### Peak memory of the measurement pass vs depth (synthetic Qwen2-7B-shaped stacks)", "",
              "Checkpoints: hidden 3584, intermediate 18944, 28 heads / 4 KV heads, head_dim 128, q/k/v biases, "
              "N(0, 0.02) fp16 weights, vocabulary 1024; `run_measurement` in a fresh subprocess per depth on "
              "random token rows. VmHWM is the kernel's peak RSS; anon/file are peaks of RssAnon/RssFile sampled "
              "every 20 ms (file = pages of the memory-mapped checkpoint and spill files, reclaimable).", ""]
        if mem:
            ra = [ATTN_OPTIONS[i] for i in RESTRICTED["self_attn"]]
            rm = [MLP_OPTIONS[i] for i in RESTRICTED["mlp"]]
            L += [f"Restricted runs: {mem['rows']} rows x {mem['length']} tokens; combination tables cut to one "
                  f"combination per module: attention {list(RESTRICTED['self_attn'])} "
                  f"({' / '.join(q.desc() for q in ra[0])}) and MLP {list(RESTRICTED['mlp'])} "
                  f"({' / '.join(q.desc() for q in rm[0])}): 7 GPTQ calls per layer instead of 97 (13-15 distinct "
                  f"options per projection). Every layer runs the same code, so the cut changes the time and the "
                  f"variant store's share, not how memory behaves over depth.", ""]
        L += ["| run | layers | rows x tokens | VmHWM GiB | peak anon GiB | peak file GiB | wall s | CPU s | CPU s / layer |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for name, d in (("restricted options", mem), ("all 36 combinations", full)):
            for r in (d or {}).get("runs", []):
                per = [x["cpu_s"] for x in r["layers"]]
                L.append(f"| {name} | {r['depth']} | {r['rows']} x {r['length']} | {gib(r['vmhwm_kib']):.2f} | "
                         f"{gib(r['peak_anon_kib']):.2f} | {gib(r['peak_file_kib']):.2f} | {r['wall_s']:.0f} | "
                         f"{r['cpu_s']:.0f} | {', '.join(f'{c:.0f}' for c in per)} |")
        for d in (mem, full):
            for r in (d or {}).get("runs", []):
                if r.get("layer_peak_anon_kib"):
                    L.append("")
                    L.append(f"Peak anonymous RSS per layer in the {r['depth']}-layer run (external 2 s samples of "
                             f"/proc/PID/status, split at the layer checkpoints): " + ", ".join(
                                 f"layer {i}: {gib(v):.2f} GiB" for i, v in enumerate(r["layer_peak_anon_kib"])) + ".")
                if r.get("note"):
                    L += ["", r["note"]]
        L.append("")
    for shape in ("7b", "72b"):
        t = load(f"time{shape[:-1]}")
        if not t and shape == "72b" and load("time7"):
            t = scale_timing(load("time7"), "7b", "72b")
        if not t:
            continue
        pr = project(t, shape)
        n = SHAPES[shape]["layers"]
        how = (f"One layer; module forward and Hessian collection timed on 1 row x {t['tokens']} tokens and scaled "
               f"per token. `gptq.prepare` (act-order, damping, Cholesky inverse) once per Hessian."
               + (f" Run conditions: {t['conditions']}." if t.get("conditions") else ""))
        if t.get("scaled_from"):
            how = ("**Not measured: the 7B layer's timings rescaled by operation counts** "
                   "(`scale_timing`: forward by weight count, Hessian accumulation by sum K^2, prepare by K^3, a GPTQ "
                   "call by K^2 N). A measured 72B layer did not fit this session: its 29568^2 down_proj Hessian "
                   "(3.5 GB fp32) passed through `gptq.prepare`, which then held ~7 such matrices at once (~24 GB), "
                   "on a shared 24 GiB machine; `gptq.prepare` now keeps at most 2 besides the caller's Hessian "
                   "(~10.5 GB at this K), not yet re-measured here.")
        L += [f"### Time per decoder layer, Qwen2-{shape.upper()}-shaped (synthetic, random weights)", "",
              how, "",
              "| step | wall s | CPU s |", "|---|---:|---:|"]
        for k, v in t["modules"].items():
            L.append(f"| {k} collect (forward + Hessians), {t['tokens']} tokens | {v['collect_wall_s']:.1f} | "
                     f"{v['collect_cpu_s']:.1f} |")
            L.append(f"| {k} forward, {t['tokens']} tokens | {v['forward_wall_s']:.1f} | {v['forward_cpu_s']:.1f} |")
        for k, v in t["prepare"].items():
            L.append(f"| prepare {k} ({v['projections']}) | {v['wall_s']:.1f} | {v['cpu_s']:.1f} |")
        for key, o in t["gptq"].items():
            for name, v in o.items():
                L.append(f"| GPTQ K x N = {key}, {name} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} |")
        L += ["", "Distinct options per projection (from the tables; each is one GPTQ call in the measurement): " +
              ", ".join(f"{p} {d['options']}" for p, d in t["distinct"].items()) + ".", ""]
        c, w = pr["cpu_s"], pr["wall_s"]
        miss = f" (no GPTQ timing for {', '.join(c['missing'])}: left out of the sums)" if c["missing"] else ""
        L += ["Projection (per layer, then x " f"{n} layers): measurement = collect on 16 x 2048 tokens + 19 attention and "
              "17 MLP forwards on 16 x 2048 tokens (one per combination) + prepare + (distinct options x mean GPTQ "
              "time of that shape); quantization = collect + one forward on 100 x 2048 tokens + prepare + one GPTQ "
              "per projection (the defaults -mr 16 -ml 2048 -r 100 -l 2048). Forward and collect cost scale "
              f"linearly in tokens from the timed {t['tokens']}-token row (attention's quadratic part at 2048 is "
              f"a few % of the layer at these widths). GPTQ time per call is taken as the mean of "
              f"the timed options of that shape (the table shows their spread){miss}.", "",
              "| | measurement / layer | of which GPTQ | quantization / layer | whole model: measurement | whole model: quantization |",
              "|---|---:|---:|---:|---:|---:|",
              f"| CPU | {c['measure_layer_s']:.0f} s | {c['gptq_measure_layer_s']:.0f} s | {c['quant_layer_s']:.0f} s | "
              f"{c['measure_model_h']:.1f} h | {c['quant_model_h']:.1f} h |",
              f"| wall (as measured{', contended' if 'contended' in t.get('conditions', 'contended') else ''}) | {w['measure_layer_s']:.0f} s | {w['gptq_measure_layer_s']:.0f} s | "
              f"{w['quant_layer_s']:.0f} s | {w['measure_model_h']:.1f} h | {w['quant_model_h']:.1f} h |", ""]
    for name, title in (("smol", "SmolLM2-135M, demo preset: `exl2-convert -b 4.0 -mr 8 -ml 512 -r 16 -l 512`"),
                        ("smoldefault", "SmolLM2-135M, measurement only at the defaults (`-om`, 16 x 2048)")):
        r = load(name)
        if not r:
            continue
        L += [f"### {title}", "", f"`{r['cmd']}` (exit {r['rc']}): wall {r['wall_s']:.0f} s, CPU {r['cpu_s']:.0f} s, "
              f"peak RSS {gib(r['maxrss_kib']):.2f} GiB.", ""]
        if r.get("stages_wall_s"):
            L += ["| stage (from --status-json events) | wall s |", "|---|---:|"]
            L += [f"| {k} | {v:.0f} |" for k, v in r["stages_wall_s"].items() if v >= 0.5]
            L += ["", "Each event's wall time since the previous event is counted to its stage; stages under 0.5 s "
                  "are left out.", ""]
        if name == "smol" and r["rc"] == 0:
            ok = r["wall_s"] < 600 and gib(r["maxrss_kib"]) * 2**30 < 4e9
            L += [f"Issue #6 target for this preset (measurement + quantization + validation under 10 minutes, "
                  f"peak RSS under 4 GB on this 2-core CPU): {'met' if ok else 'not met'} "
                  f"({r['wall_s'] / 60:.1f} min, {gib(r['maxrss_kib']) * 2**30 / 1e9:.2f} GB).", ""]
        if r.get("note"):
            L += [r["note"], ""]
    L += [f"Reading and decision: {DECISION}.", ""]
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "_child"])
    ap.add_argument("--parts", default="mem,time7,smol")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_scaling"))
    ap.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3])
    ap.add_argument("--mem-rows", type=int, default=2)
    ap.add_argument("--mem-length", type=int, default=256)
    ap.add_argument("--time-length", type=int, default=512)
    ap.add_argument("--gptq-shapes", default="", help="projections to time GPTQ on (default: every shape)")
    ap.add_argument("--gptq-options", default="", help="';'-separated option names to time (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the layer7/layer72 child (0: default)")
    ap.add_argument("--layer-restricted", action="store_true",
                    help="layer7/layer72: the RESTRICTED combination tables instead of the full ones")
    ap.add_argument("--conditions", default="", help="run conditions to print beside the layer7/layer72 numbers")
    ap.add_argument("--write", action="store_true")
    # child arguments
    ap.add_argument("--model"), ap.add_argument("--work"), ap.add_argument("--json")
    ap.add_argument("--rows", type=int), ap.add_argument("--length", type=int)
    ap.add_argument("--restricted", action="store_true")
    args = ap.parse_args(argv)
    if args.mode == "_child":
        return child_measure(args)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": shlex.join(["python", "bench/bench_scaling.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": str(datetime.date.today())}
    for part in [p for p in args.parts.split(",") if p]:
        print(f"== {part}", flush=True)
        if part == "mem":
            r = part_mem(args, out)
        elif part == "full":
            r = part_mem(args, out, full=True)
        elif part in ("time7", "time72"):
            r = part_time(args, out, "7b" if part == "time7" else "72b")
        elif part in ("layer7", "layer72"):
            r = part_layer(args, out, part.removeprefix("layer") + "b")
        elif part in ("smol", "smoldefault"):
            r = part_smol(args, out, default=part == "smoldefault")
        else:
            raise SystemExit(f"unknown part {part}")
        (out / f"{part}.json").write_text(json.dumps(r, indent=1))
        (out / f"meta-{part}.json").write_text(json.dumps(meta))
    # --write replaces a section only when OUT holds a JSON of one of its parts (a fresh OUT keeps the rest)
    text = report(out) if any((out / f"{p}.json").exists() for p in MAIN_PARTS) else None
    layer = report_layer(out)
    for name, t in (("bench_scaling", text), ("bench_scaling_layer", layer)):
        if t is None:
            continue
        print(t)
        if args.write:
            print(f"wrote {write_section(name, t)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
