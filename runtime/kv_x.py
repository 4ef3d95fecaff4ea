"""exl2's own quantized KV-cache modes, ``q4x`` and ``q3x`` (not ExLlamaV2 formats: only this runtime reads them).

ExLlamaV2's Q4 rotates 32 values at a time and gives every 32 one fp16 scale, so one large value (Qwen2's key
bias, hundreds where other channels are tens) sets the scale of all of them.  The ``x`` modes transform each
token's key and value per head before quantizing, with statistics of the model measured once (the *KV
profile*, :class:`~exl2.runtime.kv_profile.KVProfile`, stored as ``exl2_kv.json`` by the converter or derived at load):

keys (quantized before RoPE)
    c = k - mu_k                       mu_k: the calibrated mean of the pre-RoPE key, per channel
    z = c A_k                          A_k = W^1/2 U diag(lambda^-1/4) H   (per kv head, D x D)
        W      = diag of the queries' mean energy per channel (both channels of a RoPE pair averaged: over
                 relative positions a pair's query weights its two channels alike)
        U, lambda: eigenvectors and eigenvalues of W^1/2 Cov(c) W^1/2 (the key covariance as the queries see it)
        lambda^-1/4: the high-resolution optimum for one uniform width over all components
        H      : the orthonormal Hadamard matrix of order D (spreads every component over the whole head)
    stored: z quantized (quant_kernels/kvx_quant.py: b bits, one fp16 scale per ``group`` values)
    read:   k' = RoPE_t(z' A_k^-1 + mu_k)  at the token's position t

values
    z = (v - mu_v) H, stored the same way; read v' = z' H + mu_v.

Without quantization every step is exactly undone (A_k^-1 A_k = I, H H = I, the mean is added back before RoPE),
so attention sees the keys and values it would see uncached (tests check this in float64 and against the
uncached model's logits).  Two more ingredients:

- the first token of the sequence (``sink``) is kept in fp16: most heads park attention there, so its error
  reaches every later query;
- the last ``recent`` tokens before each query are read from fp16 copies (a ring of ``recent`` tokens; each
  token is quantized once as it is stored and read from its codes once it is older): local attention heads read
  mostly these (KIVI keeps such a window too).  Both ``q4x`` and ``q3x`` keep 8;
- bits per *stream* (a layer's keys, or its values): the profile holds each stream's measured cost (the KL
  divergence of the model's output when only that stream is quantized at 4 bits); :meth:`KVProfile.allocation`
  shares the mode's budget out greedily by the predicted gain of each extra bit (``MSE_FACTOR``), within
  ``min_bits .. 8``.

Budgets are bits per cached element including scales, averaged over all streams: ``q4x`` 4.725 (ExLlamaV2 Q4's
4.5 + 5 %), ``q3x`` 3.675 (a 3-bit layout with the same scales + 5 %).  The sink and the recent window add
``sink + recent`` FP16 tokens per sequence, a fixed amount (:func:`x_fixed_bytes`) not counted in
``bytes_per_token``.

:class:`LayerKVX` is the cache layer of these modes; like ExLlamaV2's modes, a chunk's own keys and values are
used unquantized for its own attention.

Memory, honestly: ``bytes_per_token`` counts the store (codes and scales), what a fused kernel reading the codes
would hold.  This reference implementation also keeps, like :class:`~exl2.runtime.cache.LayerKV`'s quantized
modes, a working copy of every stored token decoded once into the compute dtype (so a token-by-token pass costs
linear time), which takes as much memory as an FP cache of that dtype: on this runtime the x modes measure what
a quantized cache does to the model's output, they do not yet save memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from typing import TYPE_CHECKING

from exl2.quant_kernels.kvx_quant import MSE_FACTOR, kvx_codes, kvx_decode, pack_codes, unpack_codes

from .config import ModelConfig

if TYPE_CHECKING:
    from .kv_profile import LayerPlan



@dataclass(frozen=True)
class XScheme:
    """One of exl2's own cache modes, or a variant of it (bench/bench_cache.py measures the ingredients)."""

    budget: float  # bits per cached element, codes and scales, averaged over all layers' keys and values
    min_bits: int  # no stream gets fewer bits
    group: int = 64  # values per fp16 scale (at most the head size)
    sink: int = 1  # leading tokens of a sequence kept in fp16
    recent: int = 0  # the last tokens before each query read in fp16 (a ring buffer; quantized once older)
    k_transform: str = "klt"  # "klt" (calibrated, see the module docstring), "hadamard" or "none"
    v_transform: str = "hadamard"  # "hadamard" or "none"
    center_k: bool = True  # subtract the calibrated pre-RoPE key mean (added back exactly)
    pre_rope: bool = True  # quantize keys before RoPE; False: after it (ablation; "klt" needs pre-RoPE keys)
    center_v: bool = False  # subtract the calibrated value mean (does not pay: docs/decisions/0011-kv-cache-x-modes.md)
    allocate: bool = True  # bits per stream from the profile's sensitivities; False: the same width everywhere
    quantize: bool = True  # False: every transform without the quantizer (tests: attention is unchanged)

    def group_for(self, head_dim: int) -> int:
        return math.gcd(self.group, head_dim)


