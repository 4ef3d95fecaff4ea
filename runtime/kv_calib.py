"""Measuring a model's KV profile (runtime/kv_profile.py) for exl2's own cache modes, and attaching it to a model.

Two measurements on token rows, both with the model resident:

1. **Statistics** (one forward pass): per layer and kv head, the mean and covariance of the keys before RoPE,
   the mean of the values, and the queries' mean energy per channel (summed over the query heads that read the
   kv head).  The first ``sink`` tokens of every row are left out: the cache keeps them in fp16.
2. **Sensitivities** (one pass per stream, reusing the clean pass's layer inputs): for each layer's keys and
   each layer's values, the mean KL divergence of the model's next-token distribution when only that stream
   is quantized at 4 bits with the x transforms, decoding as a token-by-token cache would (every query reads
   the past from the quantized stream and its own key and value unquantized).  The x modes share their bit
   budget out by these numbers.

Where a profile comes from (:func:`ensure_profile`): the ``exl2_kv.json`` the converter wrote into the model
directory (from its calibration rows); else it is derived when the model is loaded, from rows of the embedded
default calibration mix (the model directory's tokenizer); else, without a tokenizer, from the weights alone
(the key and value biases as means, :func:`kv_profile.weights_profile`).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .kv_profile import PROFILE_FILE, SENSITIVITY_BITS, KVProfile, LayerStats, weights_profile
from .kv_x import X_MODES
from .model import Model
from .onepass import OnePassCache, OnePassLayer, x_trip

# Rows of a profile (the converter's calibration rows, or the default calibration mix at load time for a model
# without one): statistics on STAT_ROWS x STAT_LENGTH tokens, sensitivities on SENS_ROWS rows spread over the same
# set (select_rows) cut to SENS_LENGTH, their KL divergence taken at every SENS_STRIDE-th position
# (docs/decisions/0019-kv-sensitivity-stride.md, 0020-conversion-speed-third-round.md).
STAT_ROWS, STAT_LENGTH = 16, 512
SENS_ROWS, SENS_LENGTH = 4, 256
SENS_STRIDE = 2
SKIP_CATEGORIES = ("random", "multilingual_shuffled")  # not text a model reads

Progress = Callable[[int, int], None]


def profile_of(model: Model) -> KVProfile | None:
    return model.layers[0].self_attn.kv_profile if len(model.layers) else None


def attach(model: Model, profile: KVProfile | None) -> None:
    """Make ``profile`` the one the model's attention layers hand to x-mode caches (None detaches)."""
    if profile is not None:
        profile.check(model.cfg)
    for block in model.layers:
        block.self_attn.kv_profile = profile


