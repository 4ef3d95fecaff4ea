"""The one model definition: Llama layout (Qwen2, Qwen3, Llama, Mistral, Gemma2, Gemma3; Mixtral's
mixture of experts), no quantization code.

Linear layers are opaque modules (see linear.py); the loader decides what they are. Shapes:
B batch, T new tokens in this call, P past tokens in the cache, S = P + T keys, C hidden size,
H query heads, Hkv key/value heads, D head_dim, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from exl2.core.threads import fixed_threads

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.offset = offset  # Gemma: the scale is (offset + weight), applied in fp32 (Arch.norm_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # statistics in fp32 whatever the compute dtype
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] fp32, scaling applied. Computed in fp32 the way the reference
    implementations (Meta's Llama, transformers) do, so angles agree bit for bit where possible."""
    D = cfg.rotary_dim or cfg.head_dim  # GLM-4: the rotated part of each head
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))  # [D/2]
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # llama3: keep high frequencies, divide low ones by factor, interpolate the band in between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv  # [D/2]
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """NeoX / rotate-half RoPE, or GPT-J / interleaved (Arch.rope_interleaved); angles, cos and sin in fp32, of
    width rotary_dim (GLM-4) or head_dim."""

    def __init__(self, cfg: ModelConfig, *, local: bool = False):
        """local: the RoPE of Gemma3's windowed layers (cfg.local_rope_theta, unscaled)."""
        super().__init__()
        if local:
            cfg = dataclasses.replace(cfg, rope_theta=cfg.local_rope_theta, rope_scaling=None)
        inv = rope_inv_freq(cfg)  # [D/2] fp32
        self.register_buffer("inv_freq", inv, persistent=False)
        self.interleaved = cfg.arch.rope_interleaved

    def cos_sin(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + length, device=self.inv_freq.device, dtype=torch.float32)  # [T]
        freqs = pos[:, None] * self.inv_freq[None, :]  # [T, D/2]
        if self.interleaved:     # angle j for values 2j and 2j + 1
            emb = freqs.repeat_interleave(2, dim=-1)  # [T, D]
        else:
            emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """x [B, T, h, D] (any float dtype); cos/sin [T, D] fp32. Rotation computed in fp32.  cos/sin narrower than
    D (GLM-4's partial RoPE, [T, R]): the first R values are rotated, the rest pass unchanged.  interleaved: the
    pairs are (2j, 2j + 1) (GLM-4), not (j, j + D/2)."""
    R = cos.shape[-1]
    if R < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :R], cos, sin, interleaved), x[..., R:]), dim=-1)
    xf = x.float()
    if interleaved:
        rot = torch.stack((-xf[..., 1::2], xf[..., 0::2]), dim=-1).flatten(-2)  # [B, T, h, D]
        return (xf * cos[:, None, :] + rot * sin[:, None, :]).to(x.dtype)
    half = xf.shape[-1] // 2
    rot = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)  # rotate_half, [B, T, h, D]
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, D] broadcast over heads
    return (xf * c + rot * s).to(x.dtype)


