"""``exl2-inspect``: what an EXL2 model directory holds, and whether every layer is well-formed."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from exl2.quant_kernels import codec
from exl2.runtime.arch import ARCHITECTURES
from exl2.runtime.tensors import TensorSource

_WEIGHT_PREFIXES = sorted({a.weight_prefix for a in ARCHITECTURES.values() if a.weight_prefix})

# What ExLlamaV2 (0.3.2) can load.  Its safetensors reader (stloader.convert_dtype) knows five dtypes and stops
# at any other (int64, float64, int8, uint8, bool, fp8): STORABLE.  The EXL2 kernel then checks exact types
# (ext_qmatrix.cpp): q_weight and q_scale int32, q_scale_max and bias float16, q_groups int16, while q_perm
# and q_invperm are cast to int16 first (ext.make_q_matrix), so int16 and int32 both work there; q_perm is
# rebuilt from q_invperm on load, but a stored one is still read.
STORABLE = ("I32", "I16", "F16", "BF16", "F32")
EXLLAMAV2_LAYER_DTYPES = {
    "q_weight": (torch.int32,), "q_scale": (torch.int32,), "q_scale_max": (torch.float16,),
    "q_groups": (torch.int16,), "q_invperm": (torch.int16, torch.int32), "q_perm": (torch.int16, torch.int32),
    "bias": (torch.float16,),
}
_SHORT = {torch.int32: "int32", torch.int16: "int16", torch.float16: "float16"}


def exllamav2_dtype_error(prefix: str, t: dict) -> str | None:
    """The first tensor of a layer whose dtype ExLlamaV2's loader refuses, as one line; None if all load."""
    for key, allowed in EXLLAMAV2_LAYER_DTYPES.items():
        if key in t and t[key].dtype not in allowed:
            ok = " or ".join(_SHORT[d] for d in allowed)
            return (f"{prefix}.{key}: dtype {str(t[key].dtype).removeprefix('torch.')} cannot be loaded by "
                    f"ExLlamaV2 (it needs {ok})")
    return None


def layer_report(prefix: str, t: dict) -> dict:
    """Widths, group sizes and storage of one quantized layer, plus its format check."""
    rep = {"layer": prefix}
    try:
        codec.validate_layer(t, name=prefix)
    except codec.EXL2FormatError as e:
        rep["error"] = str(e)
        return rep
    bad = exllamav2_dtype_error(prefix, t)
    if bad:
        rep["error"] = bad
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
        t = {s: src.get(f"{p}.{s}") for s in (*codec.SUFFIXES, "q_perm") if f"{p}.{s}" in src}
        layers.append(layer_report(p, t))
    tensors = unreadable_tensors(src, prefixes)
    ok = [r for r in layers if "error" not in r]
    decoder = [r for r in ok if _short(r["layer"]) != "lm_head"]
    total_bits = sum(r["bits"] for r in decoder)
    total_w = sum(r["in_features"] * r["out_features_padded"] for r in decoder)
    files = sorted(p.name for p in Path(model_dir).glob("*.safetensors"))
    return {"model_dir": str(model_dir), "files": files, "layers": layers,
            "decoder_bpw": total_bits / total_w if total_w else None, "tensor_errors": tensors,
            "errors": [r["error"] for r in layers if "error" in r] + tensors}


def unreadable_tensors(src: TensorSource, prefixes) -> list[str]:
    """Tensors outside the EXL2 layers (embeddings, norms, an unquantized head) stored in a dtype ExLlamaV2's
    safetensors reader does not know; read from the file headers, nothing is loaded."""
    layer_keys = {f"{p}.{s}" for p in prefixes for s in EXLLAMAV2_LAYER_DTYPES}
    by_file: dict[Path, list[str]] = {}
    for k in src.keys():
        if k not in layer_keys:
            by_file.setdefault(src.file_of(k), []).append(k)
    out = []
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in sorted(keys):
                dt = f.get_slice(k).get_dtype()
                if dt not in STORABLE:
                    out.append(f"{k}: dtype {dt} cannot be read by ExLlamaV2 (its loader reads {', '.join(STORABLE)})")
    return out


def _short(prefix: str) -> str:
    """A layer's name without an architecture's text-model prefix (Arch.weight_prefix, e.g. language_model.)."""
    for p in _WEIGHT_PREFIXES:
        if prefix.startswith(p):
            return prefix[len(p):]
    return prefix


def _model_order(prefix: str):
    prefix = _short(prefix)
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
    for e in rep.get("tensor_errors", []):
        lines.append(f"UNREADABLE: {e}")
    if rep["decoder_bpw"] is not None:
        lines.append(f"decoder layers: {rep['decoder_bpw']:.4f} bpw (stored bits over K x padded N)")
    n_layers = len(rep["errors"]) - len(rep.get("tensor_errors", []))
    n_tensors = len(rep.get("tensor_errors", []))
    if not rep["errors"]:
        verdict = "all layers valid"
    else:
        verdict = ", ".join(x for x in (f"{n_layers} invalid layer(s)" if n_layers else "",
                                        f"{n_tensors} unreadable tensor(s)" if n_tensors else "") if x)
    lines.append(f"format check: {verdict}")
    return "\n".join(lines)
