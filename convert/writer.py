"""Compile: the output directory ExLlamaV2 loads (docs/format.md sections 9 and 10).

Tensors in model order (embedding; per layer input_layernorm, q, k, v, o, q_norm and k_norm where the
architecture has them, post_attention_layernorm, gate, up, down; final norm; lm_head), unquantized ones as
fp16 under their HF names and shapes, quantized ones from ``out_tensor/``.  A shard is cut when the next module would pass the size limit; one file is named
``output.safetensors``, several ``output-00001-of-0000N.safetensors``.  No index file is written (the
loader globs ``*.safetensors``).  A multimodal wrapper (Gemma3) writes its text model under its prefix
(``language_model.``) and then copies the tensors ExLlamaV2 copies (Arch.copied_prefixes), as stored.

``config.json`` is the source's with every field ExLlamaV2's loader reads restated in the form it reads
(:func:`loader_config`), plus ``quantization_config``.  Of the source's other files only what a loader
needs is copied (tokenizer, generation config, chat template, licence files; :func:`copied_files`): no
code, no pickles.  The source's model card is kept as ``ORIGINAL_CARD.md``.

Everything is assembled in a uniquely named hidden folder beside the target that replaces the target in
one rename, so a failed run never leaves a half-written model and never touches another folder.  The
target is replaced only when it is empty or is an earlier output of ours (:func:`check_output_dir`).
Files get the permissions the user's umask gives new files (safetensors alone would leave them 0600).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from exl2.core.errors import UserError
from exl2.runtime.arch import MOE_NAMES, TENSOR_NAMES
from exl2.runtime.config import EXPERT_FIELDS, ModelConfig
from exl2.core.files import save_safetensors
from exl2.runtime.loader import ModelParts

# The version of ExLlamaV2's format these files follow (docs/format.md); ExLlamaV2 0.3.x reads them.
EXLLAMAV2_VERSION = "0.3.2"
ORIGINAL_CARD = "ORIGINAL_CARD.md"

# Source files a loader needs besides config.json and the weights (tokenizers in their several layouts,
# sampling defaults, chat templates).  Nothing executable (modeling_*.py, tokenization_*.py) and nothing
# pickled (*.bin, *.pt, *.pkl) is carried over.
LOADER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json", "chat_template.json",
    "chat_template.jinja", "preprocessor_config.json",
})
_LICENCE = re.compile(r"(licen[cs]e|notice|use_policy|copying)([-_.][\w.-]*)?(\.(txt|md))?", re.IGNORECASE)
_SHARD = re.compile(r"output(-\d{5}-of-\d{5})?\.safetensors")
# Files the compile step writes itself (besides shards and copies); validation.json, README.md, kld.png and
# exl2_kv.json (the KV profile of exl2's own cache modes, runtime/kv_profile.py) are added after it is compiled.
OWN_FILES = frozenset({"config.json", "README.md", ORIGINAL_CARD, "measurement.json", "validation.json", "kld.png",
                       "exl2_kv.json"})

# Fields ExLlamaV2 0.3.2 reads for every architecture but that Llama, Qwen2, Qwen3 and Mistral (as transformers
# defines them, and as exl2 runs them) do not have: left in config.json they would change what ExLlamaV2
# computes.  (``use_qk_norm`` is then written back for the architectures with q/k norms, see loader_config.)
FOREIGN_FIELDS = ("logit_scale", "logits_scaling", "scale_emb", "embedding_multiplier", "residual_multiplier",
                  "scale_depth", "attn_logit_softcapping", "final_logit_softcapping", "norm_head",
                  "query_pre_attn_scalar", "attention_multiplier", "use_qk_norm", "partial_rotary_factor",
                  "sliding_window_pattern", "num_local_experts", "num_experts", "num_experts_per_tok")


class OutputDirError(UserError, ValueError):
    """The output folder cannot be written without losing someone's files; one line says why."""


