"""Native kernels vs the torch reference on this CPU (not a test).

    python bench/bench_kernels.py [--quick] [--write]

Shapes are Qwen2-7B's linear layers as K x N (in_features x out_features; the EXL2 orientation
W [K, N]): 3584x3584 (q/o_proj), 3584x18944 (gate/up_proj), 18944x3584 (down_proj).  ``--quick`` uses
512x512, 512x1536, 1536x512.  For each shape: pack (4-bit codes), dequantize a whole layer, matmul
y = x @ W for M = 1 and M = 16 (both on a layer prepared once by ``codec.prepare_layer``, so neither side
validates or decodes the format per call; ``reference.<op>`` against ``ops.<op>``), and GPTQ of the whole
matrix with a 4-bit, 128-row-group option (``gptq.quantize`` as it is vs inside ``ops.reference_only()``;
both share the trailing torch matmul ``W[b:] -= Hinv^T @ err``).  Hinv is a synthetic well-conditioned
upper-triangular factor (the Cholesky preparation is not part of either path and would take minutes at
K = 18944).

Packed matmul vs dense, per call (the comparison the runtime's ``linear.DENSE_FROM_ROWS`` is set from):
Qwen2-7B's q/o, k/v, gate/up and down (3584x3584, 3584x512, 3584x18944, 18944x3584) and SmolLM2-135M's
(576x576, 576x192, 576x1536, 1536x576, head 576x49152), 4-bit 128-row groups, x fp32 with M = 1, 4, 16,
64, 256 rows (``--quick``: the SmolLM2 shapes, M = 1, 4, 16).  Side by side for each (shape, M), timed in
interleaved rounds (best of each):

* packed: ``ops.matmul(x, layer)`` on the prepared layer (what the runtime calls below DENSE_FROM_ROWS);
* kernel: the extension's ``matmul`` called directly, i.e. packed without ``ops.matmul``'s Python checks;
* dense fp32: ``F.linear(x, w)`` with the layer's weight held dequantized in fp32 (the speed reference);
* rebuild + dense: ``F.linear(x, ops.dequantize_layer(layer)[:N].float())``, the weight rebuilt for the
  call (the runtime's path from DENSE_FROM_ROWS rows).

The crossover is the first M at which rebuild + dense beats packed.
``--write`` replaces this benchmark's section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.report import write_section  # noqa: E402
from exl2.quant_kernels import codec, ext, gptq, ops, reference  # noqa: E402
from exl2.quant_kernels.qparams import QParams  # noqa: E402

FULL = [(3584, 3584), (3584, 18944), (18944, 3584)]
QUICK = [(512, 512), (512, 1536), (1536, 512)]
PACKED_FULL = [("Qwen2-7B q/o", 3584, 3584), ("Qwen2-7B k/v", 3584, 512), ("Qwen2-7B gate/up", 3584, 18944),
               ("Qwen2-7B down", 18944, 3584), ("SmolLM2 q/o", 576, 576), ("SmolLM2 k/v", 576, 192),
               ("SmolLM2 gate/up", 576, 1536), ("SmolLM2 down", 1536, 576), ("SmolLM2 head", 576, 49152)]
PACKED_QUICK = [s for s in PACKED_FULL if s[0].startswith("SmolLM2") and s[2] < 49152]
PACKED_M = (1, 4, 16, 64, 256)
PACKED_M_QUICK = (1, 4, 16)


def timeit(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` calls after one untimed warm-up call (repeat > 1)."""
    if repeat > 1:
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def synthetic_prepared(k: int, g: torch.Generator) -> gptq.Prepared:
    """An upper-triangular Hinv with a positive diagonal around 1 and small off-diagonal entries."""
    hinv = torch.randn(k, k, generator=g).mul_(0.3 / k**0.5).triu_(1)
    hinv.diagonal().copy_(torch.rand(k, generator=g) * 0.5 + 0.75)
    return gptq.Prepared(torch.randperm(k, generator=g), hinv)