def lower_right_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Boolean [q_len, k_len], True = may attend. Query i (absolute position k_len - q_len + i) sees keys
    0 .. k_len - q_len + i: the causal mask aligned to the bottom-right corner."""
    if q_len > k_len:
        raise ValueError(f"lower_right_mask: q_len {q_len} > k_len {k_len}")
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              softcap: float | None = None, window: int | None = None,
              q_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA attention of T new queries against S = P + T keys, fp32 softmax.

    q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, H, T, D] in q's dtype.  scale: default 1/sqrt(D).  softcap: the
    scaled logits become softcap * tanh(logits / softcap).  window: a query sees only the last `window` keys
    up to its own position (its own included).  q_pos: the queries' own positions among the S keys (int64
    [T], any T <= S), for queries that are not the last T positions; default S - T .. S - 1.  mask: bool [T, S],
    True where a query may attend, in place of the causal mask, window and q_pos (runtime/onepass.py).
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} not 4-D/matching")
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or H % Hkv or S < T or (q_pos is not None and q_pos.shape != (T,)):
        raise ValueError(f"attention: q {tuple(q.shape)} incompatible with k {tuple(k.shape)}")
    out_dtype = q.dtype
    # fp32 softmax: upcast fp16/bf16 inputs (Q.K^T of large q/k overflows fp16; docs/runtime.md section 2).
    q, k, v = q.float(), k.float(), v.float()
    if Hkv != H:  # GQA: each kv head serves H/Hkv query heads
        rep = H // Hkv
        k = k[:, :, None].expand(B, Hkv, rep, S, D).reshape(B, H, S, D)  # [B, H, S, D]
        v = v[:, :, None].expand(B, Hkv, rep, S, D).reshape(B, H, S, D)  # [B, H, S, D]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if mask is not None:
        if mask.shape != (T, S):
            raise ValueError(f"attention: mask {tuple(mask.shape)} is not [{T}, {S}]")
        if softcap is not None:
            return _capped_windowed(q, k, v, scale, softcap, None, mask=mask).to(out_dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).to(out_dtype)
    if softcap is not None or (window is not None and window < S):
        return _capped_windowed(q, k, v, scale, softcap, window, q_pos).to(out_dtype)
    if q_pos is not None:  # chosen queries: key j is seen from position p when j <= p
        mask = _query_mask(q_pos, S, None, q.device)  # [T, S]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    elif T == S:  # no past: lower-right == top-left, let SDPA use its fused causal path
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif T == 1:  # one new token sees every key
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        mask = lower_right_mask(T, S, device=q.device)  # [T, S]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.to(out_dtype)


def _query_mask(q_pos: torch.Tensor, S: int, window: int | None, device) -> torch.Tensor:
    """Boolean [T, S], True = may attend: key j is seen from position p = q_pos[i] when j <= p (and, with a
    window, p - j < window)."""
    gap = q_pos.to(device)[:, None] - torch.arange(S, device=device)[None, :]  # p - j, [T, S]
    return (gap >= 0) if window is None else (gap >= 0) & (gap < window)


def _capped_windowed(q, k, v, scale: float, softcap: float | None, window: int | None,
                     q_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """attention() written out, for what SDPA cannot do (soft-capping); fp32 q, k, v [B, H, T or S, D]."""
    T, S = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale  # [B, H, T, S]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is None:
        if q_pos is None:  # the last T positions
            q_pos = torch.arange(S - T, S, device=q.device)
        mask = _query_mask(q_pos, S, window, q.device)  # [T, S]
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v  # [B, H, T, D]


class Attention(nn.Module):
    # The model's KV profile (runtime/kv_profile.py), which exl2's own cache modes (q4x, q3x) read; attached by
    # runtime/kv_calib.py (ensure_profile), None otherwise.
    kv_profile = None

    def __init__(self, cfg: ModelConfig, q: nn.Module, k: nn.Module, v: nn.Module, o: nn.Module,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None, *, window: int | None = None,
                 rotary: "Rotary | None" = None):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o
        # A RoPE of this layer's own (Gemma3's windowed layers): its angles replace the cos/sin passed in
        self.rotary = rotary
        # this layer's sliding window (cfg.window(i)), the scale and the soft-capping of its logits
        self.window, self.scale, self.softcap = window, cfg.attn_scale, cfg.attn_softcap
        # Per-head norms (architectures whose row has qk_norm): weight [D], or [heads, D] one row per head
        self.q_norm, self.k_norm = q_norm, k_norm
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.rope_interleaved = cfg.arch.rope_interleaved

    def project(self, x: torch.Tensor, positions: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [B, T, H, D], keys and values [B, T, Hkv, D] of x [B, T, C], before RoPE (after the
        per-head norms where the architecture has them).  With ``positions`` (int64 [P]) only those tokens'
        queries are made: q [B, P, H, D]."""
        B, T, _ = x.shape
        xq = x if positions is None else x[:, positions]
        q = self.q_proj(xq).view(B, xq.shape[1], self.n_heads, self.head_dim)  # [B, T or P, H, D]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)  # [B, T, Hkv, D]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)  # [B, T, Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # RMS over each head's D values
        return q, k, v

    def forward(self, x, cos, sin, layer_cache=None, past_len: int = 0):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        k_pre = k
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(past_len, T)  # [T, D] each
        q, k = apply_rope(q, cos, sin, self.rope_interleaved), apply_rope(k, cos, sin, self.rope_interleaved)
        mask = None
        if getattr(layer_cache, "one_pass", False):  # a token-by-token pass emulated in one (runtime/onepass.py)
            k, v, mask = layer_cache.keys_values(k_pre, k, v, cos, sin, self.kv_profile, self.window)
        elif layer_cache is not None:
            if getattr(layer_cache, "takes_pre_rope", False):  # exl2's own modes (kv_x.py) take pre-RoPE keys
                k, v = layer_cache.update_pre_rope(k_pre, k, v, past_len, cos, sin, self.kv_profile)
            else:
                k, v = layer_cache.update(k, v, past_len)  # [B, S, Hkv, D] each
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale,
                        softcap=self.softcap, window=self.window, mask=mask)  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H*D]
        return self.o_proj(out)

    def at(self, x: torch.Tensor, cos, sin, positions: torch.Tensor) -> torch.Tensor:
        """The output at ``positions`` only (int64 [P], ascending) of a forward over x [B, T, C] with no
        cache: keys and values of every token, queries and the output projection of the chosen ones
        -> [B, P, C].  Each row equals the same position of :meth:`forward`'s output up to the rounding of
        the smaller products."""
        B, T, _ = x.shape
        q, k, v = self.project(x, positions)  # q [B, P, H, D]
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(0, T)  # [T, D] each
        q = apply_rope(q, cos[positions], sin[positions], self.rope_interleaved)
        k = apply_rope(k, cos, sin, self.rope_interleaved)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale,
                        softcap=self.softcap, window=self.window, q_pos=positions)  # [B, H, P, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, positions.numel(), self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, act: str = "silu"):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.act = act  # "silu" or "gelu_tanh" (Arch.mlp_act)

    def forward(self, x):
        g = self.gate_proj(x)
        g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")
        return self.down_proj(g * self.up_proj(x))