def module_order(n_layers: int, qk_norm: bool = False, sandwich_norms: bool = False,
                 moe: tuple[dict, int] | None = None,
                 norm_names: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, str]]:
    """(name, kind) in writing order; kind is "fp16" (from the source) or "exl2" (from out_tensor).  The q/k
    norms (``qk_norm``) follow o_proj, where ExLlamaV2's compile step puts them; with ``sandwich_norms``
    (Gemma) each module's two norms come before its projections, as there.  ``moe`` (a mixture of experts: its
    MOE_NAMES row and the expert count): the router (fp16) then each expert's w1, w3, w2 in place of the MLP's
    projections, ExLlamaV2's compile order (conversion/compile.py, the ExLlamaV2MoEMLP case).  ``norm_names``:
    the architecture's own names for norms (Arch.norm_names, GLM-4)."""
    names = {**TENSOR_NAMES, **dict(norm_names)}
    out = [(TENSOR_NAMES["embed"], "fp16")]
    for i in range(n_layers):
        out.append((TENSOR_NAMES["attn_norm"].format(i=i), "fp16"))
        if sandwich_norms:
            out.append((names["attn_post_norm"].format(i=i), "fp16"))
        out += [(TENSOR_NAMES[k].format(i=i), "exl2") for k in ("q", "k", "v", "o")]
        if qk_norm:
            out += [(TENSOR_NAMES[k].format(i=i), "fp16") for k in ("q_norm", "k_norm")]
        if sandwich_norms:
            out += [(names[k].format(i=i), "fp16") for k in ("mlp_pre_norm", "mlp_post_norm")]
        else:
            out.append((TENSOR_NAMES["mlp_norm"].format(i=i), "fp16"))
        if moe is None:
            out += [(TENSOR_NAMES[k].format(i=i), "exl2") for k in ("gate", "up", "down")]
            continue
        moe_names, n_experts = moe
        out.append((moe_names["router"].format(i=i) + ".weight", "fp16"))
        out += [(moe_names[k].format(i=i, e=e), "exl2") for e in range(n_experts) for k in ("gate", "up", "down")]
    out.append((TENSOR_NAMES["norm"], "fp16"))
    out.append((TENSOR_NAMES["head"], "exl2"))
    return out


# ------------------------------------------------------------------------------------------------
# What goes into the folder
# ------------------------------------------------------------------------------------------------

def is_licence(name: str) -> bool:
    return bool(_LICENCE.fullmatch(name))


def copied_files(model_dir: Path) -> list[Path]:
    """The source files carried into the output: :data:`LOADER_FILES` and licence files (regular files, or
    links to them as in a Hugging Face cache snapshot)."""
    return [f for f in sorted(Path(model_dir).iterdir())
            if f.is_file() and (f.name in LOADER_FILES or is_licence(f.name))]


def is_own_name(name: str) -> bool:
    """Whether a file of this name in an output folder is one the converter writes or copies there."""
    return bool(_SHARD.fullmatch(name)) or name in OWN_FILES or name in LOADER_FILES or is_licence(name)


