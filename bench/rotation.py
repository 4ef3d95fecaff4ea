"""Incoherence rotation folded into the weights, SmolLM2-135M at 4.0 bpw: does it help EXL2?

The rotated checkpoint computes the same function as the source (KL ~1e-7 in float32) and is a plain Llama
checkpoint, so ExLlamaV2 would load its EXL2 conversion unchanged:

* every RMSNorm weight is folded into the projections that read its output (q/k/v, gate/up, the head) and
  set to 1;
* the residual stream is rotated by an orthogonal ``Q [C, C]``: embedding ``E Q``, readers ``W Q``, writers
  (o_proj, down_proj) ``Q^T W``, head ``H diag(g) Q`` (a tied head becomes its own tensor);
* each attention head's values are rotated by an orthogonal ``R [D, D]`` (v_proj rows ``R^T``, o_proj columns
  ``R``).

``Q`` and ``R`` are random orthogonal (QR of a seeded Gaussian) with ``--kind orth``, or randomized Hadamard
(``diag(random signs) H / sqrt(n)``, the transform of QuIP#, QuaRot and ExLlamaV3) with ``--kind hadamard``:
``H`` is the Kronecker product of a Paley matrix built from a prime ``q`` (order ``q + 1`` for ``q = 3 mod 4``,
``2 (q + 1)`` for ``q = 1 mod 4``) with Sylvester's ``2^k`` one (576 = 36 x 16, 3584 = 28 x 128). down_proj's input cannot be rotated without an online
transform, which the ExLlamaV2 loader does not have.

Each variant gets uniform GPTQ 4-bit g128 and EXL2 4.0 bpw (its own measurement, 8 x 512; ``--asym 0``, as
bench/quality.py made its unrotated EXL2 models before asymmetric calibration became the default) on the
rotated checkpoint, quantized with bench/quality.py's calibration, scored against the *original* FP16 model on
bench/quality.py's held-out rows, next to bench/quality.py's unrotated models.

    python bench/rotation.py [--variants orig,jitter0] [--kinds orth,hadamard]

Needs ``bench/quality.py --bpw 4 --jitter-bpw 4 --quick --no-peers`` first. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peers import load_cal_ids  # noqa: E402
from bench.quality import TEXTS, Scorer, add_follow_up_args, exl2_targets, gptq_uniform, run_follow_up  # noqa: E402
from bench.report import header  # noqa: E402

DECISION = "docs/decisions/0008-incoherence-rotation.md"   # the reading and the decision, written by hand


class NoHadamard(ValueError):
    """No Hadamard matrix of that order can be built here."""


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` for the quadratic character chi of the prime field GF(q)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if d in squares else -1 for d in range(1, q)], dtype=torch.int64)
    idx = (torch.arange(q).unsqueeze(0) - torch.arange(q).unsqueeze(1)) % q      # [q, q]: j - i
    return chi[idx]


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``m`` from one of Paley's constructions with a prime ``q``, or None."""
    q = m - 1
    if q % 4 == 3 and _is_prime(q):                         # first construction: I + S, S skew
        S = torch.zeros(m, m, dtype=torch.int64)
        S[0, 1:] = 1
        S[1:, 0] = -1
        S[1:, 1:] = _jacobsthal(q)
        return S + torch.eye(m, dtype=torch.int64)
    q = m // 2 - 1
    if m % 2 == 0 and q % 4 == 1 and _is_prime(q):         # second: from a symmetric conference matrix
        C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
        C[0, 1:] = 1
        C[1:, 0] = 1
        C[1:, 1:] = _jacobsthal(q)
        A = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
        B = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
        return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.int64), B)
    return None


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (int64 +-1, ``H H^T = n I``, checked) for the smallest Paley base."""
    k = (n & -n).bit_length() - 1                           # n = odd part * 2^k
    for j in range(k + 1):
        m = n >> (k - j)
        H = torch.ones(1, 1, dtype=torch.int64) if m == 1 else _paley(m) if m % 4 == 0 else None
        if H is None:
            continue
        for _ in range(k - j):                              # Sylvester doubling
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        if not torch.equal(H @ H.t(), n * torch.eye(n, dtype=torch.int64)):
            raise AssertionError(f"hadamard({n}): H H^T != n I")
        return H
    raise NoHadamard(f"no Hadamard matrix of order {n} from a Paley base here")


def orthogonal(n: int, kind: str, seed: int) -> torch.Tensor:
    """An orthogonal float64 ``[n, n]``: randomized Hadamard (``kind`` "hadamard") or random orthogonal."""
    g = torch.Generator().manual_seed(seed)
    if kind == "hadamard":
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).mul(2).sub(1).to(torch.float64)
        return signs.unsqueeze(1) * hadamard(n).to(torch.float64) / math.sqrt(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def rotate_checkpoint(src: Path, dst: Path, kind: str, seed: int = 0) -> Path:
    """Write the rotated, norm-folded equivalent of ``src`` to ``dst`` (float32, untied head)."""
    from safetensors.torch import load_file, save_file

    if (dst / "config.json").exists():
        return dst
    cfg = json.loads((src / "config.json").read_text())
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update({k: v.double() for k, v in load_file(str(f)).items()})
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    Hkv, D = cfg.get("num_key_value_heads", H), cfg["hidden_size"] // H
    Q, R = orthogonal(C, kind, seed), orthogonal(D, kind, seed + 1)
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    sd["lm_head.weight"] = (head * sd["model.norm.weight"]) @ Q                 # [V, C]
    sd["model.norm.weight"] = torch.ones(C, dtype=torch.float64)
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] @ Q
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm, readers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            for r in readers:
                sd[f"{p}{r}.weight"] = (sd[f"{p}{r}.weight"] * sd[p + norm + ".weight"]) @ Q
            sd[p + norm + ".weight"] = torch.ones(C, dtype=torch.float64)
        for w in ("self_attn.o_proj", "mlp.down_proj"):
            sd[f"{p}{w}.weight"] = Q.t() @ sd[f"{p}{w}.weight"]
            if f"{p}{w}.bias" in sd:
                sd[f"{p}{w}.bias"] = sd[f"{p}{w}.bias"] @ Q
        v = p + "self_attn.v_proj."
        sd[v + "weight"] = (R.t() @ sd[v + "weight"].reshape(Hkv, D, C)).reshape(Hkv * D, C)
        if v + "bias" in sd:
            sd[v + "bias"] = (sd[v + "bias"].reshape(Hkv, D) @ R).reshape(-1)
        o = p + "self_attn.o_proj.weight"
        sd[o] = (sd[o].reshape(C, H, D) @ R).reshape(C, H * D)
    tmp = dst.with_name(dst.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"))
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "exl2_fixture.json"):
            shutil.copy2(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}, indent=2))
    tmp.rename(dst)
    return dst


def run_variant(v: str, args) -> list[dict]:
    from fixtures.smollm2 import build_smollm2

    from exl2.runtime.evaluate import load_data_rows

    src = build_smollm2(jitter_seed=None if v == "orig" else int(v.removeprefix("jitter")))
    qwork, work = Path(args.quality_work) / v, Path(args.work) / v
    texts = {t: load_data_rows(src, REPO / p, args.eval_rows, args.eval_length) for t, p in TEXTS.items()}
    scorer = Scorer(src, texts, work.parent / f"{v}-scores.json", args.rescore)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    base = {"g128": qwork / "gptq4g128" / "model", "exl2": qwork / "exl2" / "bpw-4.00" / "model"}
    for kind in ["none", *args.kinds.split(",")]:
        if kind == "none":
            models = base
            ref = src
        else:
            ref = rotate_checkpoint(src, work / kind / "src", kind)
            models = {"g128": Path(gptq_uniform(ref, work / kind / "g128", load_cal_ids(qwork / "cal"), 4, 128,
                                                6)["dir"]),
                      "exl2": Path(exl2_targets(ref, work / kind / "exl2", [4.0], 6, 8, 512, 16, 512,
                                                          asym=0.0)[0]["dir"])}
            s = scorer.score(f"{kind} FP", ref, "prose")
            print(f"[{v}] rotated FP checkpoint ({kind}) vs source: prose KL {s['kld_mean']:.2e}", flush=True)
            if s["kld_mean"] > 1e-5:       # float32 storage of an exact rotation gives ~1e-7
                raise SystemExit(f"rotation: the rotated checkpoint is not equivalent (KL {s['kld_mean']:.2e})")
        for which, model in models.items():
            s = {t: scorer.score(f"{kind} {which}", model, t) for t in TEXTS}
            rows.append({"kind": kind, "which": which, "scores": s})
            print(f"[{v}] {kind:<9} {which:<5} " + "  ".join(f"{t}: KL {s[t]['kld_mean']:.4f}" for t in TEXTS),
                  flush=True)
    return rows


def report(results: dict[str, list[dict]], args) -> str:
    cmd = " ".join(["python bench/rotation.py", *args.argv])
    lines = header("Incoherence rotation at 4.0 bpw, SmolLM2-135M (bench/rotation.py)", cmd) + [
        "Residual stream rotated by an orthogonal matrix with the RMSNorm weights folded in, and each head's values "
        "by another (an exactly equivalent checkpoint); uniform GPTQ 4-bit g128 and EXL2 4.0 bpw (a fresh "
        "measurement of the rotated checkpoint, --asym 0 like the unrotated one) quantized from it, scored against the original FP16 model on "
        "bench/quality.py's held-out rows. change: against the same format without rotation.", "",
        "| variant | rotation | format | prose KL | change | code KL | change |", "|---|---|---|---:|---:|---:|---:|"]
    for v, rows in results.items():
        plain = {r["which"]: r["scores"] for r in rows if r["kind"] == "none"}
        for r in rows:
            cells = []
            for t in TEXTS:
                k = r["scores"][t]["kld_mean"]
                cells += [f"{k:.4f}", "" if r["kind"] == "none" else f"{k / plain[r['which']][t]['kld_mean'] - 1:+.1%}"]
            fmt = "GPTQ 4-bit g128" if r["which"] == "g128" else "EXL2 4.0 bpw"
            lines.append(f"| {v} | {r['kind']} | {fmt} | " + " | ".join(cells) + " |")
    lines += ["", f"Reading and decision: {DECISION}."]
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_follow_up_args(ap, "rotation")
    ap.add_argument("--kinds", default="orth,hadamard", help="rotations to try: orth (random orthogonal), hadamard")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_follow_up(args, run_variant, report, "quality_rotation")


if __name__ == "__main__":
    sys.exit(main())