class SparseMLP(nn.Module):
    """A mixture of experts (Arch.moe): the router's logits [N, E] over the experts, softmax in fp32, the top
    ``top_k`` experts of each token with their weights renormalised to sum to 1 (``renorm``), then each expert
    (an :class:`MLP`) run on the tokens routed to it and its output added, times its weight, to theirs."""

    def __init__(self, router: nn.Module, experts: list[MLP], top_k: int, renorm: bool = True):
        super().__init__()
        self.router, self.experts = router, nn.ModuleList(experts)
        self.top_k, self.renorm = top_k, renorm

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, C] -> (weights [N, top_k] in x's dtype, expert indices [N, top_k])."""
        probs = F.softmax(self.router(x).float(), dim=-1)  # [N, E] fp32
        w, idx = torch.topk(probs, self.top_k, dim=-1)  # [N, k] each
        if self.renorm:
            w = w / w.sum(dim=-1, keepdim=True)
        return w.to(x.dtype), idx

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, C]
        w, idx = self.route(x)
        out = torch.zeros_like(x)
        # an expert's products have as many rows as it gets tokens: few rows give thread-dependent bits on some
        # BLAS builds, so they run at the base thread count (core/threads.py)
        with fixed_threads():
            for e, expert in enumerate(self.experts):
                tok, slot = torch.where(idx == e)  # the tokens routed to e, and which of their k choices it is
                if tok.numel():
                    out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out.reshape(shape)


