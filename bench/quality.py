"""Quality sweep on SmolLM2-135M: EXL2 from 2.5 to 8 bpw against FP16, baselines and peer quantizers.

For the fixture model and its jittered copy (``--variants``; see fixtures/smollm2.py, JITTER_FRACTION):

1. one measurement, then EXL2 at every ``--bpw`` (``exl2.convert``), each written and reloaded from disk;
2. baselines on the same calibration tokens: round-to-nearest at uniform 4 and 8 bits (EXL2's grid,
   128-row groups, head FP16) and uniform GPTQ 4-bit g128 (our GPTQ, head 6 bits like the EXL2 rows);
3. peers when set up (``bench/peers``: llm-compressor GPTQ, llama.cpp with an importance matrix from the
   same calibration text), their weights dequantized into a plain checkpoint;
4. every model scored by the same code on the same held-out tokens: prose (*Persuasion*) and code (CPython
   stdlib), perplexity, KL divergence from the FP16 model (mean, 99th percentile), top-1 agreement;
5. a cache sweep (FP16/Q8/Q6/Q4 cache, token by token, at FP16 weights and at 4.0 bpw; fixture model only,
   as are the 4.0 and 8.0 bpw rows with 8-bit head; the jittered copy gets ``--jitter-bpw`` targets);
6. a plot of KL divergence against bits per weight (``bench/plots/quality_kld.png``).

    python bench/quality.py [--work DIR] [--variants orig,jitter0] [--no-peers] [--write]

Scores are cached in ``WORK/<variant>/scores.json`` (keyed by model and text), so a re-run after adding
one model only scores that model; ``--rescore`` ignores the cache. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peers import load_cal_ids, make_cal_dir, write_checkpoint  # noqa: E402
from bench.report import header, publish, write_section  # noqa: E402
from exl2.convert.accounting import projection_shapes, uniform_strategy  # noqa: E402

DEFAULT_BPW = (4.0, 3.0, 2.5, 5.0, 6.0, 8.0, 3.5, 4.5)   # run in this order: the headline points first
TEXTS = {"prose": "fixtures/data/persuasion.txt", "code": "fixtures/data/stdlib_code.py.txt"}
CACHE_MODES = ("fp16", "q8", "q6", "q4")
# llama.cpp has no ~3-bit point on SmolLM2 (576-wide rows take no 256-block type: its "3-bit" and "2-bit" mixes
# land at 4.0-4.3 bpw, BENCHMARKS.md); IQ2_M (4.04 bpw) is its point nearest 4.0. The jittered copy gets the
# two headline peers only (each peer run costs minutes of CPU).
PEER_SCHEMES = {"llmcompressor": ("W4A16-g64", "W4A16-g192"),
                "llamacpp": ("Q4_K_M", "IQ4_NL", "IQ3_XXS", "IQ2_M")}
JITTER_PEER_SCHEMES = {"llmcompressor": ("W4A16-g64",), "llamacpp": ("Q4_K_M", "IQ2_M")}
PLOT = REPO / "bench" / "plots" / "quality_kld.png"
REPORT_ONLY = False   # --report-only: use what earlier runs made and scored, make nothing new


class NotMade(Exception):
    """--report-only met a model or score that no earlier run produced."""


def _require(done: bool, what: str) -> None:
    if REPORT_ONLY and not done:
        raise NotMade(what)


# ------------------------------------------------------------------------------------------- models


def rtn_checkpoint(src: Path, out: Path, bits: int, group: int) -> dict:
    """Round-to-nearest on EXL2's grid (no act-order, no error feedback), decoder projections only."""
    from safetensors.torch import load_file

    from exl2.quant_kernels import gptq
    from exl2.quant_kernels.qparams import QParams
    from exl2.runtime.loader import load_config

    _require((out / "peer.json").exists(), f"RTN {bits}-bit g{group}")
    cfg = load_config(src)
    qp = QParams.make(group, [bits], [1.0])
    t0 = time.time()
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    projections = tuple(projection_shapes(cfg))
    for name in list(state):
        if name.endswith(".weight") and name.split(".")[-2] in projections:
            w = state[name].float()
            ident = gptq.prepare(None, k=w.shape[1], invert=False)
            ident.perm = torch.arange(w.shape[1])            # plain order: no act-order for RTN
            state[name] = gptq.quantize(w, qp, ident).weight
    _, bpw = uniform_strategy(cfg, qp)
    meta = {"tool": "exl2 (round-to-nearest)", "scheme": f"RTN {bits}-bit g{group}", "bpw": bpw,
            "head": "FP16 (tied embedding)", "quant_wall_s": time.time() - t0}
    write_checkpoint(src, state, out, meta)
    return meta


