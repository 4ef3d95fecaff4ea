"""The model card (README.md) written into every converted model's directory."""
from __future__ import annotations

from collections import Counter

from exl2.core.files import atomic_path
from exl2.measure.measurement import entry_options


def allocation_table(strategy: dict) -> list[str]:
    """One row per decoder layer: the options of its attention and MLP projections."""
    layers: dict[int, dict[str, str]] = {}
    for key, entry in strategy.items():
        _, _, i, kind = key.split(".")
        opts = entry_options(entry)
        layers.setdefault(int(i), {})[kind] = ", ".join(f"{p.replace('_proj', '')} {qp.desc()[:-3]}"
                                                        for p, qp in opts.items())
    rows = ["| layer | attention | MLP |", "|---|---|---|"]
    for i in sorted(layers):
        rows.append(f"| {i} | {layers[i].get('self_attn', '')} | {layers[i].get('mlp', '')} |")
    return rows


def width_summary(strategy: dict) -> str:
    """How often each width appears among the chosen options (counted per projection)."""
    c = Counter()
    for entry in strategy.values():
        for qp in entry_options(entry).values():
            c.update(f"{b}-bit" for b in qp.bits)
    return ", ".join(f"{k} in {v} projections" for k, v in sorted(c.items(), key=lambda kv: -int(kv[0][0])))


