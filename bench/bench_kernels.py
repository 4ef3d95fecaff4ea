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
``--write`` replaces this benchmark's section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.report import write_section  # noqa: E402
from exl2.quant_kernels import codec, ext, gptq, ops, reference  # noqa: E402
from exl2.quant_kernels.qparams import QParams  # noqa: E402

FULL = [(3584, 3584), (3584, 18944), (18944, 3584)]
QUICK = [(512, 512), (512, 1536), (1536, 512)]


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds instead of minutes)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N for pack/dequant/matmul")
    ap.add_argument("--skip-ref-gptq", action="store_true", help="time only the native GPTQ")
    ap.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    if ext.get() is None:
        print(f"native extension unavailable ({ext.failure() or 'EXL2_NO_EXT set'})", file=sys.stderr)
        return 1
    build_s = time.perf_counter() - t0
    shapes = QUICK if args.quick else FULL
    lines = ["| shape K x N | op | reference s | native s | ratio |", "|---|---|---:|---:|---:|"]
    for k, n in shapes:
        for name, t_ref, t_nat in bench_shape(k, n, args.repeat, args.skip_ref_gptq):
            line = f"| {k}x{n} | {name} | {t_ref:.4f} | {t_nat:.4f} | {t_ref / t_nat:.1f}x |"
            lines.append(line)
            print(line, flush=True)

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if pathlib.Path("/proc/cpuinfo").exists() else platform.processor()
    cmd = "python bench/bench_kernels.py" + (" --quick" if args.quick else "") + " --write"
    section = "\n".join([
        "## Native kernels vs torch reference (bench/bench_kernels.py)",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU only  ",
        f"Date: {datetime.date.today().isoformat()} (extension load {build_s:.1f} s)",
        "",
        "Shapes are K x N (in x out features).  GPTQ: 4-bit, 128-row groups, synthetic Hinv; both paths",
        "share the trailing torch matmul.  Reference matmul = reference dequantize + torch matmul.",
        "",
        *lines,
    ])
    if args.write:
        print(f"wrote {write_section('bench_kernels', section)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
