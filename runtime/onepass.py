"""A token-by-token pass through a KV cache, computed in one forward pass over the row.

Decoding a row one token at a time, the query at position t reads the keys and values of positions before t
back from the cache's store (rounded to fp16, quantized, ...) and uses its own key and value as computed.
Every mode stores a token independently of the others (quantization works on one token's vector at a time), so
the stored version of every position can be made at once from a full-row pass: attention then sees the row's
keys and values in several versions side by side (the exact one, the stored one, for exl2's own modes the fp16
one of the last few positions) and a mask picks, for each query, the version a token-by-token pass would read
at each distance.  Layer l's inputs in both passes are the same functions of the tokens, so the logits agree up
to the rounding of the batched products (a rounding difference can move a quantization code by one level; the
tests compare the two).

Scoring a row of L tokens under a cache mode then costs one forward pass instead of L - 1 (runtime/evaluate.py,
``EvalConfig(..., one_pass=True)``).  :class:`OnePassCache` is used like a :class:`~exl2.runtime.cache.KVCache`
for a single call with nothing cached before it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .cache import EXL2_MODES, _check_mode, mode_error
from .config import ModelConfig
from .kv_x import X_MODES, LayerKVX, XScheme

# A store's round trip for one layer: (k_pre, k, v, cos, sin, profile) -> (keys, values) [B, T, Hkv, D] as a later
# query reads them back (k_pre: the keys before RoPE, k after; cos/sin [T, D] of the row's positions).
RoundTrip = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class OnePassLayer:
    """One layer's cache, emulated: queries read earlier positions through ``round_trip`` and, with ``recent``,
    the last ``recent`` positions before them rounded to fp16 instead (exl2's own modes' ring)."""

    one_pass = True  # the attention hook calls keys_values (runtime/model.py)

    def __init__(self, round_trip: RoundTrip, recent: int = 0):
        self.round_trip, self.recent = round_trip, recent

    def keys_values(self, k_pre, k, v, cos, sin, profile, window: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k_pre/k/v [B, T, Hkv, D] of the whole row -> (keys, values [B, n*T, Hkv, D]: the n versions one after
        the other, mask bool [T, n*T]: True where query t reads that version of that position)."""
        T = k.shape[1]
        ks, vs = self.round_trip(k_pre, k, v, cos, sin, profile)
        pos = torch.arange(T, device=k.device)
        gap = pos[:, None] - pos[None, :]                                # query - key position, [T, T]
        # (version, the distances it is read at): its own position exactly, the ring, then the store
        versions = [(k, v, gap == 0)]
        if self.recent:
            versions.append((k.half().to(k.dtype), v.half().to(v.dtype), (gap > 0) & (gap <= self.recent)))
        versions.append((ks.to(k.dtype), vs.to(v.dtype), gap > self.recent))
        if window is not None:                                           # a query sees the last `window` keys
            versions = [(a, b, m & (gap < window)) for a, b, m in versions]
        return (torch.cat([a for a, _, _ in versions], 1), torch.cat([b for _, b, _ in versions], 1),
                torch.cat([m for _, _, m in versions], 1))


def _fp16_trip(k_pre, k, v, cos, sin, profile):
    return k.half(), v.half()


def _q_trip(bits: tuple[int, int]) -> RoundTrip:
    """ExLlamaV2's quantized modes: each token's post-RoPE vector [Hkv * D] in fp16 through kv_quantize and back
    (the same kernels as :class:`~exl2.runtime.cache.LayerKV`)."""
    from exl2.quant_kernels import ops

    def trip(k_pre, k, v, cos, sin, profile):
        out = []
        for x, b in zip((k, v), bits):
            B, T, H, D = x.shape
            q, s = ops.kv_quantize(x.reshape(B, T, H * D).to(torch.float16), b)
            out.append(ops.kv_dequantize(q, s, b, H * D).view(B, T, H, D))
        return tuple(out)

    return trip


def x_trip(cfg: ModelConfig, scheme: XScheme, index: int, T: int, dtype, device, *, profile=None, plan=None,
           streams: str = "kv") -> RoundTrip:
    """exl2's own modes (or a variant of one, kv_x.scheme_variant): layer ``index``'s transforms and quantizer
    (:class:`LayerKVX`), the first ``sink`` tokens in fp16.  The layer's plan comes from ``plan``, else from
    ``profile``, else from the profile the model's attention hands over.  ``streams``: which of keys ("k") and
    values ("v") go through the store; the other is read exactly."""
    layer = LayerKVX(1, T, cfg.num_kv_heads, cfg.head_dim, scheme, index, cfg, dtype, device)
    layer.plan = plan
    n_sink = min(scheme.sink, T)

    def trip(k_pre, k, v, cos, sin, attached):
        if plan is None:
            layer._bind(attached if profile is None else profile)
        if "k" in streams:
            ks = layer.encode_decode_k(k_pre, cos, sin, 0, False).to(k.dtype)
            k = torch.cat([k[:, :n_sink].half().to(k.dtype), ks[:, n_sink:]], 1)
        if "v" in streams:
            vs = layer.encode_decode_v(v, 0, False).to(v.dtype)
            v = torch.cat([v[:, :n_sink].half().to(v.dtype), vs[:, n_sink:]], 1)
        return k, v

    return trip


class OnePassCache:
    """A cache of ``mode`` for one forward pass over rows of at most ``max_seq_len`` tokens with nothing cached
    before them: the logits are those of feeding the rows through a :class:`~exl2.runtime.cache.KVCache` of that
    mode one token at a time ("fp16" stored in fp16, as ``exl2-eval`` scores it), up to rounding."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int, *, mode: str | None = "fp16", dtype=torch.float32,
                 device="cpu", layers: list | None = None):
        """``layers`` (with ``mode`` None): one :class:`OnePassLayer` per decoder layer, or None where a layer
        reads its keys and values exactly, in place of a mode's."""
        self.cfg, self.mode, self.max_seq_len, self.past_len = cfg, mode, max_seq_len, 0
        if (mode is None) == (layers is None) or (layers is not None and len(layers) != cfg.num_layers):
            raise ValueError(f"OnePassCache: give a mode or {cfg.num_layers} layers (one of the two)")
        if layers is not None:
            self.layers = list(layers)
            return
        _check_mode(mode)
        why = mode_error(cfg, mode)
        if why:
            raise ValueError(f"cache mode {mode!r}: {why}")
        if mode in X_MODES:
            scheme = X_MODES[mode]
            self.layers = [OnePassLayer(x_trip(cfg, scheme, i, max_seq_len, dtype, device), scheme.recent)
                           for i in range(cfg.num_layers)]
        else:
            trip = _fp16_trip if EXL2_MODES[mode] is None else _q_trip(EXL2_MODES[mode])
            self.layers = [OnePassLayer(trip) for _ in range(cfg.num_layers)]

    def check_append(self, batch: int, n: int) -> None:
        if self.past_len:
            raise ValueError("OnePassCache: one pass per row (reset() before the next)")
        if n > self.max_seq_len:
            raise ValueError(f"OnePassCache: {n} tokens exceed max_seq_len {self.max_seq_len}")

    def advance(self, n: int) -> None:
        self.past_len += n

    def reset(self) -> None:
        self.past_len = 0