def kld_plot(path, validation: dict, bpw: float, others: list[tuple[float, float]]) -> bool:
    """``kld.png``: the per-token KL distribution of this model, and mean KL against bpw for every target
    converted so far from the same measurement (``others``: (bpw, mean KL)). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    q = validation["kld_quantiles"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(q, [i / (len(q) - 1) for i in range(len(q))], "-o", ms=3)
    a.set_xscale("symlog", linthresh=1e-3)
    a.set_xlabel("KL divergence from FP16 (nats/token)")
    a.set_ylabel("share of tokens at or below")
    a.set_title(f"{bpw:.3f} bpw: mean {validation['kld_mean']:.4f}, p99 {validation['kld_p99']:.3f}")
    a.grid(True, alpha=0.3)
    pts = sorted(set(others) | {(bpw, validation["kld_mean"])})
    b.plot([x for x, _ in pts], [y for _, y in pts], "o-", label="targets from this measurement")
    b.plot([bpw], [validation["kld_mean"]], "o", ms=10, mfc="none", label="this model")
    b.set_yscale("log")
    b.set_xlabel("bits per weight (decoder)")
    b.set_ylabel("mean KL divergence")
    b.grid(True, which="both", alpha=0.3)
    b.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return True


def cache_lines(validation: dict) -> list[str]:
    cache = validation.get("cache")
    if not cache:
        return []
    rec = validation["recommended_cache"]
    rec_v2 = validation.get("recommended_cache_exllamav2", rec)
    first = cache["fp16"]
    lines = ["## KV cache", "",
             f"Decoding token by token with each cache mode ({first['rows']} held-out row(s) x {first['length']} tokens; "
             "every past key and value read back from the cache), KL divergence against the FP16 source:", "",
             "| cache | bytes/token | perplexity | KL divergence (mean) | top-1 agreement |", "|---|---|---|---|---|"]
    for m, r in cache.items():
        name = m.upper() + (" (recommended)" if m == rec else " (recommended for ExLlamaV2)" if m == rec_v2 else "")
        if "error" in r:
            lines.append(f"| {name} | {r['bytes_per_token']} | not usable: {r['error']} | | |")
        else:
            lines.append(f"| {name} | {r['bytes_per_token']} | {r['ppl']:.4f} | {r['kld_mean']:.5f} | {r['top1']:.4f} |")
    lines += ["", f"Recommended: **{rec.upper()}** cache, the smallest mode that adds at most 10% of the weights' own "
              "KL divergence (or 0.005 nats/token) on this check. Q4 can break some models (Qwen2-7B among them): "
              "check before lowering it further."]
    # --- exl2's own modes (runtime/kv_x.py) ---
    if any(m.endswith("x") for m in cache):
        lines += ["", "Q4X and Q3X are exl2's own cache modes (each token's keys and values transformed per head with "
                  "this model's KV profile, `exl2_kv.json`, before quantizing): only exl2's runtime runs them. "
                  f"For ExLlamaV2 and TabbyAPI the recommendation is **{rec_v2.upper()}**."]
    elif validation.get("cache_x_skipped"):
        lines += ["", f"exl2's own cache modes (Q4X, Q3X) were not checked: {validation['cache_x_skipped']}."]
    # ---
    return lines + [""]


# Which programs read EXL2 files, as of this version (checked 2026-12): ExLlamaV2 0.3.x is the format's own
# loader; TabbyAPI loaded EXL2 through ExLlamaV2 until it removed that backend on 2026-07-14; ExLlamaV3 reads
# its own EXL3 format only.
LOADERS = ("ExLlamaV2 0.3.x (0.3.2 is the last release); TabbyAPI releases up to June 2026 (its ExLlamaV2 "
           "backend was removed on 2026-07-14); exl2's own runtime (`exl2-eval`, `exl2-generate`). "
           "ExLlamaV3 does not read EXL2.")

# Front-matter blocks of the source card that describe the source model's own results, not this quantization.
DROPPED_FRONT_MATTER = ("model-index", "widget")


def front_matter(card: str | None) -> list[str]:
    """The YAML front matter of a source model card (between its opening and closing ``---`` lines) without
    :data:`DROPPED_FRONT_MATTER`, as lines; [] when there is none.  The licence and ``base_model`` fields are kept
    as the source states them (the block is copied, not re-serialised, so no YAML library is needed)."""
    if not card:
        return []
    lines = card.splitlines()
    if not lines or lines[0].strip() != "---":
        return []
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        return []
    out, skipping = [], False
    for line in lines[1:end]:
        top = line[:1] not in (" ", "\t", "-", "#", "") and ":" in line     # a top-level key starts a block
        if top:
            skipping = line.split(":", 1)[0].strip() in DROPPED_FRONT_MATTER
        if not skipping:
            out.append(line)
    return out


def model_card(*, base_model: str, strat: dict, head: dict, head_bits: int, calibration: dict,
               validation: dict | None, checkpoint_sha256: str, tool_version: str, plot: str | None = None,
               asym: float = 0.0, source_card: str | None = None) -> str:
    bpw = strat["bpw"]
    fm = front_matter(source_card)
    lines = (["---", *fm, "---", ""] if fm else []) + [
        f"# {base_model} — EXL2 {strat['bpw_target']:g} bpw",
        "",
        f"EXL2 quantization of `{base_model}` made with exl2 {tool_version}."
        + (" The source model's card is kept beside this one as [ORIGINAL_CARD.md](ORIGINAL_CARD.md): its licence "
           "and terms of use carry over to these weights." if source_card else ""),
        "",
        f"Loaders: {LOADERS}",
        "",
        "| | |",
        "|---|---|",
        f"| target bits per weight | {strat['bpw_target']:g} |",
        f"| achieved bits per weight (decoder layers) | {bpw:.4f} |",
        f"| head bits | {head_bits} ({head['option']}{', round-to-nearest' if head.get('rtn') else ''}) |",
        f"| source checkpoint sha256 | `{checkpoint_sha256}` |",
        f"| calibration | {calibration['dataset']}: {calibration['rows']} rows x {calibration['length']} tokens |",
        f"| calibration perplexity (quantized, first rows) | {head['calibration_ppl']:.3f} |",
        "| GPTQ target | " + (f"the FP16 model's outputs (asymmetric calibration, alpha {asym:g}) |" if asym else
                              "each layer's outputs on its quantized inputs (ExLlamaV2's GPTQ) |"),
        "",
    ]
    if validation:
        p99 = f"{validation['kld_p99']:.4f}" if "kld_p99" in validation else ""   # older validation.json: none
        lines += [
            "## Validation",
            "",
            f"Measured after writing, by reloading this directory from disk, on {validation['rows']} held-out rows "
            f"of {validation['length']} tokens ({validation['tokens']} predicted tokens) of the calibration mix:",
            "",
            "| model | perplexity | KL divergence vs FP16 (mean) | KL divergence (99th percentile) | top-1 agreement |",
            "|---|---|---|---|---|",
            f"| FP16 source | {validation['ppl_fp16']:.4f} | 0 | 0 | 1 |",
            f"| this EXL2 model | {validation['ppl_exl2']:.4f} | {validation['kld_mean']:.5f} | {p99} | "
            f"{validation['top1_agreement']:.4f} |",
            "",
        ]
        if plot:
            lines += [f"![KL divergence]({plot})", ""]
        lines += cache_lines(validation)
    lines += [
        "## Bit allocation",
        "",
        f"The bits were allocated per module from a measurement of each option's output error "
        f"(`measurement.json`, reusable for other targets with `exl2-convert -m measurement.json`). "
        f"Widths used: {width_summary(strat['strategy'])}.",
        "",
        *allocation_table(strat["strategy"]),
        "",
        "## How to load",
        "",
        "- ExLlamaV2 0.3.x: `ExLlamaV2Config(model_dir)`, then `ExLlamaV2(config).load()`.",
        "- TabbyAPI (a release from before its ExLlamaV2 backend was removed in July 2026): put the directory in "
        "its models folder and select it by name"
        + (f" (cache_mode: {validation.get('recommended_cache_exllamav2', validation['recommended_cache']).upper()})."
           if validation and "recommended_cache" in validation else "."),
        "- exl2: `exl2-generate MODEL_DIR -p \"...\"` or `exl2-eval MODEL_DIR --data FILE`"
        + (f" (`--cache {validation['recommended_cache']}`)." if validation and "recommended_cache" in validation
           else "."),
        "",
        "Publishing: upload each bits-per-weight variant as its own branch; `measurement.json` belongs on the main "
        "branch so others can make more variants without measuring again.",
        "",
    ]
    return "\n".join(lines)