def bench_shape(k: int, n: int, repeat: int, skip_ref_gptq: bool) -> list[tuple[str, float, float]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    q = torch.randint(0, 16, (k, n), generator=g)
    if ops.backend(q) != "cpu":
        raise RuntimeError(f"ops would take the {ops.backend(q)!r} path, not the native CPU kernels")
    rows.append(("pack 4-bit", timeit(lambda: reference.pack_bits(q, 4), repeat),
                 timeit(lambda: ops.pack_bits(q, 4), repeat)))

    qp = QParams.make(128, [4], [1])
    w = torch.randn(n, k, generator=g) * 0.02
    layer = codec.prepare_layer(gptq.quantize(w, qp, gptq.Prepared(torch.randperm(k, generator=g), None)).tensors)
    rows.append(("dequantize layer", timeit(lambda: reference.dequantize_layer(layer), repeat),
                 timeit(lambda: ops.dequantize_layer(layer), repeat)))
    for m in (1, 16):
        x = torch.randn(m, k, generator=g)
        rows.append((f"matmul M={m}", timeit(lambda: reference.matmul(x, layer), repeat),
                     timeit(lambda: ops.matmul(x, layer), repeat)))

    prep = synthetic_prepared(k, g)
    t_nat = timeit(lambda: gptq.quantize(w, qp, prep), 1)
    t_ref = float("nan") if skip_ref_gptq else timeit(ops.reference_only()(lambda: gptq.quantize(w, qp, prep)), 1)
    rows.append(("GPTQ 4-bit 128g", t_ref, t_nat))
    return rows


def kernel_isa() -> str:
    """The packed matmul's build on this CPU (the extension is compiled with -march=native)."""
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    if {"avx512f", "avx512bw", "avx512vl", "f16c", "fma"} <= set(flags):
        return "AVX-512"
    return "AVX2" if {"avx2", "f16c", "fma"} <= set(flags) else "scalar"


def best_interleaved(fns: dict, min_rounds: int, min_time: float = 0.3, max_rounds: int = 200) -> dict:
    """Best wall time of each callable, timed in rounds until ``min_rounds`` rounds and ``min_time`` seconds
    have passed.  A round runs each callable three times in a row and times the last two (caches warm with
    its own data, not the previous callable's); rounds keep the callables side by side, so a change in the
    machine's load touches all of them."""
    best = {k: float("inf") for k in fns}
    t_start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - t_start < min_time):
        for k, fn in fns.items():
            fn()
            for _ in range(2):
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
        rounds += 1
    return best


