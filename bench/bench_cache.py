"""KV cache modes token by token: ExLlamaV2's FP16/Q8/Q6/Q4 and exl2's own Q4X/Q3X (runtime/kv_x.py), on
SmolLM2-135M-Instruct and on the Qwen2-like stress fixture (fixtures/qwen2_stress.py).

    python bench/bench_cache.py [--part quality|ablations|speed|all] [--models smollm2,stress] [--rows 2]
                                [--length 512] [--modes fp16,q8,q6,q4,q4x,q3x] [--write]

**Main table** (per model, per text: *Persuasion* prose and CPython stdlib code, the first ``--rows`` x
``--length`` tokens, as ``exl2-eval --mode cache --chunk 1`` takes them): every row is fed one token at a time
through a cache of each mode, so every past key and value is read back from the cache.  Per mode: bytes per
token, perplexity and its change against the FP16 cache, the mean KL divergence of each position's next-token
distribution against the FP16 cache's (same rows, same positions), and decode speed: the tokens per second of
one token-by-token pass over the first prose row (a growing cache, batch 1) and its ratio to the FP16 cache's in
the same run (``--part speed``, to be run on a quiet machine).

**Ablations** (at Q4X's budget, one ingredient at a time and together; Q3X with and without its recent fp16
window): each row scored in one pass by ``kv_calib.emulate_logits`` (every query reads its past through the
variant's store, quantized and decoded, and its own key and value exactly: the token-by-token semantics,
which tests/runtime/test_kv_x.py checks against the cache), because a token-by-token pass per variant would
take hours here.

The KV profile the x modes read is the one the runtime derives at load for a model without ``exl2_kv.json``
(rows of the embedded default calibration mix, never the evaluation texts), computed once per model and kept
under ``work/bench_cache/`` (``--fresh-profile`` measures it again).  ``--write`` replaces this benchmark's
section of BENCHMARKS.md; raw numbers go to ``work/bench_cache/results.json``.  A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import header, write_section  # noqa: E402
from exl2.runtime import kv_calib  # noqa: E402
from exl2.runtime.cache import EXL2_MODES, KVCache, bytes_per_token  # noqa: E402
from exl2.runtime.evaluate import load_data_rows  # noqa: E402
from exl2.runtime.kv_profile import KVProfile  # noqa: E402
from exl2.runtime.kv_x import X_MODES, scheme_variant, x_bytes_per_token, x_fixed_bytes  # noqa: E402
from exl2.runtime.loader import load_model  # noqa: E402

TEXTS = {"prose": "fixtures/data/persuasion.txt", "code": "fixtures/data/stdlib_code.py.txt"}
MODES = ("fp16", "q8", "q6", "q4", "q4x", "q3x")
OUT = REPO / "work" / "bench_cache"
SECTION = "bench_cache"


def model_dirs() -> dict[str, tuple[str, Path]]:
    from fixtures.qwen2_stress import build_qwen2_stress
    from fixtures.smollm2 import build_smollm2

    return {"smollm2": ("SmolLM2-135M-Instruct", build_smollm2()),
            "stress": ("Qwen2-like stress fixture (SmolLM2 with a Qwen2.5-like k bias)", build_qwen2_stress())}


# ---------------------------------------------------------------------------------------------- ablations

def ablations() -> list[tuple[str, object]]:
    """(label, XScheme) pairs; every variant at Q4X's bit budget unless its label says otherwise."""
    plain = dict(k_transform="none", v_transform="none", center_k=False, pre_rope=False, sink=0, recent=0,
                 allocate=False)
    v = lambda **kw: scheme_variant("q4x", **{**plain, **kw})  # noqa: E731
    had = dict(k_transform="hadamard", v_transform="hadamard")
    klt = dict(k_transform="klt", v_transform="hadamard", center_k=True, pre_rope=True)
    return [
        ("plain: 64-value groups, Lloyd-Max levels, no transform, post-RoPE keys", v()),
        ("Hadamard only (keys post-RoPE, values)", v(**had)),
        ("centering only (calibrated key mean)", v(center_k=True)),
        ("pre-RoPE only", v(pre_rope=True)),
        ("sink only (first token fp16)", v(sink=1)),
        ("recent window only (last 8 tokens fp16)", v(recent=8)),
        ("allocation only (bits per stream)", v(allocate=True)),
        ("Hadamard + centering, post-RoPE", v(**had, center_k=True)),
        ("Hadamard + centering + pre-RoPE", v(**had, center_k=True, pre_rope=True)),
        ("KLT keys (pre-RoPE, centered, query-weighted) + Hadamard values", v(**klt)),
        ("... + sink", v(**klt, sink=1)),
        ("... + allocation", v(**klt, sink=1, allocate=True)),
        ("... + recent window = q4x", X_MODES["q4x"]),
        ("q4x without KLT (Hadamard keys)", scheme_variant("q4x", k_transform="hadamard")),
        ("q4x without centering", scheme_variant("q4x", center_k=False)),
        ("q4x with post-RoPE Hadamard keys", scheme_variant("q4x", k_transform="hadamard", pre_rope=False)),
        ("q4x without sink", scheme_variant("q4x", sink=0)),
        ("q4x without allocation", scheme_variant("q4x", allocate=False)),
        ("q4x without the recent window", scheme_variant("q4x", recent=0)),
        ("q4x with value centering", scheme_variant("q4x", center_v=True)),
        ("q4x with 16 recent tokens", scheme_variant("q4x", recent=16)),
        ("q4x at 4.44 bits (its 9 fixed tokens paid from the budget at 512 tokens)",
         scheme_variant("q4x", budget=4.44)),
        ("q3x (q4x's ingredients at 3.675 bits)", X_MODES["q3x"]),
        ("q3x without the recent window", scheme_variant("q3x", recent=0)),
    ]


