"""``exl2-inspect``: what an EXL2 model directory holds, and whether every layer is well-formed."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from exl2.quant_kernels import codec
from exl2.runtime.loader import TensorSource


def layer_report(prefix: str, t: dict) -> dict:
    """Widths, group sizes and storage of one quantized layer, plus its format check."""
    rep = {"layer": prefix}
    try:
        codec.validate_layer(t, name=prefix)
    except codec.EXL2FormatError as e:
        rep["error"] = str(e)
        return rep
    k, np_ = codec.layer_shape(t)
    groups = codec.decode_groups(t["q_groups"], t["q_weight"].shape[0])
    rows_per_width = Counter()
    sizes = Counter()
    for g in groups:
        rows_per_width[g.bits] += g.rows
        sizes[(g.bits, g.rows)] += 1
    bits = (t["q_weight"].numel() * 32 + 16 * len(groups) + 32 * len(groups) + t["q_scale"].numel() * 32
            + 32 * k + (16 * np_ if "bias" in t else 0))
    rep.update({
        "in_features": k, "out_features_padded": np_, "groups": len(groups),
        "widths": {str(b): rows_per_width[b] for b in sorted(rows_per_width, reverse=True)},
        "group_sizes": ", ".join(f"{b}b x {r} rows" + (f" (x{n})" if n > 1 else "") for (b, r), n in sizes.items()),
        "bias": "bias" in t, "bits": bits, "bpw": bits / (k * np_),
    })
    return rep


def inspect_dir(model_dir: str | Path) -> dict:
    src = TensorSource(model_dir)
    prefixes = sorted({k[: -len(".q_weight")] for k in src.keys() if k.endswith(".q_weight")},
                      key=_model_order)
    layers = []
    for p in prefixes:
        t = {s: src.get(f"{p}.{s}") for s in codec.SUFFIXES if f"{p}.{s}" in src}
        layers.append(layer_report(p, t))
    ok = [r for r in layers if "error" not in r]
    decoder = [r for r in ok if r["layer"] != "lm_head"]
    total_bits = sum(r["bits"] for r in decoder)
    total_w = sum(r["in_features"] * r["out_features_padded"] for r in decoder)
    files = sorted(p.name for p in Path(model_dir).glob("*.safetensors"))
    return {"model_dir": str(model_dir), "files": files, "layers": layers,
            "decoder_bpw": total_bits / total_w if total_w else None,
            "errors": [r["error"] for r in layers if "error" in r]}


def _model_order(prefix: str):
    parts = prefix.split(".")
    if prefix == "lm_head":
        return (1 << 30, "")
    return (int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1, prefix)


def format_report(rep: dict) -> str:
    lines = [f"{rep['model_dir']}: {len(rep['files'])} file(s): {', '.join(rep['files'])}",
             f"{'layer':<44} {'bpw':>6}  widths (rows)                 groups"]
    for r in rep["layers"]:
        if "error" in r:
            lines.append(f"{r['layer']:<44} INVALID: {r['error']}")
            continue
        widths = " ".join(f"{b}b:{n}" for b, n in r["widths"].items())
        lines.append(f"{r['layer']:<44} {r['bpw']:6.3f}  {widths:<29} {r['groups']}")
    if rep["decoder_bpw"] is not None:
        lines.append(f"decoder layers: {rep['decoder_bpw']:.4f} bpw (stored bits over K x padded N)")
    lines.append(f"format check: {'all layers valid' if not rep['errors'] else str(len(rep['errors'])) + ' invalid layer(s)'}")
    return "\n".join(lines)
