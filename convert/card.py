"""The model card (README.md) written into every converted model's directory."""
from __future__ import annotations

from collections import Counter

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


def model_card(*, base_model: str, strat: dict, head: dict, head_bits: int, calibration: dict,
               validation: dict | None, checkpoint_sha256: str, tool_version: str) -> str:
    bpw = strat["bpw"]
    lines = [
        f"# {base_model} — EXL2 {strat['bpw_target']:g} bpw",
        "",
        f"EXL2 quantization of `{base_model}` made with exl2 {tool_version}. The files load unchanged in "
        "ExLlamaV2 (and TabbyAPI, which uses it) and in exl2's own runtime.",
        "",
        "| | |",
        "|---|---|",
        f"| target bits per weight | {strat['bpw_target']:g} |",
        f"| achieved bits per weight (decoder layers) | {bpw:.4f} |",
        f"| head bits | {head_bits} ({head['option']}{', round-to-nearest' if head.get('rtn') else ''}) |",
        f"| source checkpoint sha256 | `{checkpoint_sha256}` |",
        f"| calibration | {calibration['dataset']}: {calibration['rows']} rows x {calibration['length']} tokens |",
        f"| calibration perplexity (quantized, first rows) | {head['calibration_ppl']:.3f} |",
        "",
    ]
    if validation:
        lines += [
            "## Validation",
            "",
            f"Measured after writing, by reloading this directory from disk, on {validation['rows']} held-out rows "
            f"of {validation['length']} tokens ({validation['tokens']} predicted tokens) of the calibration mix:",
            "",
            "| model | perplexity | KL divergence vs FP16 (mean) | top-1 agreement |",
            "|---|---|---|---|",
            f"| FP16 source | {validation['ppl_fp16']:.4f} | 0 | 1 |",
            f"| this EXL2 model | {validation['ppl_exl2']:.4f} | {validation['kld_mean']:.5f} | "
            f"{validation['top1_agreement']:.4f} |",
            "",
        ]
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
        "- ExLlamaV2: `ExLlamaV2Config(model_dir)`, then `ExLlamaV2(config).load()`.",
        "- TabbyAPI: put the directory in its models folder and select it by name.",
        "- exl2: `exl2-generate MODEL_DIR -p \"...\"` or `exl2-eval MODEL_DIR --data FILE`.",
        "",
        "Publishing: upload each bits-per-weight variant as its own branch; `measurement.json` belongs on the main "
        "branch so others can make more variants without measuring again.",
        "",
    ]
    return "\n".join(lines)
