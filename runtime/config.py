"""config.json read into a ModelConfig: every field the runtime and converter use, checked, with the
architecture's row (arch.py) supplying what config.json leaves out.  Nothing here touches torch."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .arch import Arch, ConfigError, ROPE_TYPES, get_arch

_REQUIRED, _UNSET = object(), object()


@dataclass
class ModelConfig:
    arch: Arch
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None or {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None  # read; applied only on the layers of layer_windows
    quantization_config: dict | None = None  # EXL2 output dirs carry one (docs/format.md section 10)
    # Gemma (Arch.softcap, default_query_pre_attn_scalar, sliding_layers); the defaults are every other row's
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None  # None: the attention scale is 1 / sqrt(head_dim)
    layer_windows: tuple[int | None, ...] = ()  # per layer: the window in keys, or None (full causal); () = none
    sliding_window_pattern: int | None = None  # Gemma3: every pattern-th layer is a full one (Arch.sliding_layers)
    local_rope_theta: float | None = None  # Gemma3: the windowed layers' RoPE base, unscaled; None: one RoPE
    # Granite (Arch.multipliers); the defaults change nothing.  attention_multiplier None: the scale as above
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    rotary_dim: int | None = None  # GLM-4: RoPE on each head's first rotary_dim values (None: all head_dim)
    # Mixture of experts (Arch.moe): experts per layer (0: a dense MLP), experts each token is routed to, and
    # whether their router weights are renormalised to sum to 1; intermediate_size is then each expert's
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = True

    @property
    def attn_scale(self) -> float:
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        s = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
        return 1.0 / math.sqrt(s)

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, d, where: str = "config.json") -> ModelConfig:
        """Parse and check a config.json object: every field this project reads is checked for type and range
        here, once, so that every command fails on a bad value with one line naming the field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, found {type(d).__name__}")
        r = _Reader(d, where)
        arch = get_arch(r.architectures(), where)
        if arch.text_config:
            d = _text_fields(d, arch, where)
            r = _Reader(d, where)
        hidden = r.int("hidden_size")
        heads = r.int("num_attention_heads")
        head_dim = r.int("head_dim", default=arch.default_head_dim)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                                  "(and no head_dim is given)")
            head_dim = hidden // heads
        if head_dim % 2:
            raise ConfigError(f"{where}: head_dim {head_dim} must be even (rotary embeddings pair dimensions)")
        kv_heads = r.int("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        max_pos = r.int("max_position_embeddings", default=2048, maximum=MAX_TOKEN_ID)
        theta, scaling = _parse_rope(r, arch, max_pos)
        qkv_bias, o_bias, mlp_bias = arch.qkv_bias, arch.o_bias, arch.mlp_bias
        if "attention_bias" in arch.bias_from_config:  # a bias on q, k, v and o (transformers)
            qkv_bias = o_bias = r.bool("attention_bias", default=qkv_bias)
        if "attention_bias_qkv" in arch.bias_from_config:  # the same field on q, k and v only (GLM-4)
            qkv_bias = r.bool("attention_bias", default=qkv_bias)
        if "mlp_bias" in arch.bias_from_config:
            mlp_bias = r.bool("mlp_bias", default=mlp_bias)
        vocab = r.int("vocab_size")
        bos = r.int("bos_token_id", default=None, minimum=0)
        eos = r.int_list("eos_token_id")
        for name, ids in (("bos_token_id", [] if bos is None else [bos]), ("eos_token_id", eos)):
            if any(t >= vocab for t in ids):
                raise ConfigError(f"{where}: {name} {ids if len(ids) > 1 else ids[0]} is outside the vocabulary "
                                  f"(vocab_size {vocab})")
        qconf = d.get("quantization_config")
        if qconf is not None and not isinstance(qconf, dict):
            raise ConfigError(f"{where}: quantization_config must be an object, found {type(qconf).__name__}")
        return cls(
            arch=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=r.int(arch.moe_intermediate_field if arch.moe else "intermediate_size"),
            num_layers=r.int("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=r.float("rms_norm_eps", default=arch.default_eps, maximum=1.0),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=r.bool("tie_word_embeddings", default=arch.default_tie_word_embeddings),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            bos_token_id=bos,
            **_multiplier_fields(r, arch),
            **_partial_rotary_fields(r, arch, head_dim),
            eos_token_ids=eos,
            sliding_window=r.int("sliding_window", default=arch.default_sliding_window, minimum=0,
                                 maximum=MAX_TOKEN_ID),
            quantization_config=qconf,
            **_gemma_fields(r, arch),
            **_moe_fields(r, arch),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid JSON (nested too deeply)") from None
        return cls.from_dict(d, where=str(path))


# Sizes beyond these are not a model anyone can convert; they stop a corrupt or hostile config.json before any
# allocation is sized from it (the tensors' shapes are checked against the checkpoint separately).
MAX_DIM = 1 << 24           # hidden/intermediate size, head_dim, heads, vocabulary, layers
MAX_TOKEN_ID = (1 << 31) - 1   # token ids and context lengths


class _Reader:
    """Typed access to config.json fields: a wrong type or range raises ConfigError naming the field.

    JSON numbers are accepted in the forms a JSON writer may produce for the same value (``4096`` and ``4096.0``
    for an integer field; an integer for a float field); booleans are never numbers, NaN and infinities never
    valid values."""

    def __init__(self, d: dict, where: str):
        self.d, self.where = d, where

    def _bad(self, key: str, value, what: str) -> ConfigError:
        shown = json.dumps(value, allow_nan=True) if not isinstance(value, (dict, list)) else type(value).__name__
        if len(shown) > 40:
            shown = shown[:37] + "..."
        return ConfigError(f"{self.where}: {key} is {shown}, expected {what}")

    def _get(self, key: str, default):
        v = self.d.get(key)
        return (True, default) if v is None else (False, v)

    def int(self, key: str, default=_REQUIRED, *, minimum: int = 1, maximum: int = MAX_DIM, value=_UNSET):
        if value is _UNSET:
            missing, v = self._get(key, default)
            if missing:
                if v is _REQUIRED:
                    raise ConfigError(f"{self.where}: missing required field {key!r}")
                return v
        else:
            v = value
        if isinstance(v, float) and math.isfinite(v) and v == int(v):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, v, "an integer")
        if not minimum <= v <= maximum:
            raise self._bad(key, v, f"an integer from {minimum} to {maximum}")
        return v

    def float(self, key: str, default=_REQUIRED, *, maximum: float = math.inf, source: dict | None = None):
        d = self.d if source is None else source
        v = d.get(key)
        if v is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.where}: missing required field {key!r}")
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._bad(key, v, "a finite number")
        if not 0 < v <= maximum:
            raise self._bad(key, v, "a positive number" + (f" up to {maximum:g}" if maximum != math.inf else ""))
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        missing, v = self._get(key, default)
        if missing:
            return v
        if not isinstance(v, bool):
            raise self._bad(key, v, "true or false")
        return v

    def int_list(self, key: str) -> list[int]:
        """An integer or a list of integers (token ids); absent or null -> []."""
        v = self.d.get(key)
        if v is None:
            return []
        items = v if isinstance(v, list) else [v]
        return [self.int(key, minimum=0, maximum=MAX_TOKEN_ID, value=x) for x in items]

    def architectures(self) -> list[str]:
        v = self.d.get("architectures")
        if v is None:
            return []
        names = [v] if isinstance(v, str) else v
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise self._bad("architectures", v, "a list of class names")
        return names


def _gemma_fields(r: _Reader, arch: Arch) -> dict:
    """Soft-capping, the attention scale and the per-layer windows of the architectures that have them (the
    other rows: none of these, whatever config.json says, as transformers builds those models)."""
    out: dict = {}
    where = r.where
    if arch.softcap is not None:
        for key, default in zip(("attn_softcap", "final_softcap"), arch.softcap):
            field = {"attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping"}[key]
            out[key] = r.float(field, default=None) if field in r.d else default
    if arch.default_query_pre_attn_scalar is not None:
        out["query_pre_attn_scalar"] = r.float("query_pre_attn_scalar", default=arch.default_query_pre_attn_scalar)
    if arch.mlp_act == "gelu_tanh":
        for key in ("hidden_activation", "hidden_act"):
            act = r.d.get(key)
            legacy = arch.legacy_gelu and key == "hidden_act" and act == "gelu"
            if act is not None and act not in ("gelu_pytorch_tanh", "gelu_tanh") and not legacy:
                raise ConfigError(f"{where}: {key} {act!r} not supported for {arch.name}; supported: "
                                  f"gelu_pytorch_tanh (what ExLlamaV2 runs)")
            if act is not None:
                break
    if r.d.get("use_bidirectional_attention"):
        raise ConfigError(f"{where}: use_bidirectional_attention is not supported (causal attention only)")
    if arch.sliding_layers == "pattern":
        layers = r.int("num_hidden_layers")
        window = r.int("sliding_window", default=arch.default_sliding_window, maximum=MAX_TOKEN_ID)
        given = r.d.get("layer_types")
        if given is not None:   # transformers 5 states the layer types; they must follow one pattern
            if not isinstance(given, list):
                raise ConfigError(f"{where}: layer_types must be a list, found {type(given).__name__}")
            # the first full layer's position is the pattern (none: any pattern above the depth)
            pattern = given.index("full_attention") + 1 if "full_attention" in given else layers + 1
            expected = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
            if given != expected:
                raise ConfigError(f"{where}: layer_types do not follow one sliding_window_pattern (a full layer "
                                  f"every n-th), the only layout ExLlamaV2 runs for {arch.name}")
        else:
            pattern = r.int("sliding_window_pattern", default=arch.default_sliding_window_pattern)
        if pattern < 2:
            raise ConfigError(f"{where}: sliding_window_pattern {pattern} not supported for {arch.name} "
                              f"(ExLlamaV2 reads a pattern below 2 as alternating layers)")
        out["sliding_window_pattern"] = pattern
        out["layer_windows"] = tuple(None if (i + 1) % pattern == 0 else window for i in range(layers))
        out["local_rope_theta"] = _local_rope(r, arch)
    if arch.sliding_layers == "alternating":
        layers = r.int("num_hidden_layers")
        window = r.int("sliding_window", default=arch.default_sliding_window, maximum=MAX_TOKEN_ID)
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        given = r.d.get("layer_types")
        if given is not None and given != expected:
            raise ConfigError(f"{where}: layer_types differ from the alternating sliding/full layers ExLlamaV2 "
                              f"runs for {arch.name} (sliding on even layers)")
        out["layer_windows"] = tuple(window if t == "sliding_attention" else None for t in expected)
    return out


EXPERT_FIELDS = ("num_local_experts", "num_experts")   # the expert count's config.json names


def _moe_fields(r: _Reader, arch: Arch) -> dict:
    """The expert count, experts per token and renormalisation of a mixture-of-experts row (none otherwise)."""
    if arch.moe is None:
        return {}
    # either name (transformers 5 writes num_local_experts for every MoE model), in ExLlamaV2's order of reading
    field = next((f for f in EXPERT_FIELDS if r.d.get(f) is not None), arch.moe_experts_field)
    n = r.int(field)
    k = r.int("num_experts_per_tok")
    if k > n:
        raise ConfigError(f"{r.where}: num_experts_per_tok {k} exceeds {field} {n}")
    if r.d.get("mlp_only_layers") or r.int("decoder_sparse_step", default=1) != 1:
        raise ConfigError(f"{r.where}: dense layers among the sparse ones (mlp_only_layers, decoder_sparse_step) are "
                          f"not supported for {arch.name} (ExLlamaV2 builds every layer's MLP sparse)")
    renorm = r.bool(arch.moe_renorm_field, default=False) if arch.moe_renorm_field else True
    if not renorm:
        raise ConfigError(f"{r.where}: {arch.moe_renorm_field} false is not supported for {arch.name} (ExLlamaV2 "
                          f"always renormalises the top-k router weights)")
    return {"num_experts": n, "experts_per_token": k, "norm_topk_prob": renorm}


def _partial_rotary_fields(r: _Reader, arch: Arch, head_dim: int) -> dict:
    """GLM-4's rotary_dim: head_dim times partial_rotary_factor (the RoPE dict's, else the top level's, else the
    row's default), an even number of at least 2; none for other rows."""
    if arch.default_partial_rotary is None:
        return {}
    src = rope_source(r.d)
    prf = src.get("partial_rotary_factor", r.d.get("partial_rotary_factor"))
    prf = arch.default_partial_rotary if prf is None else \
        r.float("partial_rotary_factor", source={"partial_rotary_factor": prf}, maximum=1.0)
    dim = int(head_dim * prf)
    if dim < 2 or dim % 2:
        raise ConfigError(f"{r.where}: partial_rotary_factor {prf:g} of head_dim {head_dim} gives {dim} rotary "
                          f"values; expected an even number of at least 2")
    return {"rotary_dim": dim}


def _multiplier_fields(r: _Reader, arch: Arch) -> dict:
    """Granite's four multipliers (Arch.multipliers), transformers' default 1.0 for each; none for other rows."""
    if not arch.multipliers:
        return {}
    return {"embedding_multiplier": r.float("embedding_multiplier", default=1.0),
            "residual_multiplier": r.float("residual_multiplier", default=1.0),
            "attention_multiplier": r.float("attention_multiplier", default=1.0),
            "logits_scaling": r.float("logits_scaling", default=1.0)}


def _text_fields(d: dict, arch: Arch, where: str) -> dict:
    """config.json of a multimodal wrapper -> one flat dict of the text model's fields: text_config's fields
    over the top level's (as transformers reads the text model), except the token ids, which ExLlamaV2 reads
    from the top level only; then the row's config_defaults where a field is absent.  A top-level
    sliding_window_pattern (what ExLlamaV2 reads) that disagrees with the text model's is refused."""
    text = d.get("text_config")
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise ConfigError(f"{where}: text_config must be an object, found {type(text).__name__}")
    flat = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
    flat.update({k: v for k, v in text.items()
                 if not (k in ("bos_token_id", "eos_token_id") and d.get(k) is not None)})
    for k, v in arch.config_defaults:
        if flat.get(k) is None:
            flat[k] = v
    top, inner = d.get("sliding_window_pattern"), text.get("sliding_window_pattern")
    if top is not None and inner is not None and top != inner:
        raise ConfigError(f"{where}: sliding_window_pattern {top} (top level, which ExLlamaV2 reads) differs from "
                          f"text_config's {inner} (which transformers reads)")
    return flat


def _local_rope(r: _Reader, arch: Arch) -> float:
    """The windowed layers' RoPE base (Arch.local_rope_theta), from either layout: transformers 5's
    rope_parameters["sliding_attention"] or 4.x's rope_local_base_freq.  ExLlamaV2 runs them at its fixed base
    without scaling, so any other base or a scaling of these layers is refused."""
    where, src = r.where, r.d.get("rope_parameters")
    local = src.get("sliding_attention") if isinstance(src, dict) else None
    if local is not None:
        if not isinstance(local, dict):
            raise ConfigError(f"{where}: rope_parameters.sliding_attention must be an object")
        rtype = local.get("rope_type") or local.get("type") or "default"
        if rtype != "default":
            raise ConfigError(f"{where}: rope_parameters.sliding_attention type {rtype!r} not supported for "
                              f"{arch.name} (ExLlamaV2 runs the windowed layers' RoPE unscaled)")
        theta = r.float("rope_theta", default=arch.local_rope_theta, source=local)
    else:
        theta = r.float("rope_local_base_freq", default=arch.local_rope_theta)
    if theta != arch.local_rope_theta:
        raise ConfigError(f"{where}: the windowed layers' RoPE base {theta:g} not supported for {arch.name} "
                          f"(ExLlamaV2 runs them at {arch.local_rope_theta:g})")
    return theta


def rope_source(d: dict) -> dict:
    """The dict transformers takes the RoPE settings from: ``rope_scaling`` when present (transformers 4.x
    layout, and 5.x gives it priority), else ``rope_parameters`` (5.x layout)."""
    return d.get("rope_scaling") or d.get("rope_parameters") or {}


def _parse_rope(r: _Reader, arch: Arch, max_pos: int) -> tuple[float, dict | None]:
    """rope_theta and scaling from either layout, with transformers 5's precedence: the RoPE dict
    (:func:`rope_source`) first, then the top-level ``rope_theta``, then the architecture's default."""
    d, where = r.d, r.where
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ConfigError(f"{where}: {key} must be an object, found {type(d[key]).__name__}")
    src = rope_source(d)
    if arch.local_rope_theta is not None and not d.get("rope_scaling") and \
            {"full_attention", "sliding_attention"} & set(src):
        src = src.get("full_attention") or {}   # transformers 5's RoPE per layer type: the full layers' here,
        if not isinstance(src, dict):            # the windowed layers' in _local_rope
            raise ConfigError(f"{where}: rope_parameters.full_attention must be an object")
    nested = [k for k, v in src.items() if isinstance(v, dict)]
    if nested:      # transformers 5 nests RoPE settings by layer type for models that mix them (Gemma 3)
        raise ConfigError(f"{where}: RoPE settings per layer type ({', '.join(nested)}) are not supported for "
                          f"{arch.name}")
    if "rope_theta" in src and src["rope_theta"] is not None:
        theta = r.float("rope_theta", source=src)
    else:
        theta = r.float("rope_theta", default=arch.default_rope_theta)
    rtype = src.get("rope_type") or src.get("type") or "default"
    supported = arch.rope_types or ROPE_TYPES
    if not isinstance(rtype, str) or rtype not in supported:
        key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
        raise ConfigError(f"{where}: {key} type {rtype!r} not supported for {arch.name}; supported: "
                          f"{', '.join(supported)}")
    if arch.partial_rotary:     # transformers reads the RoPE dict's value first, then the top-level one
        prf = src.get("partial_rotary_factor", d.get("partial_rotary_factor"))
        if prf is not None and r.float("partial_rotary_factor", source={"partial_rotary_factor": prf}) != 1.0:
            raise ConfigError(f"{where}: partial_rotary_factor {prf} not supported for {arch.name}: exl2 applies "
                              f"RoPE to whole heads (1.0)")
    for key in ("rope_type", "type"):       # both present must agree
        if src.get(key) is not None and src[key] != rtype:
            raise ConfigError(f"{where}: RoPE settings name two types ({src.get('rope_type')!r} and {src.get('type')!r})")
    if rtype == "default":
        return theta, None
    out = {"rope_type": rtype, "factor": r.float("factor", source=src)}
    if rtype == "llama3":
        lo = r.float("low_freq_factor", source=src)
        hi = r.float("high_freq_factor", source=src)
        if not hi > lo:
            raise ConfigError(f"{where}: llama3 RoPE needs high_freq_factor > low_freq_factor, found {hi:g} and {lo:g}")
        out["low_freq_factor"], out["high_freq_factor"] = lo, hi
        # transformers gives a top-level original_max_position_embeddings priority, then the RoPE dict's
        if d.get("original_max_position_embeddings") is not None:
            orig = r.int("original_max_position_embeddings", maximum=MAX_TOKEN_ID)
        elif src.get("original_max_position_embeddings") is not None:
            orig = r.int("original_max_position_embeddings", maximum=MAX_TOKEN_ID,
                         value=src["original_max_position_embeddings"])
        else:
            orig = max_pos
        out["original_max_position_embeddings"] = orig
    return theta, out