def gptq_uniform(src: Path, work: Path, cal_ids: torch.Tensor, bits: int, group: int, head_bits: int) -> dict:
    """Our GPTQ with one uniform option everywhere, written in EXL2 format."""
    from exl2.convert import quantize as qpass
    from exl2.convert import writer
    from exl2.quant_kernels.qparams import QParams
    from exl2.runtime.loader import load_config

    cfg = load_config(src)
    strat, bpw = uniform_strategy(cfg, QParams.make(group, [bits], [1.0]))
    model = work / "model"
    _require((model / "config.json").exists(), f"GPTQ {bits}-bit g{group}")
    if not (model / "config.json").exists():
        t0 = time.time()
        qpass.run_quantization(src, cal_ids, strat, head_bits, work)
        wall = time.time() - t0
        writer.compile_model(src, work / "out_tensor", model, quantization_config={"quant_method": "exl2"})
        (work / "meta.json").write_text(json.dumps({"quant_wall_s": wall}))
    wall = json.loads((work / "meta.json").read_text())["quant_wall_s"]
    return {"tool": "exl2 GPTQ (uniform)", "scheme": f"GPTQ {bits}-bit g{group}", "bpw": bpw,
            "head": f"{head_bits}-bit", "quant_wall_s": wall, "dir": str(model)}


def exl2_targets(src: Path, work: Path, bpws, head_bits: int, mrows: int, mlen: int, rows: int,
                 length: int, measurement: Path | None = None, asym: float | None = None) -> list[dict]:
    """EXL2 at each bpw from one measurement (``measurement``: reuse that file instead of measuring;
    ``asym``: the converter's --asym, None for its default)."""
    from exl2.convert.api import ConvertOptions, convert

    common = dict(in_dir=str(src), work_dir=str(work), measurement_rows=mrows, measurement_length=mlen,
                  rows=rows, length=length, validate=False, head_bits=head_bits,
                  measurement=None if measurement is None else str(measurement),
                  # a reused file may predate a change of the checkpoint hash scheme: the caller vouches for it
                  force_measurement=measurement is not None, asym=asym)
    out = []
    _require(all((work / f"bpw-{b:.2f}" / "bench_time.json").exists() for b in bpws),
             f"EXL2 {', '.join(f'{b:g}' for b in bpws)} bpw (head {head_bits} bits)")
    t0 = time.time()
    convert(ConvertOptions(**common, measure_only=True))
    measured = time.time() - t0
    for b in bpws:
        t0 = time.time()
        resumed = (work / f"bpw-{b:.2f}").exists()
        res = convert(ConvertOptions(**common, bits=[b]))["targets"][0]
        timing = work / f"bpw-{b:.2f}" / "bench_time.json"
        if not timing.exists():          # first run of this target: its wall time is the quantize + compile
            timing.write_text(json.dumps({"quant_wall_s": None if resumed else time.time() - t0}))
        out.append({"tool": "exl2", "scheme": f"EXL2 {b:g} bpw" + ("" if head_bits == 6 else f" (head {head_bits})"),
                    "bpw": res["bpw"], "head": f"{head_bits}-bit", "dir": res["output"], "target": b,
                    "quant_wall_s": json.loads(timing.read_text())["quant_wall_s"], "measure_wall_s": measured,
                    "settings": converter_settings(Path(res["output"]), mrows, mlen)})
    return out


def converter_settings(model_dir: Path, mrows: int, mlen: int) -> str:
    """What the converter made an EXL2 row with, from the written model's ``quantization_config`` (the effective
    --asym alpha, option tables, norm, quantization rows) and the measurement rows: one ``key=value`` string,
    which the section prints and bench/summary.py reads back."""
    qc = json.loads((model_dir / "config.json").read_text()).get("quantization_config", {})
    ex, cal = qc.get("exl2", {}), qc.get("calibration", {})
    norm = ex.get("norm")
    return (f"asym={ex.get('asym', 0.0):g} tables={ex.get('tables', 'exl2')} "
            f"norm={'sweep' if norm is None else f'{norm:g}'} rows={cal.get('rows')}x{cal.get('length')} "
            f"measurement={mrows}x{mlen}")


