"""Measure the two memory coefficients of ``convert/plan.py``: ``gptq.prepare``'s and ``gptq.quantize``'s peak
anonymous memory above their inputs, in units of the matrices they work on.

    python bench/plan_coefficients.py [--shapes 4096x4096,8192x2048] [--interval 0.005]

Each shape runs in a fresh process (so freed memory of one run cannot hide the next one's peak): a random
N x K weight and a Hessian from random activations, then ``prepare(H)`` (peak above H, in K x K x 4 bytes) and
``quantize`` at 4 bits with 128-row groups (peak above the weight and the prepared inverse, in N x K x 4
bytes).  A sampler reads RssAnon every ``--interval`` seconds, so a shorter spike can be missed.  Prints one
JSON line per shape; the plan's constants are the largest of them.  A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import gc, json, sys, torch
from exl2.quant_kernels import gptq
from exl2.quant_kernels.qparams import QParams
from exl2.runtime.memory import PeakMemory, rss_anon
n, k, interval = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
g = torch.Generator().manual_seed(0)
x = torch.randn(4 * k, k, generator=g)
H = x.t() @ x / x.shape[0]
del x
w = torch.randn(n, k, generator=g) * 0.02
gc.collect()
with PeakMemory(interval) as pm:
    base = rss_anon()
    prep = gptq.prepare(H, k=k)
    after = rss_anon()
prep_units = (pm.peak_anon - base) / (4 * k * k)
gc.collect()
qp = QParams.make(128, [4], [1.0])
with PeakMemory(interval) as pm:
    base = rss_anon()
    r = gptq.quantize(w, qp, prep, None)
gptq_units = (pm.peak_anon - base) / (4 * n * k)
print(json.dumps({"n": n, "k": k, "prepare_units": round(prep_units, 2), "gptq_units": round(gptq_units, 2),
                  "result_units": round(sum(t.numel() * t.element_size() for t in r.tensors.values())
                                        / (4 * n * k) + 0.5, 2)}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x4096,2048x8192,16384x2048", help="N x K pairs, comma-separated")
    ap.add_argument("--interval", type=float, default=0.005)
    a = ap.parse_args(argv)
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(k), str(a.interval)], cwd=REPO,
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        print(out.stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