def select_rows(ids: torch.Tensor, categories: list[str] | None, n: int, length: int) -> torch.Tensor:
    """Up to ``n`` rows spread over ``ids`` [R, L] (every step-th, skipping random and shuffled rows), cut to
    ``length`` tokens."""
    keep = [r for r in range(ids.shape[0]) if categories is None or categories[r] not in SKIP_CATEGORIES]
    if not keep:
        keep = list(range(ids.shape[0]))
    step = max(1, len(keep) // n)
    return ids[keep[::step][:n], :length]


def _bos_rows(model: Model, rows: torch.Tensor) -> torch.Tensor:
    from .evaluate import prepend_bos

    cfg = model.cfg
    if cfg.arch.requires_bos and cfg.bos_token_id is not None:
        return prepend_bos(rows, cfg.bos_token_id)
    return rows


@torch.inference_mode()
def collect_stats(model: Model, rows: torch.Tensor, sink: int = 1) -> list[LayerStats]:
    """Per-layer statistics of pre-RoPE keys, values and queries over ``rows`` [R, T] (float64 sums)."""
    cfg = model.cfg
    L, H, Hkv, D = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rep = H // Hkv
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    acc = [{"n": 0, "k": z(Hkv, D), "kk": z(Hkv, D, D), "q2": z(Hkv, D), "v": z(Hkv, D)} for _ in range(L)]
    hooks = []

    def grab(i, what):
        def hook(_mod, _inp, out):
            x = out.detach()[:, sink:].double().cpu()  # [B, T-sink, n]
            a = acc[i]
            if what == "k":
                x = x.reshape(-1, Hkv, D)
                a["n"] += x.shape[0]
                a["k"] += x.sum(0)
                a["kk"] += torch.einsum("thd,the->hde", x, x)
            elif what == "v":
                a["v"] += x.reshape(-1, Hkv, D).sum(0)
            else:
                a["q2"] += x.reshape(-1, Hkv, rep, D).pow(2).sum((0, 2))
        return hook

    for i, block in enumerate(model.layers):
        attn = block.self_attn
        # the keys and queries the cache sees: after the per-head norms where the architecture has them
        q_mod, k_mod = (attn.q_proj, attn.k_proj) if attn.q_norm is None else (attn.q_norm, attn.k_norm)
        for what, mod in (("q", q_mod), ("k", k_mod), ("v", attn.v_proj)):
            hooks.append(mod.register_forward_hook(grab(i, what)))
    cos, sin = model.rotary.cos_sin(0, rows.shape[1])
    try:
        for r in range(rows.shape[0]):           # the blocks only: nothing here reads the head's output
            x = model.embed(rows[r:r + 1].to(model.device))
            for block in model.layers:
                x = block(x, cos, sin)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, a in enumerate(acc):
        n = a["n"]
        if n < 2:
            raise ValueError(f"KV statistics: only {n} tokens after the sink; give longer rows")
        mean = a["k"] / n
        cov = a["kk"] / n - torch.einsum("hd,he->hde", mean, mean)
        out.append(LayerStats(mean, cov, a["q2"] / n, a["v"] / n))
    return out


@torch.inference_mode()
def measure_sensitivity(model: Model, rows: torch.Tensor, profile: KVProfile, *, scheme_name: str = "q4x",
                        progress: Progress | None = None, stride: int = 1) -> list[tuple[float, float]]:
    """Per layer, the mean KL divergence (nats/token) of the model's output over ``rows`` when only that layer's
    keys, or only its values, are quantized at SENSITIVITY_BITS with the transforms of ``scheme_name`` (read as a
    token-by-token cache reads them, computed in one pass: runtime/onepass.py).  ``stride`` > 1: the output (final
    norm, head, KL) at every ``stride``-th position only, positions ``stride - 1, 2 * stride - 1, ...``, the mean
    scaled to the row (position 0 reads no cache: its KL is 0)."""
    cfg = model.cfg
    L = cfg.num_layers
    scheme = X_MODES[scheme_name]
    R, T = rows.shape
    at = torch.arange(stride - 1, T, stride, device=model.device) if stride > 1 else None
    scale = (T - 1) / T if stride > 1 else 1.0      # the sample leaves out position 0, whose KL is 0
    cos, sin = model.rotary.cos_sin(0, T)

    def log_probs(x):
        return torch.log_softmax(model.logits(x if at is None else x[:, at])[0], -1)

    inputs, refs = [], []  # per row: the input of every layer; the clean log-probs and probabilities
    for r in range(R):
        x = model.embed(rows[r:r + 1].to(model.device))
        xs = []
        for block in model.layers:
            xs.append(x)
            x = block(x, cos, sin)
        inputs.append(xs)
        ref = log_probs(x)
        refs.append((ref, ref.exp()))
    out: list[tuple[float, float]] = []
    for i in range(L):
        plan = profile._layer_plan(i, scheme, SENSITIVITY_BITS, SENSITIVITY_BITS, torch.float32, model.device)
        pair = []
        for which in ("k", "v"):
            layer = OnePassLayer(x_trip(cfg, scheme, i, T, model.compute_dtype, model.device, plan=plan,
                                        streams=which))
            kl, n = 0.0, 0
            for r in range(R):
                x = model.layers[i](inputs[r][i], cos, sin, layer)
                for j in range(i + 1, L):
                    x = model.layers[j](x, cos, sin)
                lp, (ref, p) = log_probs(x), refs[r]
                kl += float((p * (ref - lp)).sum(-1).clamp_min(0).double().sum())
                n += lp.shape[0]
            pair.append(scale * kl / n)
        out.append((pair[0], pair[1]))
        if progress is not None:
            progress(i + 1, L)
    return out


@torch.inference_mode()
def emulate_logits(model: Model, ids: torch.Tensor, scheme, profile: KVProfile | None) -> torch.Tensor:
    """Logits [T, V] of one row ``ids`` [1, T] as a token-by-token pass through a cache of ``scheme`` gives
    them, in one pass over the row (runtime/onepass.py).  ``scheme``: an :class:`XScheme` (read with ``profile``),
    or a callable ``(layer index) -> (fk, fv)`` returning the store's round trips ``fk(k_pre, k)``, ``fv(v)``
    (``None`` = exact).  A token-by-token pass gives the same up to rounding (a rounding difference can flip a
    quantization code; tests compare)."""
    cfg = model.cfg
    T = ids.shape[1]
    layers = []
    for i in range(cfg.num_layers):
        if callable(scheme):
            fk, fv = scheme(i)

            def trip(k_pre, k, v, cos, sin, _profile, fk=fk, fv=fv):
                return (k if fk is None else fk(k_pre, k)), (v if fv is None else fv(v))

            layers.append(OnePassLayer(trip))
        else:
            layers.append(OnePassLayer(x_trip(cfg, scheme, i, T, model.compute_dtype, model.device,
                                              profile=profile), scheme.recent))
    return model(ids, OnePassCache(cfg, T, mode=None, layers=layers))[0]


def calibrate(model: Model, stat_rows: torch.Tensor, sens_rows: torch.Tensor | None, *, source: str,
              progress: Progress | None = None) -> KVProfile:
    """A model's KV profile from token rows (BOS prepended as exl2-eval does for architectures that need it).
    ``sens_rows`` None: statistics only (the modes then use the same width everywhere)."""
    sink = X_MODES["q4x"].sink
    stat_rows = _bos_rows(model, stat_rows)
    cfg = model.cfg
    prof = KVProfile(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, collect_stats(model, stat_rows, sink))
    src = {"derived_from": source, "stat_rows": int(stat_rows.shape[0]), "stat_length": int(stat_rows.shape[1]),
           "sink": sink}
    if sens_rows is not None:
        sens_rows = _bos_rows(model, sens_rows)
        prof.sensitivity = measure_sensitivity(model, sens_rows, prof, progress=progress, stride=SENS_STRIDE)
        src.update(sens_rows=int(sens_rows.shape[0]), sens_length=int(sens_rows.shape[1]), sens_mode="q4x",
                   sens_stride=SENS_STRIDE)
    prof.source = src          # no wall-clock time: a model folder is the same bytes on every run
    prof.check(cfg)
    return prof


def default_mix_profile(model: Model, tokenizer_json: str | Path, *, progress: Progress | None = None) -> KVProfile:
    """The profile from rows of the embedded default calibration mix (what the runtime derives at load)."""
    from exl2.calibration import default_rows

    cfg = model.cfg
    r = default_rows(tokenizer_json, rows=STAT_ROWS + 4, length=STAT_LENGTH, vocab_size=cfg.vocab_size)
    stat = select_rows(r.input_ids, r.categories, STAT_ROWS, STAT_LENGTH)
    sens = select_rows(r.input_ids, r.categories, SENS_ROWS, SENS_LENGTH)
    return calibrate(model, stat, sens, source="default calibration mix (derived at load)", progress=progress)


def ensure_profile(model: Model, model_dir: str | Path | None = None, *,
                   progress: Progress | None = None) -> KVProfile:
    """Attach (and return) the model's KV profile: the one already attached, else ``model_dir/exl2_kv.json``,
    else one derived from the default calibration mix with ``model_dir``'s tokenizer, else one from the
    weights."""
    prof = profile_of(model)
    if prof is not None:
        return prof
    d = Path(model_dir) if model_dir is not None else None
    if d is not None:
        prof = KVProfile.load(d, model.cfg)
    if prof is None and d is not None and (d / "tokenizer.json").is_file():
        prof = default_mix_profile(model, d / "tokenizer.json", progress=progress)
    if prof is None:
        prof = weights_profile(model)
    attach(model, prof)
    return prof


def calibrate_dir(model_dir: str | Path, ids: torch.Tensor, categories: list[str] | None = None, *,
                  device="cpu", progress: Progress | None = None) -> Path | None:
    """The converter's step: load the written model, measure its profile on calibration rows ``ids`` [R, L]
    and store it as ``model_dir/exl2_kv.json`` (a JSON file: ExLlamaV2 reads only config.json, its tokenizer
    files and ``*.safetensors``).  None, writing nothing, when the model does not fit in free memory."""
    from .loader import ModelParts, load_model
    from .stream import fits

    ok, _need, _free = fits(ModelParts(model_dir, device=device), STAT_LENGTH)
    if not ok:  # the runtime measures it at load instead (where the model has to fit anyway)
        return None
    model = load_model(model_dir, device=device)
    stat = select_rows(ids, categories, STAT_ROWS, STAT_LENGTH)
    sens = select_rows(ids, categories, SENS_ROWS, SENS_LENGTH)
    prof = calibrate(model, stat, sens, source="calibration rows of the conversion", progress=progress)
    return prof.save(model_dir)


__all__ = ["PROFILE_FILE", "attach", "calibrate", "calibrate_dir", "collect_stats", "default_mix_profile",
           "ensure_profile", "measure_sensitivity", "profile_of", "select_rows"]