class Block(nn.Module):
    """One decoder layer: two residual modules (ExLlamaV2's attention and MLP modules).  ``mlp_norm`` is the
    MLP's input norm (HF ``post_attention_layernorm``, or Gemma's ``pre_feedforward_layernorm``); Gemma's
    ``attn_out_norm`` / ``mlp_out_norm`` norm each module's output before the residual add; Granite's
    ``residual_scale`` (its residual_multiplier) multiplies each module's output before the add."""

    def __init__(self, attn_norm: RMSNorm, attn: Attention, mlp_norm: RMSNorm, mlp: MLP | SparseMLP,
                 attn_out_norm: RMSNorm | None = None, mlp_out_norm: RMSNorm | None = None,
                 residual_scale: float = 1.0):
        super().__init__()
        self.residual_scale = residual_scale
        self.input_layernorm, self.self_attn = attn_norm, attn
        self.post_attention_layernorm, self.mlp = mlp_norm, mlp
        self.attn_out_norm, self.mlp_out_norm = attn_out_norm, mlp_out_norm

    def attn_residual(self, x, cos, sin, layer_cache=None, past_len: int = 0):
        return self._add(x, self.self_attn(self.input_layernorm(x), cos, sin, layer_cache, past_len),
                         self.attn_out_norm)

    def attn_residual_at(self, x, cos, sin, positions: torch.Tensor):
        """:meth:`attn_residual` of a cacheless forward over x [B, T, C], at ``positions`` only -> [B, P, C]
        (see :meth:`Attention.at`)."""
        return self._add(x[:, positions], self.self_attn.at(self.input_layernorm(x), cos, sin, positions),
                         self.attn_out_norm)

    def attn_finish(self, x, a):
        """:meth:`attn_residual` from the attention's output before ``o_proj`` (``a`` [B, T, H*D], what o_proj
        reads when the module runs on x): the same operations from there, so the same result."""
        return self._add(x, self.self_attn.o_proj(a), self.attn_out_norm)

    def mlp_residual(self, x):
        return self._add(x, self.mlp(self.post_attention_layernorm(x)), self.mlp_out_norm)

    def mlp_finish(self, x, m):
        """:meth:`mlp_residual` from down_proj's input ``m`` [B, T, I] (a dense MLP's gated activation)."""
        return self._add(x, self.mlp.down_proj(m), self.mlp_out_norm)

    def _add(self, x, y, out_norm):
        """The residual add of a module's output y: normed first where the architecture norms it, then scaled."""
        y = y if out_norm is None else out_norm(y)
        return x + (y if self.residual_scale == 1.0 else y * self.residual_scale)

    def forward(self, x, cos, sin, layer_cache=None, past_len: int = 0):
        return self.mlp_residual(self.attn_residual(x, cos, sin, layer_cache, past_len))


class Model(nn.Module):
    """Embedding -> blocks -> final norm -> head. Built by loader.load_model."""

    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, blocks: list[Block], norm: RMSNorm,
                 head: nn.Module, dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Parameter(embed, requires_grad=False)  # [V, C], may be stored in 16 bits
        self.compute_dtype = embed.dtype if dtype is None else dtype
        self.layers = nn.ModuleList(blocks)
        self.norm = norm
        self.lm_head = head
        self.rotary = Rotary(cfg).to(embed.device)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the embedding table may be stored in 16 bits)."""
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def forward(self, input_ids: torch.Tensor, cache=None, *, last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] integer -> logits float32 [B, T, V] ([B, 1, V] with last_only).

        With a cache, the T tokens follow the cache's past_len tokens and are appended to it.
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be a 2-D integer tensor [B, T], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids: no tokens")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"input_ids: token id out of range [0, {self.cfg.vocab_size}): {lo if lo < 0 else hi}")
        past = 0
        if cache is not None:
            past = cache.past_len
            cache.check_append(B, T)
        input_ids = input_ids.to(self.device)
        x = self.embed(input_ids)  # [B, T, C]
        cos, sin = self.rotary.cos_sin(past, T)  # [T, D] each
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, None if cache is None else cache.layers[i], past)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]  # [B, 1, C]
        return self.logits(x)  # [B, T or 1, V]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] (on the model's device) -> the first residual states [B, T, C]."""
        return embed_tokens(self.cfg, input_ids, self.embed_tokens, self.compute_dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last residual states [B, T, C] -> logits float32 [B, T, V] (final norm, head, soft-capping)."""
        return final_softcap(self.cfg, self.lm_head(self.norm(x)).float())


def embed_tokens(cfg: ModelConfig, ids: torch.Tensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of the embedding table [V, C] for ids, in dtype; times sqrt(hidden_size) where the architecture
    scales them (Gemma), times embedding_multiplier where config.json sets one (Granite)."""
    x = F.embedding(ids, table).to(dtype)
    if cfg.embedding_multiplier != 1.0:
        x = x * cfg.embedding_multiplier
    return x * math.sqrt(cfg.hidden_size) if cfg.arch.embed_scale else x


def final_softcap(cfg: ModelConfig, logits: torch.Tensor) -> torch.Tensor:
    """Logits soft-capped as the architecture does (cap * tanh(logits / cap)), or divided by logits_scaling
    (Granite); unchanged otherwise."""
    if cfg.logits_scaling != 1.0:
        logits = logits / cfg.logits_scaling
    cap = cfg.final_softcap
    return logits if cap is None else torch.tanh(logits / cap) * cap