# ---------------------------------------------------------------------------------------------- measuring

def profile_for(name: str, model, model_dir: Path, fresh: bool) -> KVProfile:
    """The profile the runtime derives at load (default calibration mix), cached under work/bench_cache/."""
    d = OUT / name
    prof = None if fresh else KVProfile.load(d, model.cfg)
    if prof is None:
        prof = kv_calib.default_mix_profile(model, model_dir / "tokenizer.json")
        d.mkdir(parents=True, exist_ok=True)
        prof.save(d)
    kv_calib.attach(model, prof)
    return prof


def token_by_token(model, row: torch.Tensor, mode: str) -> tuple[torch.Tensor, float]:
    """Log-probs [L-1, V] of row [1, L] fed one token at a time through a fresh ``mode`` cache (as exl2-eval
    --mode cache --chunk 1: "fp16" stores float16), and the seconds of the pass."""
    L = row.shape[1]
    cache = KVCache(model.cfg, L, mode=mode, dtype=model.dtype, device=model.device,
                    storage_dtype=torch.float16 if mode == "fp16" else None)
    out = []
    with torch.inference_mode():
        model(row[:, :1], KVCache(model.cfg, 1, mode=mode, dtype=model.dtype))  # binds the profile's plan (x modes)
        t = time.perf_counter()
        for i in range(L - 1):
            out.append(model(row[:, i:i + 1], cache)[0])
        sec = time.perf_counter() - t
    return torch.log_softmax(torch.cat(out).float(), -1), sec


def score(lp: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, int]:
    """(NLL sum, KL(ref || lp) sum, tokens)."""
    nll = -float(lp.gather(-1, targets[:, None]).double().sum())
    kl = float((ref.exp() * (ref - lp)).sum(-1).double().sum())
    return nll, kl, int(targets.shape[0])


def run_speed(name: str, model_dir: Path, args) -> dict:
    """Decode tokens/s of each mode: the first prose row fed token by token, modes interleaved, best of
    ``--repeats``."""
    model = load_model(model_dir)
    profile_for(name, model, model_dir, args.fresh_profile)
    row = load_data_rows(model_dir, REPO / TEXTS["prose"], 1, args.length)
    best = {m: math.inf for m in args.modes}
    for rep in range(args.repeats):
        for m in args.modes:
            best[m] = min(best[m], token_by_token(model, row, m)[1])
            print(f"{name} speed {m} repeat {rep}: {(row.shape[1] - 1) / best[m]:.1f} tok/s", flush=True)
    return {m: (row.shape[1] - 1) / sec for m, sec in best.items()}


def _model(name: str, model_dir: Path, args):
    model = load_model(model_dir)
    t = time.perf_counter()
    prof = profile_for(name, model, model_dir, args.fresh_profile)
    return model, prof, round(time.perf_counter() - t, 1)