X_MODES: dict[str, XScheme] = {
    "q4x": XScheme(budget=4.5 * 1.05, min_bits=3, recent=8),
    "q3x": XScheme(budget=3.5 * 1.05, min_bits=2, recent=8),
}

MAX_BITS = 8


def x_arch_error(cfg: ModelConfig) -> str | None:
    """Why no x mode can run this architecture (its KV profile could not be measured), or None."""
    # The profile's measurement and the one-pass emulation run the model's own blocks (runtime/onepass.py), but
    # the modes were designed and measured on the Llama layout only: not yet offered where embeddings are scaled,
    # outputs normed or residuals multiplied (Gemma, Gemma 2/3, Granite)
    if cfg.arch.sandwich_norms or cfg.arch.embed_scale or cfg.arch.multipliers:
        return (f"exl2's own cache modes are not supported for {cfg.arch.name} (not measured on its embedding "
                f"scale, multipliers, sliding windows, soft-capping or output norms); use fp16, q8, q6 or q4")
    return None


def x_mode_error(cfg: ModelConfig, scheme: XScheme) -> str | None:
    """Why a scheme cannot hold this model's keys and values, or None when it can."""
    why = x_arch_error(cfg)
    if why:
        return why
    D = cfg.head_dim
    if D < 8 or D & (D - 1):
        return f"head_dim {D} is not a power of two of at least 8 (the x modes rotate whole heads); use fp16 or q4"
    return None


def stream_bits_total(cfg: ModelConfig, scheme: XScheme) -> int:
    """Code bits per element summed over the 2 x num_layers streams (what the budget leaves after the scales)."""
    overhead = 16 / scheme.group_for(cfg.head_dim)
    streams = 2 * cfg.num_layers
    total = math.floor(streams * (scheme.budget - overhead) + 1e-9)
    return max(min(total, streams * MAX_BITS), streams * scheme.min_bits)


def x_bytes_per_token(cfg: ModelConfig, scheme: XScheme) -> int:
    """Cache bytes per token over all layers (codes and scales; the FP16 sink token is per sequence)."""
    kv = cfg.kv_dim
    return stream_bits_total(cfg, scheme) * kv // 8 + 2 * cfg.num_layers * (kv // scheme.group_for(cfg.head_dim)) * 2


def x_fixed_bytes(cfg: ModelConfig, scheme: XScheme) -> int:
    """Bytes per sequence on top of :func:`x_bytes_per_token`: the sink and recent tokens held in fp16."""
    return (scheme.sink + scheme.recent) * 2 * cfg.kv_dim * 2 * cfg.num_layers


def allocate_bits(sensitivity: list[tuple[float, float]], total: int, min_bits: int,
                  max_bits: int = MAX_BITS) -> list[tuple[int, int]]:
    """Bits per (K, V) stream of each layer: start every stream at ``min_bits`` and give each further bit to the
    stream whose predicted cost drops most (cost at b bits = sensitivity x MSE_FACTOR[b]); ties go to the
    earlier stream (layer order, K before V).  ``total``: the code bits to share out."""
    streams = [s for pair in sensitivity for s in pair]
    bits = [min_bits] * len(streams)
    left = total - min_bits * len(streams)
    if left < 0:
        raise ValueError(f"budget of {total} bits is below {min_bits} bits for each of {len(streams)} streams")
    while left > 0:
        best, gain = -1, -1.0
        for j, (s, b) in enumerate(zip(streams, bits)):
            if b < max_bits:
                g = s * (MSE_FACTOR[b] - MSE_FACTOR[b + 1])
                if g > gain:
                    best, gain = j, g
        if best < 0:
            break
        bits[best] += 1
        left -= 1
    return [(bits[2 * i], bits[2 * i + 1]) for i in range(len(sensitivity))]


