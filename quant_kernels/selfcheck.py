"""Format self-check: quantize a synthetic layer with every option of the tables, pack, validate, reload.

``python -m exl2.quant_kernels.selfcheck [--golden FILE]`` prints one line per distinct option (bpw, output
error of GPTQ and of round-to-nearest) and exits non-zero if any packed layer fails validation or does not
dequantize to exactly the quantizer's weight.  With ``--golden`` it also checks layers written by another
EXL2 writer against the weights ExLlamaV2 reconstructs from them.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import codec, gptq
from .qparams import unique_options


def _synthetic(k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.1 + torch.eye(k)
    x = (torch.randn(1024, k, generator=g) @ mix) * torch.linspace(0.2, 3.0, k)   # [tokens, K]
    w = torch.randn(n, k, generator=g) * 0.02                                       # [N, K]
    H = gptq.Hessian(k)
    for chunk in x.split(256):
        H.add(chunk)
    return x, w, H.result()


def check_golden(path: str) -> int:
    from safetensors import safe_open

    f = safe_open(path, "pt")
    cases = json.loads(f.metadata()["cases"])
    bad = 0
    for name in cases:
        t = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}
        expected = t.pop("expected_weight")
        w = codec.dequantize_layer(t)
        ok = torch.equal(w.view(torch.int16), expected.view(torch.int16))
        bad += not ok
        print(f"golden {name:<18} {'bit-exact' if ok else 'MISMATCH'}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--golden", help="safetensors file of golden EXL2 layers with expected weights")
    ap.add_argument("--k", type=int, default=256, help="input features of the synthetic layer")
    ap.add_argument("--n", type=int, default=72, help="output features (not a multiple of 32: padding is exercised)")
    args = ap.parse_args(argv)

    bad = check_golden(args.golden) if args.golden else 0
    x, w, H = _synthetic(args.k, args.n)
    prepared, rtn = gptq.prepare(H), gptq.prepare(H, invert=False)
    options = unique_options()

    def err(wq):
        return float((x @ (wq.float() - w).t()).norm() / (x @ w.t()).norm())

    print(f"{'option':<44} {'bpw':>6} {'gptq err':>9} {'rtn err':>9}  check")
    for qp in sorted(options, key=lambda q: q.bpw(args.k, args.n)):
        r = gptq.quantize(w, qp, prepared)
        try:
            codec.validate_layer(r.tensors)
            ok = torch.equal(codec.dequantize_layer(r.tensors)[: args.n].view(torch.int16), r.weight.view(torch.int16))
        except codec.EXL2FormatError as e:
            print(f"{qp.desc():<44} invalid: {e}")
            ok = False
        bad += not ok
        e_rtn = err(gptq.quantize(w, qp, rtn).weight)
        print(f"{qp.desc():<44} {qp.bpw(args.k, args.n):6.3f} {err(r.weight):9.5f} {e_rtn:9.5f}  {'ok' if ok else 'FAIL'}")
    print(f"{bad} failure(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