def run_model(name: str, title: str, model_dir: Path, args) -> dict:
    """The main table: every mode token by token against the FP16 cache."""
    model, prof, load_s = _model(name, model_dir, args)
    res = {"title": title, "dir": str(model_dir), "profile": prof.source, "profile_load_s": load_s,
           "bytes": {m: bytes_per_token(model.cfg, m) for m in args.modes}, "main": {}, "ablations": {}}
    res["allocation"] = {m: prof.allocation(model.cfg, X_MODES[m]) for m in X_MODES}
    res["fixed"] = {m: x_fixed_bytes(model.cfg, X_MODES[m]) for m in X_MODES}
    for text, path in TEXTS.items():
        rows = load_data_rows(model_dir, REPO / path, args.rows, args.length)
        main = {m: {"nll": 0.0, "kl": 0.0, "n": 0} for m in args.modes}
        for r in range(rows.shape[0]):
            row, targets = rows[r:r + 1], rows[r, 1:]
            ref, _ = token_by_token(model, row, "fp16")
            for m in args.modes:
                lp = ref if m == "fp16" else token_by_token(model, row, m)[0]
                nll, kl, n = score(lp, ref, targets)
                a = main[m]
                a["nll"] += nll
                a["kl"] += kl
                a["n"] += n
                print(f"{name} {text} row {r} {m}: ppl {math.exp(nll / n):.4f} KL {kl / n:.5f}", flush=True)
        res["main"][text] = {m: {"ppl": math.exp(a["nll"] / a["n"]), "kl": a["kl"] / a["n"]} for m, a in main.items()}
    return res