def loader_config(src: dict, cfg: ModelConfig, quantization_config: dict) -> dict:
    """The output's config.json: the source's, with every field ExLlamaV2's loader reads stated the way it
    reads them (docs/format.md section 10; ExLlamaV2 0.3.2 ``config.py``).

    - ``rope_theta`` and ``rope_scaling`` at the top level: ExLlamaV2 reads nothing else, so a transformers-5
      config (``rope_parameters`` only) would run with base 10000 and no scaling.  ``rope_scaling`` carries
      ``rope_type`` only (ExLlamaV2 refuses a dict with both ``type`` and ``rope_type``) and, for llama3, its
      ``original_max_position_embeddings``.  A ``rope_parameters`` dict is kept for transformers 5, with the
      same values.
    - one name in ``architectures``, an explicit ``rms_norm_eps`` (ExLlamaV2 has no default for these
      architectures), ``head_dim`` (ExLlamaV2's default is hidden / heads, transformers' for Qwen3 is 128),
      ``num_key_value_heads`` and ``max_position_embeddings`` as integers.
    - no :data:`FOREIGN_FIELDS` and no ``auto_map`` (its code is not copied); ``use_qk_norm: true`` for an
      architecture with q/k norms (ExLlamaV2's default for Qwen3 too, stated rather than left to it).
    """
    if cfg.arch.text_config:
        return _nested_config(src, cfg, quantization_config)
    out = {k: v for k, v in src.items() if k not in FOREIGN_FIELDS and k not in ("auto_map", "rope_scaling")}
    out["architectures"] = [cfg.arch.name]
    out.update(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
               max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
               rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings)
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    if "rope_parameters" in src:
        out["rope_parameters"] = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    if cfg.arch.qk_norm:
        out["use_qk_norm"] = True
    if cfg.arch.moe:     # the expert fields (FOREIGN_FIELDS elsewhere), under the names the source uses
        field = next((k for k in EXPERT_FIELDS if src.get(k) is not None), cfg.arch.moe_experts_field)
        out.update({field: cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token})
        if cfg.arch.moe_intermediate_field != "intermediate_size":   # Qwen3-MoE: the experts' own field
            out[cfg.arch.moe_intermediate_field] = cfg.intermediate_size
            out["intermediate_size"] = src.get("intermediate_size", cfg.intermediate_size)
    if cfg.arch.default_partial_rotary is not None:
        # GLM-4: ExLlamaV2 reads partial_rotary_factor at the top level (default 1) and attention_bias as q/k/v's
        # bias (default false), transformers 0.5 and true
        out["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
        if "rope_parameters" in out:     # where transformers 5 keeps it
            out["rope_parameters"]["partial_rotary_factor"] = out["partial_rotary_factor"]
        out["attention_bias"] = cfg.qkv_bias
    if cfg.arch.multipliers:
        # Granite: the four fields stated (ExLlamaV2 reads the same names; without attention_multiplier it would
        # scale attention by 1 / sqrt(head_dim), transformers by 1.0)
        out.update(embedding_multiplier=cfg.embedding_multiplier, residual_multiplier=cfg.residual_multiplier,
                   attention_multiplier=cfg.attention_multiplier, logits_scaling=cfg.logits_scaling)
    if cfg.arch.softcap is not None:
        # Gemma2/3: ExLlamaV2's defaults differ from transformers' (no caps, 1/sqrt(head_dim), no window), so every
        # value is stated; a cap that is off is written null, which ExLlamaV2 reads as absent and transformers
        # as off (absent, transformers would take its default)
        scalar = cfg.query_pre_attn_scalar        # an integer where it is one: transformers 5 insists on it
        out.update(query_pre_attn_scalar=int(scalar) if scalar == int(scalar) else scalar,
                   sliding_window=cfg.sliding_window,
                   attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap)
    if "attention_bias" in cfg.arch.bias_from_config and ("attention_bias" in src or cfg.o_bias):
        out["attention_bias"] = cfg.o_bias
    if "mlp_bias" in src or cfg.mlp_bias:
        out["mlp_bias"] = cfg.mlp_bias
    pad = src.get("pad_token_id")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)):
        out.pop("pad_token_id")            # ExLlamaV2 reads an integer or nothing
    out["quantization_config"] = quantization_config
    return out


# A multimodal wrapper's config.json (Arch.text_config): the fields ExLlamaV2 0.3.2 reads at the top level only
# (config.py: use_qk_norm, sliding_window_pattern, both caps; architectures and quantization_config), of which
# the pattern and the caps are also the text model's for transformers.
_TOP_ONLY = ("architectures", "quantization_config", "use_qk_norm")
_TOP_TOO = ("sliding_window_pattern", "attn_logit_softcapping", "final_logit_softcapping")
_STATED = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
           "tie_word_embeddings", "query_pre_attn_scalar", "sliding_window", "attention_bias", "mlp_bias",
           "rope_local_base_freq", *_TOP_TOO}


