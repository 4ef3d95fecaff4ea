"""KV cache: FP (compute dtype or fp16), ExLlamaV2's quantized Q8 / Q6 / Q4 (docs/cache.md section 3), and exl2's own
Q4X / Q3X (runtime/kv_x.py: transformed per head with the model's KV profile, not an ExLlamaV2 format).

Per layer, K and V are stored token-major: one row per token holding the flattened kv vector
[Hkv * D]. Quantized modes store each row through exl2.quant_kernels.kv_quant:
    kv_quantize(x [..., Dkv], bits)           -> (q uint8 [..., Dkv*bits/8], scales fp16 [..., Dkv/32])
    kv_dequantize(q, scales, bits, Dkv)       -> fp16 [..., Dkv]
Semantics (ExLlamaV2's non-paged path): past tokens are dequantized from the store; the current chunk's
own K/V are used unquantized for its attention, then quantized once and appended. Quantization is per
token row, so no token is ever quantized twice.
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .kv_x import X_MODES, LayerKVX, x_bytes_per_token, x_mode_error

# ExLlamaV2's modes: mode -> (key bits, value bits); None = unquantized.
EXL2_MODES: dict[str, tuple[int, int] | None] = {"fp16": None, "q8": (8, 8), "q6": (8, 4), "q4": (4, 4)}
# Every mode, ExLlamaV2's first; exl2's own map to their scheme (runtime/kv_x.py).
MODES: dict = {**EXL2_MODES, **X_MODES}
SCALE_GROUP = 32  # elements per fp16 scale (docs/cache.md section 3)


def _check_mode(mode: str):
    if mode not in MODES:
        raise ValueError(f"cache mode {mode!r} not supported; supported: {', '.join(MODES)}")
    return MODES[mode]


def mode_error(cfg: ModelConfig, mode: str) -> str | None:
    """Why ``mode`` cannot hold this model's keys and values, or None when it can."""
    if _check_mode(mode) is None:
        return None
    if mode in X_MODES:
        return x_mode_error(cfg, X_MODES[mode])
    from exl2.quant_kernels.kv_quant import CHUNK

    if cfg.kv_dim % CHUNK:
        return (f"kv_heads x head_dim = {cfg.num_kv_heads} x {cfg.head_dim} = {cfg.kv_dim} is not a multiple of "
                f"{CHUNK} (the quantized modes rotate {CHUNK} values at a time); use fp16")
    return None