def run_ablations(name: str, model_dir: Path, args) -> dict:
    """Each variant of :func:`ablations` by one-pass emulation, against the FP16 cache emulated the same way (past
    keys and values rounded to fp16, each query's own exact)."""
    model, prof, _ = _model(name, model_dir, args)
    out: dict = {}
    for text, path in TEXTS.items():
        rows = load_data_rows(model_dir, REPO / path, args.rows, args.length)
        fp16 = lambda i: (lambda k_pre, k: k.half().to(k.dtype), lambda v: v.half().to(v.dtype))  # noqa: E731
        refs = [torch.log_softmax(kv_calib.emulate_logits(model, rows[r:r + 1], fp16, prof)[:-1], -1)
                for r in range(rows.shape[0])]
        base_nll = sum(-float(ref.gather(-1, rows[r, 1:, None]).double().sum()) for r, ref in enumerate(refs))
        ntok = len(refs) * (rows.shape[1] - 1)
        for label, scheme in ablations():
            nll = kl = 0.0
            for r, ref in enumerate(refs):
                lp = torch.log_softmax(kv_calib.emulate_logits(model, rows[r:r + 1], scheme, prof)[:-1], -1)
                a, b, _ = score(lp, ref, rows[r, 1:])
                nll += a
                kl += b
            ab = out.setdefault(label, {"bytes": x_bytes_per_token(model.cfg, scheme),
                                        "fixed": x_fixed_bytes(model.cfg, scheme)})
            ab[text] = {"ppl": math.exp(nll / ntok), "d_ppl": math.exp((nll - base_nll) / ntok) - 1, "kl": kl / ntok}
            print(f"{name} {text} {label}: {100 * ab[text]['d_ppl']:+.2f}% KL {kl / ntok:.5f}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- report

def pct(x: float) -> str:
    return f"{100 * x:+.2f} %"


def verdicts(results: dict) -> list[str]:
    """The issue's targets, checked against the measured numbers (both texts must meet each)."""
    out = []
    s = results.get("smollm2")
    if s and all(m in s["bytes"] for m in ("fp16", "q4", "q4x", "q3x")):
        d = lambda m: max(s["main"][t][m]["ppl"] / s["main"][t]["fp16"]["ppl"] - 1 for t in TEXTS)  # noqa: E731
        cap = s["bytes"]["q4"] * 1.05
        ok4 = d("q4x") <= 0.005 and s["bytes"]["q4x"] <= cap
        L = (results.get("_quality") or {}).get("length") or 512
        amortized = s["bytes"]["q4x"] + s["fixed"]["q4x"] / L
        out.append(f"- SmolLM2-135M, Q4X within +0.5 % of the FP16 cache at <= {cap:.0f} bytes/token (Q4's "
                   f"{s['bytes']['q4']} + 5 %): worst text {pct(d('q4x'))} at {s['bytes']['q4x']} bytes/token, "
                   f"**{'met' if ok4 else 'not met'}** per token (Q4: {pct(d('q4'))}). Counting its fixed "
                   f"{s['fixed']['q4x']} bytes per sequence (9 FP16 tokens) over these {L}-token rows it holds "
                   f"{amortized:.0f} bytes/token, Q4 {pct(amortized / s['bytes']['q4'] - 1)}: "
                   + ("within +5 % on that reading too." if amortized <= cap else
                      "**not within +5 %** on that reading until a sequence reaches "
                      f"{s['fixed']['q4x'] / max(cap - s['bytes']['q4x'], 1e-9):.0f} tokens."))
        out.append(f"- SmolLM2-135M, Q3X within +2 %: worst text {pct(d('q3x'))} at {s['bytes']['q3x']} bytes/token, "
                   f"**{'met' if d('q3x') <= 0.02 else 'not met'}**.")
    s = results.get("stress")
    if s and all(m in s["bytes"] for m in ("fp16", "q4", "q4x")):
        d = lambda m: max(s["main"][t][m]["ppl"] / s["main"][t]["fp16"]["ppl"] - 1 for t in TEXTS)  # noqa: E731
        out.append(f"- Stress fixture: Q4 worst text {pct(d('q4'))} "
                   f"({'a collapse' if d('q4') > 0.5 else 'no collapse'}), Q4X worst text {pct(d('q4x'))}: "
                   f"within +1 % **{'met' if d('q4x') <= 0.01 else 'not met'}**"
                   + (f"; Q3X {pct(d('q3x'))}." if "q3x" in s["bytes"] else "."))
    return out


def render(results: dict, command: str) -> str:
    q = results.get("_quality") or {}
    sp = results.get("_speed") or {}
    if q.get("threads"):
        torch.set_num_threads(q["threads"])   # the header states the threads the numbers were measured with
    lines = header("KV cache modes token by token: ExLlamaV2's and exl2's own (bench/bench_cache.py)", q.get("command", "-"),
                   command_note=f" (decode speed: `{sp['command']}`, {sp['date']}, {sp['threads']} threads)" if sp else "")
    lines += [f"Each text's first {q.get('rows')} rows x {q.get('length')} tokens fed one token at a time (every past "
              "key and value read back from the cache, as `exl2-eval --mode cache --chunk 1`); float32 compute; "
              "perplexity change and mean KL divergence against the FP16 cache on the same positions. Decode: "
              "tokens/s of one such pass over the first prose row (batch 1, the cache growing to the row's "
              "length; modes interleaved, best of the repeats) and its ratio to the FP16 cache's in the same run. "
              "Q4X/Q3X read the KV profile the runtime derives at load from the default calibration mix (never the "
              "evaluation texts). Bytes/token: the cache's growth per token over all layers; Q4X and Q3X also "
              "hold FP16 copies of a fixed number of tokens per sequence (the first token, and the last "
              f"{X_MODES['q4x'].recent} before the query), given per model below.", ""]
    if not sp:
        lines += ["Decode speed: not measured yet (`--part speed`, on a quiet machine).", ""]
    lines += ["Targets (issue #22):", ""] + verdicts(results) + [""]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        lines += [f"### {r['title']}", "",
                  f"KV profile: {r['profile'].get('derived_from')}, {r['profile'].get('stat_rows')} x "
                  f"{r['profile'].get('stat_length')} tokens of statistics, sensitivities on "
                  f"{r['profile'].get('sens_rows')} x {r['profile'].get('sens_length')} "
                  f"({r['profile'].get('seconds')} s when measured). Fixed FP16 tokens per sequence: "
                  + ", ".join(f"{m.upper()} {b} bytes" for m, b in r["fixed"].items())
                  + f" (at {q.get('length')} tokens: " + ", ".join(
                      f"{m.upper()} {r['bytes'][m] + r['fixed'][m] / q.get('length', 1):.0f}" for m in r["fixed"]
                      if m in r["bytes"]) + " bytes/token with them). Bits (keys, values) per layer: "
                  + "; ".join(f"{m.upper()} " + " ".join(f"{k}/{v}" for k, v in a) for m, a in r["allocation"].items()),
                  ""]
        hdr = "| cache | bytes/token |" + "".join(f" {t} ppl | {t} vs FP16 | {t} KL |" for t in TEXTS) + \
              " decode tok/s | vs FP16 |"
        lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
        for m in r["bytes"]:
            cells = [m.upper(), str(r["bytes"][m])]
            for t in TEXTS:
                x, f = r["main"][t][m], r["main"][t]["fp16"]
                cells += [f"{x['ppl']:.4f}", pct(x["ppl"] / f["ppl"] - 1), f"{x['kl']:.5f}"]
            sp = r.get("speed") or {}
            cells += [f"{sp[m]:.1f}", f"{sp[m] / sp['fp16']:.2f}"] if m in sp and "fp16" in sp else ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if r["ablations"]:
            ab_cmd = (results.get("_ablations") or {}).get("command", "-")
            lines += [f"Ablations on this model (`{ab_cmd}`; one-pass emulation of the token-by-token cache, same "
                      "rows, against the FP16 cache emulated the same way):", "",
                      "| variant | bytes/token | fixed FP16 bytes/sequence |"
                      + "".join(f" {t} vs FP16 | {t} KL |" for t in TEXTS),
                      "|---|---|---|" + "---|---|" * len(TEXTS)]
            for label, a in r["ablations"].items():
                lines.append(f"| {label} | {a['bytes']} | {a.get('fixed', '-')} | " + " | ".join(
                    f"{pct(a[t]['d_ppl'])} | {a[t]['kl']:.5f}" for t in TEXTS if t in a) + " |")
            lines.append("")
    lines.append("Reading and the history of the choices: docs/decisions/0011-kv-cache-x-modes.md.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["quality", "ablations", "speed", "all", "report"], default="all",
                   help="quality: the main table's perplexity and KL; ablations; speed: decode tokens/s (run it on a "
                        "quiet machine); each part replaces its own numbers in --results; report: only print (and "
                        "with --write, write) the section from --results")
    p.add_argument("--models", default="smollm2,stress", help="comma-separated: smollm2, stress")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=2, help="speed: passes per mode (the best counts)")
    p.add_argument("--fresh-profile", action="store_true", help="measure the KV profiles again")
    p.add_argument("--results", default=str(OUT / "results.json"), help="the raw numbers (JSON), kept between parts")
    p.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",")]
    bad = [m for m in args.modes if m not in EXL2_MODES and m not in X_MODES]
    if bad or args.modes[0] != "fp16":
        p.error(f"--modes: {bad or 'the list must start with fp16'} (modes: {', '.join(MODES)})")
    dirs = model_dirs()
    names = [n.strip() for n in args.models.split(",")]
    if any(n not in dirs for n in names):
        p.error(f"--models: use {', '.join(dirs)}")
    command = ("python bench/bench_cache.py " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()
    OUT.mkdir(parents=True, exist_ok=True)
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.part == "report" and not results:
        p.error(f"--part report: no results in {path}")
    if args.part in ("quality", "all"):
        old, results = results, {k: v for k, v in results.items() if k in ("_speed", "_ablations")}
        results["_quality"] = {"command": command, "rows": args.rows, "length": args.length,
                               "threads": torch.get_num_threads()}
        for n in names:
            title, d = dirs[n]
            results[n] = {**run_model(n, title, d, args), "speed": (old.get(n) or {}).get("speed"),
                          "ablations": (old.get(n) or {}).get("ablations") or {}}
            path.write_text(json.dumps(results, indent=1))
    if args.part in ("ablations", "all"):
        results["_ablations"] = {"command": command, "rows": args.rows, "length": args.length}
        for n in names:
            if n not in results:
                p.error(f"--part ablations: no quality results for {n} yet (run --part quality first)")
            results[n]["ablations"] = run_ablations(n, dirs[n][1], args)
            path.write_text(json.dumps(results, indent=1))
    if args.part in ("speed", "all"):
        import datetime

        results["_speed"] = {"command": command, "date": str(datetime.date.today()), "threads": torch.get_num_threads()}
        for n in names:
            if n not in results:
                p.error(f"--part speed: no quality results for {n} yet (run --part quality first)")
            results[n]["speed"] = run_speed(n, dirs[n][1], args)
            path.write_text(json.dumps(results, indent=1))
    text = render(results, command)
    print(text)
    if args.write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