def _nested_config(src: dict, cfg: ModelConfig, quantization_config: dict) -> dict:
    """loader_config for a config.json whose text fields sit under text_config (Gemma3ForConditionalGeneration).

    The text model's fields are written as for a flat config into text_config (ExLlamaV2 reads them there when
    the top level lacks them, transformers reads only them), and where the top level also states one it gets
    the same value (ExLlamaV2 reads the top level first).  The RoPE is stated in both layouts: rope_theta and
    rope_scaling (the full layers', which ExLlamaV2 and transformers 4 read), rope_local_base_freq, and
    transformers 5's rope_parameters per layer type.  The token ids stay where the source has them;
    vision_config and every other top-level field are kept.
    """
    text_src = src.get("text_config") or {}
    flat = {k: v for k, v in src.items() if k not in ("text_config", "vision_config")}
    flat.update(text_src)
    flat_out = loader_config({**flat, "architectures": ["-"]}, dataclasses.replace(
        cfg, arch=dataclasses.replace(cfg.arch, text_config=False)), quantization_config)
    flat_out.pop("rope_parameters", None)
    flat_out["rope_local_base_freq"] = cfg.local_rope_theta
    flat_out["sliding_window_pattern"] = cfg.sliding_window_pattern
    top = {k: v for k, v in src.items() if k not in FOREIGN_FIELDS and k not in ("auto_map", "text_config")}
    text = {k: v for k, v in text_src.items() if k not in FOREIGN_FIELDS and k not in ("auto_map", "rope_scaling")}
    stated = set(flat_out) - set(flat) | _STATED      # what loader_config states, rather than carries over
    for k, v in flat_out.items():
        if k in _TOP_ONLY or k in _TOP_TOO or (k in top and k in stated):
            top[k] = v
        if k not in _TOP_ONLY and (k in text_src or k in stated):
            text[k] = v
    if cfg.rope_scaling is None:
        top.pop("rope_scaling", None)
    full = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    text["rope_parameters"] = {"full_attention": full,
                               "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}}
    top["text_config"] = text
    return top


def _without_auto_map(text: str) -> str | None:
    """tokenizer_config.json without its ``auto_map`` (the code it names is not copied); None if unchanged."""
    try:
        d = json.loads(text)
    except ValueError:
        return None
    if not isinstance(d, dict) or "auto_map" not in d:
        return None
    d.pop("auto_map")
    return json.dumps(d, indent=2, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------
# Whose folder it is
# ------------------------------------------------------------------------------------------------

def _within(a: Path, b: Path) -> bool:
    """a is b or lies inside b (both resolved)."""
    return a == b or b in a.parents


def check_output_dir(target: str | Path, flag: str, protected: dict[str, str | Path]) -> None:
    """Refuse an output folder whose replacement would lose files this tool did not write.

    ``protected`` maps a flag to a folder that must neither be the output, nor lie around it, nor inside it
    (the source checkpoint, the job folder).  An existing folder is accepted when it is empty, or when it is
    an earlier output of ours: its config.json has our ``quantization_config`` block and every entry is a file
    the converter writes or copies.  Raises :class:`OutputDirError` naming what is in the way.
    """
    target = Path(target)
    t = target.resolve()
    for pflag, folder in protected.items():
        p = Path(folder).resolve()
        if t == p:
            raise OutputDirError(f"{flag} {target}: is the same folder as {pflag}; write the model to another folder")
        if _within(p, t):
            raise OutputDirError(f"{flag} {target}: contains {pflag} {folder}; replacing it would delete that; "
                                 f"choose a folder outside it")
        if _within(t, p):
            raise OutputDirError(f"{flag} {target}: lies inside {pflag} {folder}; choose a folder outside it")
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise OutputDirError(f"{flag} {target}: exists and is not a folder; choose a new or empty folder")
    entries = sorted(target.iterdir())
    if not entries:
        return
    strangers = [e.name + ("/" if e.is_dir() else "") for e in entries
                 if e.is_symlink() or not e.is_file() or not is_own_name(e.name)]
    if not strangers and not is_own_output(target):
        strangers = ["config.json (no exl2 quantization_config: not an output of this tool)"]
    if strangers:
        shown = ", ".join(strangers[:4]) + (f" and {len(strangers) - 4} more" if len(strangers) > 4 else "")
        raise OutputDirError(f"{flag} {target}: holds files this tool did not write ({shown}); move them away, "
                             f"or choose a new or empty folder")


def is_own_output(folder: Path) -> bool:
    """The folder's config.json carries our mark: ``quantization_config.exl2`` with ``"tool": "exl2"``."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return cfg["quantization_config"]["exl2"]["tool"] == "exl2"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give the folder and every file in it the mode the user's umask gives new ones."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~mask)


def _clear_leftovers(target: Path) -> None:
    """Remove staging folders of ours that a killed run left beside ``target`` (names only we use)."""
    for stale in target.parent.glob(f".{target.name}.exl2-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

def compile_model(model_dir: str | Path, out_tensor: str | Path, target: str | Path, *, shard_mib: float = 8192,
                  quantization_config: dict, extra_files: dict[str, str] | None = None,
                  protected: dict[str, str | Path] | None = None, flag: str = "-cf") -> list[Path]:
    """Write the EXL2 model to ``target``; returns the shard paths.  ``shard_mib`` 0 means no limit.

    ``extra_files`` maps file names to text written alongside (measurement.json, ...).  ``protected`` and
    ``flag``: see :func:`check_output_dir`, which runs first.  Our mark (``"tool": "exl2"`` in
    ``quantization_config.exl2``) is added to the config, so a later run may replace the folder.
    """
    model_dir, out_tensor, target = Path(model_dir), Path(out_tensor), Path(target)
    check_output_dir(target, flag, {"-i": model_dir, **(protected or {})})
    parts = ModelParts(model_dir, dtype=torch.float32)
    limit = int(shard_mib * 1024 * 1024) if shard_mib > 0 else None
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.exl2-partial-", dir=target.parent))
    try:
        paths = _write_into(tmp, parts, model_dir, out_tensor, target, limit, quantization_config, extra_files)
        apply_umask(tmp)
        check_output_dir(target, flag, {"-i": model_dir, **(protected or {})})   # unchanged while we wrote?
    except OSError as e:        # name the file the user will look for, not the staging copy we remove
        shutil.rmtree(tmp, ignore_errors=True)
        name = e.filename
        if name and Path(name).parent == tmp:
            name = str(target / Path(name).name)
        raise OSError(e.errno, e.strerror or str(e), name) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, target)
    return paths


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace ``target`` by the finished folder ``tmp``: two renames on one file system; the earlier folder is
    put back if the second fails, and deleted only once the new one is in place."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.exl2-old-", dir=target.parent))
        os.replace(target, old / "model")
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old / "model", target)
            old.rmdir()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_into(tmp: Path, parts: ModelParts, model_dir: Path, out_tensor: Path, target: Path, limit: int | None,
                quantization_config: dict, extra_files: dict[str, str] | None) -> list[Path]:
    arch = parts.cfg.arch
    prefix = arch.weight_prefix         # the text model's names in the output, as in the source (ExLlamaV2's lm_prefix)

    def module_tensors(name: str, kind: str) -> dict[str, torch.Tensor]:
        if kind == "exl2":
            path = out_tensor / f"{name}.safetensors"
            if not path.exists():
                raise FileNotFoundError(f"{path}: quantized tensors of {name} missing (quantization incomplete)")
            return {prefix + k: v for k, v in load_file(str(path)).items()}
        if kind == "copy":          # Arch.copied_prefixes: as stored, renamed as ExLlamaV2 does
            out = name
            for old, new in arch.copied_renames:
                out = out.replace(old, new)
            return {out: parts.src.get(name)}
        return {prefix + name: parts.src.get(name).to(torch.float16)}

    def module_bytes(name: str, kind: str) -> int:
        if kind == "exl2":   # the file is the tensors plus a small header
            return (out_tensor / f"{name}.safetensors").stat().st_size
        if kind == "copy":
            t = parts.src.get(name)
            return t.numel() * t.element_size()
        return 2 * math.prod(parts.src.shape(name))          # written as fp16

    order = module_order(parts.cfg.num_layers, arch.qk_norm, arch.sandwich_norms,
                         (MOE_NAMES[arch.moe], parts.cfg.num_experts) if arch.moe else None,
                         norm_names=arch.norm_names)
    keys = parts.src.keys()
    order += [(k, "copy") for p in arch.copied_prefixes for k in sorted(keys) if k.startswith(p)]
    # Cut shards by size before writing, so each shard's name can carry the count.
    shards: list[list[tuple[str, str]]] = [[]]
    size = 0
    for name, kind in order:
        n = module_bytes(name, kind) if limit else 0
        if limit and shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, kind))
        size += n
    paths = []
    for i, mods in enumerate(shards):
        fname = "output.safetensors" if len(shards) == 1 else f"output-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, kind in mods:
            tensors.update(module_tensors(name, kind))
        save_safetensors(tmp / fname, tensors)
        paths.append(target / fname)

    for f in copied_files(model_dir):
        text = _without_auto_map(f.read_text(encoding="utf-8")) if f.name == "tokenizer_config.json" else None
        if text is None:
            shutil.copyfile(f, tmp / f.name)
        else:
            (tmp / f.name).write_text(text, encoding="utf-8")
    card = model_dir / "README.md"
    if card.is_file():
        shutil.copyfile(card, tmp / ORIGINAL_CARD)
    src = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    qconf = dict(quantization_config)
    qconf["exl2"] = {**(qconf.get("exl2") or {}), "tool": "exl2"}
    (tmp / "config.json").write_text(json.dumps(loader_config(src, parts.cfg, qconf), indent=4), encoding="utf-8")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    return paths