def bytes_per_token(cfg: ModelConfig, mode: str, fp_dtype: torch.dtype = torch.float16) -> int:
    """Cache bytes one token occupies over all layers (K and V), excluding working copies.

    fp_dtype is the element type of the "fp16" mode (the compute dtype on the fp32 CPU reference)."""
    bits = _check_mode(mode)
    if mode in X_MODES:
        return x_bytes_per_token(cfg, X_MODES[mode])
    d = cfg.kv_dim
    if bits is None:
        per_layer = 2 * d * torch.empty((), dtype=fp_dtype).element_size()
    else:
        per_layer = sum(d * b // 8 + (d // SCALE_GROUP) * 2 for b in bits)
    return per_layer * cfg.num_layers


class LayerKV:
    """One layer's K/V store of shape [B, max_len, Hkv, D] (FP) or quantized rows (Q modes)."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, mode: str,
                 dtype: torch.dtype, device):
        self.bits = _check_mode(mode)
        if mode not in EXL2_MODES:
            raise ValueError(f"LayerKV holds ExLlamaV2's modes ({', '.join(EXL2_MODES)}), not {mode!r}")
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        d = kv_heads * head_dim
        if self.bits is None:
            self.k = torch.zeros(batch, max_len, kv_heads, head_dim, dtype=dtype, device=device)
            self.v = torch.zeros_like(self.k)
        else:
            # imported only when a quantized cache is made
            from exl2.quant_kernels import kv_quant, ops

            self._kvq = ops  # the front door: native kernels when built, else the kv_quant reference
            if d % kv_quant.CHUNK:  # Hadamard rotation spans of 64 elements (docs/cache.md section 3)
                raise ValueError(f"quantized cache mode {mode!r}: kv_heads*head_dim = {d} is not a multiple "
                                 f"of {kv_quant.CHUNK}")
            kb, vb = self.bits
            self.kq = torch.zeros(batch, max_len, d * kb // 8, dtype=torch.uint8, device=device)
            self.vq = torch.zeros(batch, max_len, d * vb // 8, dtype=torch.uint8, device=device)
            self.ks = torch.zeros(batch, max_len, d // SCALE_GROUP, dtype=torch.float16, device=device)
            self.vs = torch.zeros_like(self.ks)
            # Working copy of the dequantized past (as ExLlamaV2 keeps one): each stored token is
            # dequantized once, so a token-by-token pass costs linear, not quadratic, time.
            self.kw = torch.zeros(batch, max_len, kv_heads, head_dim, dtype=dtype, device=device)
            self.vw = torch.zeros_like(self.kw)
            self.valid = 0  # tokens [0, valid) of the working copy match the quantized store

    def _store_q(self, qbuf, sbuf, x, bits, past_len):
        B, T = x.shape[:2]
        rows = x.reshape(B, T, -1).to(torch.float16)  # [B, T, Hkv*D]
        q, s = self._kvq.kv_quantize(rows, bits)
        if q.shape != (B, T, qbuf.shape[2]) or s.shape != (B, T, sbuf.shape[2]):
            raise ValueError(f"kv_quantize returned q {tuple(q.shape)}, scales {tuple(s.shape)}; expected "
                             f"{(B, T, qbuf.shape[2])}, {(B, T, sbuf.shape[2])}")
        qbuf[:, past_len:past_len + T] = q
        sbuf[:, past_len:past_len + T] = s

    def _load_q(self, qbuf, sbuf, bits, past_len):
        B = qbuf.shape[0]
        d = self.kv_heads * self.head_dim
        x = self._kvq.kv_dequantize(qbuf[:, :past_len], sbuf[:, :past_len], bits, d)  # [B, P, Hkv*D] fp16
        return x.to(self.dtype).view(B, past_len, self.kv_heads, self.head_dim)  # [B, P, Hkv, D]

    def update(self, k: torch.Tensor, v: torch.Tensor, past_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v [B, T, Hkv, D] for positions past_len .. past_len+T-1 -> all keys/values [B, P+T, Hkv, D]."""
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or t.shape[2:] != (self.kv_heads, self.head_dim):
                raise ValueError(f"LayerKV.update: {name} must be [B, T, {self.kv_heads}, {self.head_dim}], "
                                 f"got {tuple(t.shape)}")
        if self.bits is None:
            T = k.shape[1]
            self.k[:, past_len:past_len + T] = k
            self.v[:, past_len:past_len + T] = v
            end = past_len + T
            if self.k.dtype == k.dtype:
                return self.k[:, :end], self.v[:, :end]
            # storage narrower than compute: past from the store, the chunk itself unrounded
            k_all = torch.cat([self.k[:, :past_len].to(k.dtype), k], dim=1)  # [B, P+T, Hkv, D]
            v_all = torch.cat([self.v[:, :past_len].to(v.dtype), v], dim=1)  # [B, P+T, Hkv, D]
            return k_all, v_all
        kb, vb = self.bits
        self.valid = min(self.valid, past_len)  # a reset cache rewrites from past_len on
        if self.valid < past_len:
            a = self.valid
            self.kw[:, a:past_len] = self._load_q(self.kq[:, a:], self.ks[:, a:], kb, past_len - a)
            self.vw[:, a:past_len] = self._load_q(self.vq[:, a:], self.vs[:, a:], vb, past_len - a)
            self.valid = past_len
        self._store_q(self.kq, self.ks, k, kb, past_len)
        self._store_q(self.vq, self.vs, v, vb, past_len)
        k_all = torch.cat([self.kw[:, :past_len].to(k.dtype), k], dim=1)  # [B, P+T, Hkv, D]
        v_all = torch.cat([self.vw[:, :past_len].to(v.dtype), v], dim=1)  # [B, P+T, Hkv, D]
        return k_all, v_all


class KVCache:
    """All layers' K/V plus the number of tokens already stored (past_len)."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int, *, batch_size: int = 1, mode: str = "fp16",
                 dtype: torch.dtype = torch.float32, device="cpu", storage_dtype: torch.dtype | None = None,
                 scheme=None):
        """dtype: the model's compute dtype. For mode "fp16", K/V are stored in storage_dtype, by default
        the compute dtype (lossless: on the fp32 CPU reference a cached pass equals a full pass);
        pass torch.float16 to mirror ExLlamaV2's FP16 cache exactly.  ``scheme``: with an x mode, a variant of
        its :class:`~exl2.runtime.kv_x.XScheme` (ablations, tests); ``bytes_per_token`` then counts it."""
        _check_mode(mode)
        if scheme is not None and mode not in X_MODES:
            raise ValueError(f"KVCache: scheme= is for exl2's own modes ({', '.join(X_MODES)}), not {mode!r}")
        self.scheme = scheme if scheme is not None else X_MODES.get(mode)
        if mode in X_MODES:
            why = x_mode_error(cfg, self.scheme)
            if why:
                raise ValueError(f"cache mode {mode!r}: {why}")
        if max_seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"KVCache: max_seq_len {max_seq_len} and batch_size {batch_size} must be positive")
        self.cfg, self.mode, self.max_seq_len, self.batch_size = cfg, mode, max_seq_len, batch_size
        store = storage_dtype or dtype
        self.storage_dtype = store
        if mode in X_MODES:
            self.layers = [LayerKVX(batch_size, max_seq_len, cfg.num_kv_heads, cfg.head_dim, self.scheme, i, cfg,
                                    dtype, device) for i in range(cfg.num_layers)]
        else:
            self.layers = [LayerKV(batch_size, max_seq_len, cfg.num_kv_heads, cfg.head_dim, mode,
                                   store if MODES[mode] is None else dtype, device)
                           for _ in range(cfg.num_layers)]
        self.past_len = 0

    def check_append(self, batch: int, n: int) -> None:
        if batch != self.batch_size:
            raise ValueError(f"KVCache: batch {batch} != cache batch_size {self.batch_size}")
        if self.past_len + n > self.max_seq_len:
            raise ValueError(f"KVCache: {self.past_len} + {n} tokens exceed max_seq_len {self.max_seq_len}")

    def advance(self, n: int) -> None:
        self.past_len += n

    def reset(self) -> None:
        """Forget all tokens (storage is overwritten on the next pass)."""
        self.past_len = 0

    def bytes_per_token(self) -> int:
        if self.mode in X_MODES:
            return x_bytes_per_token(self.cfg, self.scheme)
        return bytes_per_token(self.cfg, self.mode, self.storage_dtype)


class _MixedLayer:
    """One layer of a :class:`MixedKVCache`: batch row b goes through the b-th cache's own layer."""

    takes_pre_rope = True  # the attention hook passes pre-RoPE keys, which exl2's own modes need

    def __init__(self, layers: list):
        self.parts = layers

    def update_pre_rope(self, k_pre, k, v, past_len, cos, sin, profile):
        ks, vs = [], []
        for b, part in enumerate(self.parts):
            one = slice(b, b + 1)
            if getattr(part, "takes_pre_rope", False):
                kb, vb = part.update_pre_rope(k_pre[one], k[one], v[one], past_len, cos, sin, profile)
            else:
                kb, vb = part.update(k[one], v[one], past_len)
            ks.append(kb)
            vs.append(vb)
        return torch.cat(ks), torch.cat(vs)  # [B, P+T, Hkv, D] each


class MixedKVCache:
    """Several one-row caches, possibly of different modes, run as one batch: batch row b of every call is
    stored and read back by ``caches[b]`` exactly as that cache alone would (the rows must share their
    positions, which a batch does).  Scoring one token row under several cache modes then costs one
    batched pass instead of one pass per mode (runtime/evaluate.py)."""

    def __init__(self, caches: list[KVCache]):
        if not caches or any(c.batch_size != 1 for c in caches):
            raise ValueError("MixedKVCache: give one or more caches of batch size 1")
        if len({c.max_seq_len for c in caches}) != 1:
            raise ValueError("MixedKVCache: the caches must have the same max_seq_len")
        self.caches = caches
        self.batch_size, self.max_seq_len = len(caches), caches[0].max_seq_len
        self.layers = [_MixedLayer([c.layers[i] for c in caches]) for i in range(len(caches[0].layers))]
        self.past_len = 0

    def check_append(self, batch: int, n: int) -> None:
        if batch != self.batch_size:
            raise ValueError(f"MixedKVCache: batch {batch} != the {self.batch_size} caches it holds")
        if self.past_len + n > self.max_seq_len:
            raise ValueError(f"MixedKVCache: {self.past_len} + {n} tokens exceed max_seq_len {self.max_seq_len}")

    def advance(self, n: int) -> None:
        self.past_len += n
        for c in self.caches:
            c.advance(n)

    def reset(self) -> None:
        self.past_len = 0
        for c in self.caches:
            c.reset()