def peer_models(src: Path, work: Path, cal_dir: Path, enabled: bool, table: dict) -> tuple[list[dict], list[str]]:
    import importlib

    models, notes = [], []
    for tool, schemes in table.items():
        try:
            mod = importlib.import_module(f"bench.peers.{tool}")
        except ImportError as e:
            notes.append(f"{tool}: not run ({e})")
            continue
        why = mod.available() if enabled else "--no-peers"
        if why:
            notes.append(f"{tool}: not run ({why})")
            continue
        for scheme in schemes:
            out = work / "peers" / f"{tool}-{scheme}"
            if REPORT_ONLY and not (out / "peer.json").exists():
                notes.append(f"{tool} {scheme}: not finished in time for this report")
                continue
            try:
                if not (out / "peer.json").exists():
                    mod.run(src, cal_dir, out, scheme)
                meta = json.loads((out / "peer.json").read_text())
            except Exception as e:  # a peer failing is a result to report, not a crash of the sweep
                notes.append(f"{tool} {scheme}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                continue
            models.append({**meta, "tool": meta.get("tool", tool), "scheme": f"{meta.get('tool', tool)} {scheme}",
                           "dir": str(out)})
    return models, notes


# ------------------------------------------------------------------------------------------- scoring


def add_follow_up_args(ap: argparse.ArgumentParser, work: str) -> None:
    """The options of a benchmark that builds on this one's models and scores like it (levers, tables)."""
    ap.add_argument("--variants", default="orig,jitter0")
    ap.add_argument("--work", default=str(REPO / "work" / work))
    ap.add_argument("--quality-work", default=str(REPO / "work" / "quality"), help="bench/quality.py's --work")
    ap.add_argument("--eval-rows", type=int, default=4)
    ap.add_argument("--eval-length", type=int, default=512)
    ap.add_argument("--rescore", action="store_true")
    ap.add_argument("--write", action="store_true", help="replace this section of BENCHMARKS.md")


def run_follow_up(args, run_variant, report, section: str) -> int:
    """Run every variant of ``args.variants``, print the report, write it as ``section`` with --write."""
    results = {v: run_variant(v, args) for v in args.variants.split(",") if v}
    text = report(results, args)
    return publish(section, text, args.write)


class Scorer:
    """Scores models on fixed token rows against one FP16 reference, caching the reference log-probs."""

    def __init__(self, ref_dir: Path, texts: dict[str, torch.Tensor], cache_file: Path, rescore: bool):
        from exl2.runtime.loader import load_model

        self.ref_dir, self.texts, self.cache_file = ref_dir, texts, cache_file
        self.cache = {} if rescore or not cache_file.exists() else json.loads(cache_file.read_text())
        self._ref = load_model(ref_dir)
        self._ref_lp: dict[str, list[torch.Tensor]] = {}

    def ref_lp(self, text: str) -> list[torch.Tensor]:
        if text not in self._ref_lp:
            with torch.inference_mode():
                self._ref_lp[text] = [torch.log_softmax(self._ref(r[None])[0, :-1].float(), -1)
                                      for r in self.texts[text]]
        return self._ref_lp[text]

    def score(self, key: str, model_dir: str | Path, text: str) -> dict:
        ck = f"{key}|{text}|{tuple(self.texts[text].shape)}"
        _require(ck in self.cache or Path(model_dir) == Path(self.ref_dir), ck)   # the reference is cheap
        if ck not in self.cache:
            from exl2.runtime.evaluate import EvalConfig, evaluate_rows
            from exl2.runtime.loader import load_model

            r = evaluate_rows(load_model(model_dir), self.texts[text], [EvalConfig("full")],
                              ref_lps=self.ref_lp(text))[0]
            self.cache[ck] = {"ppl": r.ppl, "kld_mean": r.kld_mean, "kld_p99": r.kld_p99, "top1": r.top1,
                              "tokens": r.tokens}
            self._save()
        return self.cache[ck]

    def score_cache(self, key: str, model_dir: str | Path, text: str, modes, rows: int) -> dict:
        """Cache mode: each row fed token by token, past keys/values read back from a ``mode`` cache."""
        from exl2.runtime.evaluate import EvalConfig, evaluate_rows
        from exl2.runtime.loader import load_model

        todo = [m for m in modes if f"{key}|{text}|cache-{m}|{rows}" not in self.cache]
        _require(not todo, f"{key} cache {todo}")
        if todo:
            model = load_model(model_dir)
            res = evaluate_rows(model, self.texts[text][:rows], [EvalConfig("cache", m, 1) for m in todo],
                                ref_lps=self.ref_lp(text)[:rows])
            for m, r in zip(todo, res):
                self.cache[f"{key}|{text}|cache-{m}|{rows}"] = {
                    "ppl": r.ppl, "kld_mean": r.kld_mean, "kld_p99": r.kld_p99, "top1": r.top1, "tokens": r.tokens}
            self._save()
        return {m: self.cache[f"{key}|{text}|cache-{m}|{rows}"] for m in modes}

    def _save(self) -> None:
        tmp = self.cache_file.with_name(self.cache_file.name + ".tmp")
        tmp.write_text(json.dumps(self.cache, indent=1))
        os.replace(tmp, self.cache_file)


# ------------------------------------------------------------------------------------------- report


def head_cell(m: dict) -> str:
    """How the output head is stored, from each tool's own record."""
    h = m.get("head")
    if isinstance(h, dict):                       # llama.cpp: the GGUF type of the (tied) embedding
        t = h.get("output.weight") or h.get("token_embd.weight")
        return f"{t}{' (tied embedding)' if h.get('tied') else ''}"
    if h is None and m.get("tool") == "llm-compressor":
        return "FP16 (tied embedding)"
    return str(h)


def fmt_table(models: list[dict], scores: dict) -> list[str]:
    head = ("| model | bpw | head | prose ppl | prose KL | prose KL p99 | prose top-1 | code ppl | code KL | "
            "code KL p99 | code top-1 | quantize s |")
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        s = scores[m["key"]]
        cells = [m["scheme"], "16" if m["bpw"] is None else f"{m['bpw']:.3f}", head_cell(m)]
        for t in TEXTS:
            r = s[t]
            cells += [f"{r['ppl']:.3f}", f"{r['kld_mean']:.4f}", f"{r['kld_p99']:.3f}", f"{r['top1']:.4f}"]
        cells.append("" if m.get("quant_wall_s") is None else f"{m['quant_wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(results: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install '.[bench]'): no plot"
    variants = list(results)
    fig, axes = plt.subplots(len(variants), len(TEXTS), figsize=(6 * len(TEXTS), 4.2 * len(variants)),
                             squeeze=False)
    markers = {"exl2 GPTQ (uniform)": "s", "exl2 (round-to-nearest)": "v", "llm-compressor": "D",
               "llama.cpp": "^"}
    for vi, v in enumerate(variants):
        models, scores = results[v]["models"], results[v]["scores"]
        for ti, t in enumerate(TEXTS):
            ax = axes[vi][ti]
            ex = sorted((m for m in models if m["tool"] == "exl2" and m["head"] == "6-bit"), key=lambda m: m["bpw"])
            ax.plot([m["bpw"] for m in ex], [scores[m["key"]][t]["kld_mean"] for m in ex], "o-", label="EXL2 (exl2)")
            for m in models:
                if m["tool"] == "exl2" or m["bpw"] is None:
                    continue
                ax.plot(m["bpw"], scores[m["key"]][t]["kld_mean"], markers.get(m["tool"], "x"), label=m["scheme"])
            ax.set_yscale("log")
            ax.set_xlabel("bits per weight (decoder linear layers)")
            ax.set_ylabel("KL divergence from FP16 (nats/token)")
            ax.set_title(f"SmolLM2-135M {results[v]['label']}: {t}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------- main


def run_variant(v: str, args) -> dict:
    from fixtures.smollm2 import build_smollm2

    from exl2.runtime.cache import bytes_per_token
    from exl2.runtime.evaluate import load_data_rows
    from exl2.runtime.loader import load_config

    seed = None if v == "orig" else int(v.removeprefix("jitter"))
    src = build_smollm2(jitter_seed=seed)
    work = Path(args.work) / v
    work.mkdir(parents=True, exist_ok=True)
    cal_dir = work / "cal"
    if not (cal_dir / "input_ids.safetensors").exists():
        make_cal_dir(src, cal_dir, args.rows, args.length)
    cal_ids = load_cal_ids(cal_dir)
    texts = {t: load_data_rows(src, REPO / p, args.eval_rows, args.eval_length) for t, p in TEXTS.items()}
    scorer = Scorer(src, texts, work / "scores.json", args.rescore)
    models, scores, missing = [], {}, []

    def add(make, *a, **kw) -> None:
        """Make models (``make(*a, **kw)`` returns a list) and score them at once: a long sweep reports and
        caches as it goes. With --report-only, what no earlier run finished is listed as missing."""
        try:
            new = make(*a, **kw)
        except NotMade as e:
            missing.append(str(e))
            return
        for m in new:
            m["key"] = m["scheme"]
            try:
                scores[m["key"]] = {t: scorer.score(m["key"], m["dir"], t) for t in TEXTS}
            except NotMade:
                missing.append(m["scheme"])
                continue
            s = scores[m["key"]]
            print(f"[{v}] {m['scheme']:<34} bpw {m['bpw'] or 16:6.3f}  " +
                  "  ".join(f"{t}: ppl {s[t]['ppl']:.3f} KL {s[t]['kld_mean']:.4f}" for t in TEXTS), flush=True)
            models.append(m)

    add(list, [{"tool": "fp16", "scheme": "FP16 (reference)", "bpw": None, "head": "FP16", "dir": str(src)}])
    reuse = Path(args.measurement) if args.measurement and seed is None else None
    bpws = args.bpw if seed is None else args.jitter_bpw
    # the headline comparisons first (4.0 and 3.0 bpw against the baselines and peers), the rest after
    first = [b for b in (4.0, 3.0) if b in bpws]
    for b in first:
        add(exl2_targets, src, work / "exl2", [b], 6, args.mrows, args.mlen, args.rows, args.length,
            measurement=reuse, asym=args.asym)
    add(lambda: [gptq_uniform(src, work / "gptq4g128", cal_ids, 4, 128, 6)])
    for bits in (4, 8):
        add(lambda out: [{**(json.loads((out / "peer.json").read_text()) if (out / "peer.json").exists()
                             else rtn_checkpoint(src, out, bits, 128)), "dir": str(out)}], work / f"rtn{bits}")
    peers, notes = peer_models(src, work, cal_dir, not args.no_peers,
                               PEER_SCHEMES if seed is None else JITTER_PEER_SCHEMES)
    add(list, peers)
    for b in bpws:
        if b not in first:
            add(exl2_targets, src, work / "exl2", [b], 6, args.mrows, args.mlen, args.rows, args.length,
                measurement=reuse, asym=args.asym)
    full = seed is None and not args.quick          # the head-bits row and the cache sweep: fixture model only
    hb8 = [b for b in (4.0, 8.0) if b in bpws]     # 8-bit head: at 4.0 its cost, at 8.0 how "h8" models ship
    if hb8 and full:
        add(exl2_targets, src, work / "exl2-hb8", hb8, 8, args.mrows, args.mlen, args.rows, args.length,
            measurement=reuse or work / "exl2" / "measurement.json", asym=args.asym)
    order = {"fp16": 0, "exl2": 1}
    models.sort(key=lambda m: (order.get(m["tool"], 2), m["tool"], m["bpw"] or 0))
    cache = {}
    if full:
        for m in models:
            if m["tool"] == "fp16" or (m["tool"] == "exl2" and m.get("target") == 4.0 and m["head"] == "6-bit"):
                try:
                    cache[m["scheme"]] = scorer.score_cache(m["key"], m["dir"], "prose", CACHE_MODES,
                                                            args.cache_rows)
                except NotMade as e:
                    missing.append(str(e))
    cfg = load_config(src)
    return {"label": "(fixture)" if seed is None else f"(jittered, seed {seed})", "src": str(src),
            "models": models, "scores": scores, "notes": notes + [f"not finished in time for this report: {x}"
                                                                  for x in missing], "cache": cache,
            "cache_bytes": {m: bytes_per_token(cfg, m) for m in CACHE_MODES},
            "fp16_ppl": {t: scores["FP16 (reference)"][t]["ppl"] for t in TEXTS}}


def report(results: dict, args, elapsed: float) -> str:
    cmd = " ".join(["python bench/quality.py", *args.argv])
    lines = header("Quality sweep, SmolLM2-135M (bench/quality.py)", cmd,
                   " (shared with other jobs while it ran: wall times are indicative)",
                   "" if args.report_only else f" ({elapsed / 60:.0f} min)") + [
             f"Calibration (every tool): the embedded default mix, {args.rows} rows x {args.length} tokens "
             f"(`bench/peers.make_cal_dir`); EXL2 measurement {args.mrows} x {args.mlen}. Scored on held-out "
             f"text never used for calibration: {args.eval_rows} rows x {args.eval_length} tokens each of "
             "*Persuasion* (prose) and CPython stdlib modules (code), every model reloaded from disk (peers "
             "dequantized into a plain checkpoint) and run by the same code. KL is KL(FP16 || model) in nats per "
             "token; bpw counts the decoder's linear weights with their scales (EXL2: as ExLlamaV2 counts; "
             "head and embedding excluded, their storage is in the head column).", ""]
    for v, r in results.items():
        lines += [f"### SmolLM2-135M {r['label']}", "",
                  f"FP16 perplexity: prose {r['fp16_ppl']['prose']:.3f}, code {r['fp16_ppl']['code']:.3f}.", ""]
        lines += fmt_table(r["models"], r["scores"])
        settings = sorted({m["settings"] for m in r["models"] if m.get("settings")})
        if settings:       # bench/summary.py reads these lines back: keep the prefix and the backquotes
            lines += [""] + [f"EXL2 settings ({', '.join(m['scheme'] for m in r['models'] if m.get('settings') == s)}, "
                             f"from quantization_config): `{s}`" for s in settings]
        if r["notes"]:
            lines += [""] + [f"- {n}" for n in r["notes"]]
        if r["cache"]:
            lines += ["", f"Cache sweep (prose, {args.cache_rows} rows x {args.eval_length}, token by token: every "
                          "past key/value read back from the cache):", "",
                      "| weights | cache | bytes/token | perplexity | KL vs FP16 | KL p99 | top-1 |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            for name, modes in r["cache"].items():
                for m, s in modes.items():
                    lines.append(f"| {name} | {m.upper()} | {r['cache_bytes'][m]} | {s['ppl']:.3f} | "
                                 f"{s['kld_mean']:.4f} | {s['kld_p99']:.3f} | {s['top1']:.4f} |")
        lines.append("")
    lines += [f"![KL divergence vs bpw](bench/plots/{PLOT.name})", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(REPO / "work" / "quality"))
    ap.add_argument("--variants", default="orig,jitter0", help="orig and/or jitterS (S: noise seed)")
    ap.add_argument("--bpw", default=",".join(f"{b:g}" for b in DEFAULT_BPW))
    ap.add_argument("--jitter-bpw", default="2.5,3,4,5", help="EXL2 targets on the jittered copy")
    ap.add_argument("--rows", type=int, default=16, help="calibration rows (quantization, every tool)")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--mrows", type=int, default=8, help="EXL2 measurement rows")
    ap.add_argument("--mlen", type=int, default=512)
    ap.add_argument("--asym", type=lambda v: None if v == "auto" else float(v), default=None,
                    help="the EXL2 rows' --asym (default auto, the converter's; each section records what its rows "
                         "were made with, and a work folder made with one value refuses another)")
    ap.add_argument("--eval-rows", type=int, default=4)
    ap.add_argument("--eval-length", type=int, default=512)
    ap.add_argument("--cache-rows", type=int, default=2)
    ap.add_argument("--measurement", help="reuse this measurement.json of the fixture model (orig variant only; "
                    "it must come from the same --mrows/--mlen to be comparable)")
    ap.add_argument("--quick", action="store_true", help="skip the cache sweep and the head-bits row")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--rescore", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="make and score nothing new: report what earlier runs finished (and list the rest)")
    ap.add_argument("--write", action="store_true", help="replace this section of BENCHMARKS.md, save the plot")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    global REPORT_ONLY
    REPORT_ONLY = args.report_only
    args.bpw = [float(b) for b in args.bpw.split(",")]
    args.jitter_bpw = [float(b) for b in args.jitter_bpw.split(",")]
    t0 = time.time()
    results = {v: run_variant(v, args) for v in args.variants.split(",")}
    text = report(results, args, time.time() - t0)
    print(text)
    (Path(args.work) / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if args.write:
        why = plot(results, PLOT)
        if why:
            print(why)
        print(f"wrote {write_section('quality', text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