def bench_packed(label: str, k: int, n: int, ms, repeat: int) -> list[dict]:
    """packed / kernel / dense fp32 / rebuild + dense for each M (module docstring)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g) * 0.02
    layer = codec.prepare_layer(gptq.quantize(w, QParams.make(128, [4], [1]),
                                              gptq.Prepared(torch.randperm(k, generator=g), None)).tensors)
    if ops.backend(layer) != "cpu":
        raise RuntimeError(f"ops would take the {ops.backend(layer)!r} path, not the native CPU kernels")
    native = ext.get()
    dense_w = ops.dequantize_layer(layer)[:n].float().contiguous()          # [N, K], held
    out = []
    for m in ms:
        x = torch.randn(m, k, generator=g)
        fns = {
            "packed": lambda: ops.matmul(x, layer),
            "kernel": lambda: native.matmul(x, layer.q_weight, layer.scales, layer.groups, layer.perm),
            "dense": lambda: F.linear(x, dense_w),
            "rebuild": lambda: F.linear(x, ops.dequantize_layer(layer)[:n].float()),
        }
        t = best_interleaved(fns, repeat)
        out.append({"label": label, "k": k, "n": n, "m": m, **t})
        print(f"| {label} | {k}x{n} | {m} | {t['packed'] * 1e3:.3f} | {t['kernel'] * 1e3:.3f} | "
              f"{t['dense'] * 1e3:.3f} | {t['dense'] / t['packed']:.2f}x | {t['rebuild'] * 1e3:.3f} | "
              f"{t['rebuild'] / t['packed']:.2f}x |", flush=True)
    del dense_w
    return out


def packed_tables(results: list[dict], ms) -> list[str]:
    head = ["| layer | K x N | M | packed ms | kernel ms | dense fp32 ms | dense / packed | rebuild + dense ms "
            "| (rebuild + dense) / packed |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [f"| {r['label']} | {r['k']}x{r['n']} | {r['m']} | {r['packed'] * 1e3:.3f} | {r['kernel'] * 1e3:.3f} | "
            f"{r['dense'] * 1e3:.3f} | {r['dense'] / r['packed']:.2f}x | {r['rebuild'] * 1e3:.3f} | "
            f"{r['rebuild'] / r['packed']:.2f}x |" for r in results]
    cross = ["", "| layer | K x N | first M where rebuild + dense beats packed | first M where held dense fp32 "
             "beats packed |", "|---|---|---|---|"]
    never = 0
    labels = list(dict.fromkeys(r["label"] for r in results))
    for label in labels:
        rs = [r for r in results if r["label"] == label]
        reb = next((r["m"] for r in rs if r["rebuild"] < r["packed"]), None)
        den = next((r["m"] for r in rs if r["dense"] < r["packed"]), None)
        never += reb is None
        cross.append(f"| {label} | {rs[0]['k']}x{rs[0]['n']} | {reb if reb else f'none up to {max(ms)}'} | "
                     f"{den if den else f'none up to {max(ms)}'} |")
    cross += ["", f"Packed beats rebuild + dense at every M measured for {never} of {len(labels)} layers."]
    return head + rows + cross


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds instead of minutes)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N for pack/dequant/matmul")
    ap.add_argument("--skip-ref-gptq", action="store_true", help="time only the native GPTQ")
    ap.add_argument("--packed-only", action="store_true", help="only the packed matmul vs dense comparison")
    ap.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    if ext.get() is None:
        print(f"native extension unavailable ({ext.failure() or 'EXL2_NO_EXT set'})", file=sys.stderr)
        return 1
    build_s = time.perf_counter() - t0
    load_before = os.getloadavg()
    ms = PACKED_M_QUICK if args.quick else PACKED_M
    print("| layer | K x N | M | packed ms | kernel ms | dense fp32 ms | dense / packed | rebuild + dense ms "
          "| (rebuild + dense) / packed |", flush=True)
    packed = []
    for label, k, n in (PACKED_QUICK if args.quick else PACKED_FULL):
        packed += bench_packed(label, k, n, ms, max(args.repeat, 5))
    packed_lines = packed_tables(packed, ms)
    print("\n".join(packed_lines[len(packed) + 2:]), flush=True)

    lines = ["| shape K x N | op | reference s | native s | ratio |", "|---|---|---:|---:|---:|"]
    for k, n in ([] if args.packed_only else QUICK if args.quick else FULL):
        for name, t_ref, t_nat in bench_shape(k, n, args.repeat, args.skip_ref_gptq):
            line = f"| {k}x{n} | {name} | {t_ref:.4f} | {t_nat:.5f} | {t_ref / t_nat:.1f}x |"
            lines.append(line)
            print(line, flush=True)
    load_after = os.getloadavg()

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if pathlib.Path("/proc/cpuinfo").exists() else platform.processor()
    cmd = ("python bench/bench_kernels.py" + (" --quick" if args.quick else "")
           + (" --packed-only" if args.packed_only else "") + " --write")
    isa = kernel_isa()
    section = "\n".join([
        "## Native kernels vs torch reference (bench/bench_kernels.py)",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {cpu} ({isa} build), {torch.get_num_threads()} threads, torch {torch.__version__}, CPU only; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after  ",
        f"Date: {datetime.date.today().isoformat()} (extension load {build_s:.1f} s)",
        "",
        "### Packed matmul vs dense, per call",
        "",
        "4-bit, 128-row groups, x fp32 [M, K].  packed = `ops.matmul` on a prepared layer; kernel = the same",
        "without `ops.matmul`'s Python checks (the extension called directly); dense fp32 = `F.linear` with the",
        "weight held dequantized in fp32; rebuild + dense = the weight rebuilt by `ops.dequantize_layer` for the",
        "call, then `F.linear` (the runtime's path from `linear.DENSE_FROM_ROWS` rows).  Best of interleaved",
        "rounds; ratios > 1 mean packed is faster.",
        "",
        *packed_lines,
        "",
        "### Native kernels vs torch reference",
        "",
        "Shapes are K x N (in x out features).  GPTQ: 4-bit, 128-row groups, synthetic Hinv; both paths",
        "share the trailing torch matmul.  Reference matmul = reference dequantize + torch matmul.",
        "",
        *(lines if len(lines) > 2 else ["(not run: --packed-only)"]),
    ])
    if args.write:
        print(f"wrote {write_section('bench_kernels', section)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