# ---------------------------------------------------------------------------------------------- cache layer


class LayerKVX:
    """One layer's store for an x mode: per token and kv head, packed codes of the transformed key and value
    and their fp16 scales; the first ``scheme.sink`` tokens in fp16; a working copy of the decoded past.

    Called through :meth:`update_pre_rope` (the attention hook passes the pre-RoPE keys, RoPE's cos/sin for
    the chunk and the model's :class:`KVProfile`); the plan (transforms, widths) is taken from the profile on the
    first call and the code buffers are allocated then."""

    takes_pre_rope = True  # the attention hook calls update_pre_rope (runtime/model.py)

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, scheme: XScheme, index: int,
                 cfg: ModelConfig, dtype: torch.dtype, device):
        self.batch, self.max_len, self.kv_heads, self.head_dim = batch, max_len, kv_heads, head_dim
        self.scheme, self.index, self.cfg, self.dtype, self.device = scheme, index, cfg, dtype, device
        self.group = scheme.group_for(head_dim)
        self.plan: LayerPlan | None = None
        self._profile = None
        self.kw = torch.zeros(batch, max_len, kv_heads, head_dim, dtype=dtype, device=device)
        self.vw = torch.zeros_like(self.kw)
        n_sink = min(scheme.sink, max_len)
        self.sink_k = torch.zeros(batch, n_sink, kv_heads, head_dim, dtype=torch.float16, device=device)
        self.sink_v = torch.zeros_like(self.sink_k)
        W = scheme.recent
        self.ring_k = torch.zeros(batch, W, kv_heads, head_dim, dtype=torch.float16, device=device)
        self.ring_v = torch.zeros_like(self.ring_k)

    def _bind(self, profile) -> LayerPlan:
        if profile is None:
            raise ValueError("this cache mode needs the model's KV profile: call "
                             "exl2.runtime.kv_calib.ensure_profile(model, model_dir) after loading (exl2-eval, "
                             "exl2-generate and the converter's validation do)")
        if profile is not self._profile:
            # transforms in fp32 whatever the compute dtype (fp16 sums of a head's products lose too much)
            plan = profile.plan(self.cfg, self.scheme, torch.float32, self.device)[self.index]
            if self.plan is None or (plan.k_bits, plan.v_bits) != (self.plan.k_bits, self.plan.v_bits):
                B, L, Hkv, D, G = self.batch, self.max_len, self.kv_heads, self.head_dim, self.group
                self.kq = torch.zeros(B, L, Hkv, D * plan.k_bits // 8, dtype=torch.uint8, device=self.device)
                self.vq = torch.zeros(B, L, Hkv, D * plan.v_bits // 8, dtype=torch.uint8, device=self.device)
                self.ks = torch.zeros(B, L, Hkv, D // G, dtype=torch.float16, device=self.device)
                self.vs = torch.zeros_like(self.ks)
            self.plan, self._profile = plan, profile
        return self.plan

    def bytes_per_token(self) -> int:
        p = self.plan
        if p is None:
            raise ValueError("bytes_per_token: the layer has not stored anything yet (its widths come with the "
                             "profile)")
        return self.kv_heads * (self.head_dim * (p.k_bits + p.v_bits) // 8 + 2 * 2 * (self.head_dim // self.group))

    # the transforms alone, shared with the calibration's emulation (kv_calib.py)

    def encode_decode_k(self, k_pre: torch.Tensor, cos, sin, past_len: int, store: bool) -> torch.Tensor:
        from .model import apply_rope

        p, s = self.plan, self.scheme
        c = k_pre.to(p.a_k.dtype) - p.mu_k  # [B, T, Hkv, D]
        if not s.pre_rope:  # RoPE is linear: RoPE(k) - RoPE(mu) = RoPE(k - mu)
            c = apply_rope(c, cos, sin)
        z = torch.einsum("bthd,hde->bthe", c, p.a_k)  # [B, T, Hkv, D]
        if s.quantize:
            z = self._round_trip(z, p.k_bits, "k", past_len, store)
        c = torch.einsum("bthd,hde->bthe", z, p.a_k_inv)
        if s.pre_rope:
            return apply_rope(c + p.mu_k, cos, sin)
        return c + apply_rope(p.mu_k.expand_as(c), cos, sin)

    def _round_trip(self, z: torch.Tensor, bits: int, which: str, past_len: int, store: bool) -> torch.Tensor:
        """z [B, T, Hkv, D] quantized at ``bits`` and decoded; with ``store`` the packed codes and scales go into
        the ``which`` ("k" or "v") buffers at past_len.. and the decoded values are read back from them (what a
        later query sees)."""
        codes, scales = kvx_codes(z, bits, self.group)
        if store:
            codes_buf, scales_buf = (self.kq, self.ks) if which == "k" else (self.vq, self.vs)
            span = slice(past_len, past_len + z.shape[1])
            codes_buf[:, span] = pack_codes(codes, bits)
            scales_buf[:, span] = scales
            codes = unpack_codes(codes_buf[:, span], bits, self.head_dim)
            scales = scales_buf[:, span]
        return kvx_decode(codes, scales, bits, self.group).to(z.dtype)

    def encode_decode_v(self, v: torch.Tensor, past_len: int, store: bool) -> torch.Tensor:
        p, s = self.plan, self.scheme
        z = torch.einsum("bthd,hde->bthe", v.to(p.a_v.dtype) - p.mu_v, p.a_v)
        if s.quantize:
            z = self._round_trip(z, p.v_bits, "v", past_len, store)
        return torch.einsum("bthd,hde->bthe", z, p.a_v_inv) + p.mu_v

    def update_pre_rope(self, k_pre: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_len: int,
                        cos: torch.Tensor, sin: torch.Tensor, profile) -> tuple[torch.Tensor, torch.Tensor]:
        """k_pre/k/v [B, T, Hkv, D] (k_pre before RoPE, k after) for positions past_len .. past_len+T-1; cos/sin
        [T, D] of those positions -> all keys/values [B, P+T, Hkv, D] (the chunk's own unquantized)."""
        for name, t in (("k_pre", k_pre), ("k", k), ("v", v)):
            if t.dim() != 4 or t.shape[0] != self.batch or t.shape[2:] != (self.kv_heads, self.head_dim):
                raise ValueError(f"LayerKVX.update_pre_rope: {name} must be [{self.batch}, T, {self.kv_heads}, "
                                 f"{self.head_dim}], got {tuple(t.shape)}")
        T = k.shape[1]
        if past_len + T > self.max_len:
            raise ValueError(f"LayerKVX: {past_len} + {T} tokens exceed max_len {self.max_len}")
        self._bind(profile)
        end = past_len + T
        n_sink, W = self.sink_k.shape[1], self.scheme.recent
        lo = max(past_len - W, n_sink, 0)  # past positions lo .. past_len-1 are read from the fp16 ring
        if lo < past_len:
            idx = torch.arange(lo, past_len, device=self.ring_k.device) % W
            k_near = self.ring_k.index_select(1, idx).to(k.dtype)
            v_near = self.ring_v.index_select(1, idx).to(v.dtype)
        with torch.no_grad():
            self.kw[:, past_len:end] = self.encode_decode_k(k_pre, cos, sin, past_len, True).to(self.dtype)
            self.vw[:, past_len:end] = self.encode_decode_v(v, past_len, True).to(self.dtype)
            if past_len < n_sink:  # the sequence's first tokens: fp16, as an FP16 cache holds them
                a, b = past_len, min(end, n_sink)
                self.sink_k[:, a:b] = k[:, : b - a].to(torch.float16)
                self.sink_v[:, a:b] = v[:, : b - a].to(torch.float16)
                self.kw[:, a:b] = self.sink_k[:, a:b].to(self.dtype)
                self.vw[:, a:b] = self.sink_v[:, a:b].to(self.dtype)
        if lo < past_len:
            k_all = torch.cat([self.kw[:, :lo].to(k.dtype), k_near, k], dim=1)  # [B, P+T, Hkv, D]
            v_all = torch.cat([self.vw[:, :lo].to(v.dtype), v_near, v], dim=1)
        else:
            k_all = torch.cat([self.kw[:, :past_len].to(k.dtype), k], dim=1)  # [B, P+T, Hkv, D]
            v_all = torch.cat([self.vw[:, :past_len].to(v.dtype), v], dim=1)
        if W:  # after reading: the chunk's last W tokens enter the ring
            a = max(past_len, end - W)
            idx = torch.arange(a, end, device=self.ring_k.device) % W
            self.ring_k[:, idx] = k[:, a - past_len:].to(torch.float16)
            self.ring_v[:, idx] = v[:, a - past_len:].to(torch.float16)
        return k_all, v_all


def scheme_variant(name: str, **changes) -> XScheme:
    """A mode's scheme with some fields changed (bench/bench_cache.py's ablations, tests)."""
    return replace(X_MODES[name], **changes)
