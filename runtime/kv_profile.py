"""The KV profile of exl2's own cache modes (runtime/kv_x.py): per layer and kv head, statistics of the keys
(before RoPE), values and queries, and per-stream sensitivities; the transforms and widths a scheme derives from
them; its file, ``exl2_kv.json`` (written by the converter, read by the runtime; ExLlamaV2 ignores it).
Measuring it: runtime/kv_calib.py."""
from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exl2.core.threads import fixed_threads

from exl2.quant_kernels.finite import all_finite
from exl2.quant_kernels.kvx_quant import hadamard

from .config import ModelConfig
from .kv_x import XScheme, allocate_bits, stream_bits_total

PROFILE_FILE = "exl2_kv.json"
PROFILE_FORMAT = "exl2.kv_profile/1"
SENSITIVITY_BITS = 4  # the width at which each stream's cost is measured

@dataclass
class LayerStats:
    """Statistics of one layer's pre-RoPE keys, values and queries (float64), per kv head."""

    k_mean: torch.Tensor  # [Hkv, D]
    k_cov: torch.Tensor  # [Hkv, D, D], centered
    q_energy: torch.Tensor  # [Hkv, D]: mean q_j^2 summed over the query heads that read this kv head
    v_mean: torch.Tensor  # [Hkv, D]


@dataclass
class LayerPlan:
    """What a cache layer of one scheme needs: transforms (compute dtype), means, widths."""

    a_k: torch.Tensor  # [Hkv, D, D]: z = (k_pre - mu_k) @ a_k per head
    a_k_inv: torch.Tensor
    mu_k: torch.Tensor  # [Hkv, D]
    a_v: torch.Tensor
    a_v_inv: torch.Tensor
    mu_v: torch.Tensor
    k_bits: int
    v_bits: int


@dataclass
class KVProfile:
    """A model's KV statistics (per layer) and per-stream sensitivities; see the module docstring."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    layers: list[LayerStats]
    sensitivity: list[tuple[float, float]] | None = None  # per layer: (K, V) KL nats/token at 4 bits
    source: dict = field(default_factory=dict)  # provenance: how and from what it was measured
    _plans: dict = field(default_factory=dict, repr=False, compare=False)

    # -- checks ---------------------------------------------------------------------------------------------

    def check(self, cfg: ModelConfig, where: str = "KV profile") -> None:
        want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        got = (self.num_layers, self.num_kv_heads, self.head_dim)
        if got != want:
            raise ValueError(f"{where}: made for layers/kv heads/head_dim {got}, the model has {want}")
        Hkv, D = self.num_kv_heads, self.head_dim
        if len(self.layers) != self.num_layers:
            raise ValueError(f"{where}: {len(self.layers)} layers of statistics, expected {self.num_layers}")
        for i, st in enumerate(self.layers):
            for name, t, shape in (("k_mean", st.k_mean, (Hkv, D)), ("k_cov", st.k_cov, (Hkv, D, D)),
                                   ("q_energy", st.q_energy, (Hkv, D)), ("v_mean", st.v_mean, (Hkv, D))):
                if tuple(t.shape) != shape:
                    raise ValueError(f"{where}: layer {i} {name} has shape {tuple(t.shape)}, expected {shape}")
                if not all_finite(t):
                    raise ValueError(f"{where}: layer {i} {name} holds inf or NaN")
        if self.sensitivity is not None:
            s = self.sensitivity
            if len(s) != self.num_layers or any(len(p) != 2 or not all(math.isfinite(x) and x >= 0 for x in p)
                                                for p in s):
                raise ValueError(f"{where}: sensitivity must be {self.num_layers} pairs of finite non-negative "
                                 f"numbers")

    # -- what a scheme needs --------------------------------------------------------------------------------

    def allocation(self, cfg: ModelConfig, scheme: XScheme) -> list[tuple[int, int]]:
        """(key bits, value bits) per layer for ``scheme``."""
        total = stream_bits_total(cfg, scheme)
        if scheme.allocate and self.sensitivity is not None:
            sens = self.sensitivity
        else:  # no measurement: the same width everywhere, the spare bits to keys first (keys cost more)
            sens = [(2.0, 1.0)] * self.num_layers
        return allocate_bits(sens, total, scheme.min_bits)

    def plan(self, cfg: ModelConfig, scheme: XScheme, dtype: torch.dtype, device) -> list[LayerPlan]:
        key = (scheme, dtype, str(device))
        if key not in self._plans:
            bits = self.allocation(cfg, scheme)
            self._plans[key] = [self._layer_plan(i, scheme, kb, vb, dtype, device) for i, (kb, vb) in enumerate(bits)]
        return self._plans[key]

    def _layer_plan(self, i: int, scheme: XScheme, kb: int, vb: int, dtype, device) -> LayerPlan:
        st = self.layers[i]
        Hkv, D = self.num_kv_heads, self.head_dim
        eye = torch.eye(D, dtype=torch.float64).expand(Hkv, D, D)
        H = hadamard(D).expand(Hkv, D, D)
        if scheme.k_transform == "klt":
            if not scheme.pre_rope:
                raise ValueError("k_transform 'klt' is fitted to pre-RoPE keys: it needs pre_rope=True")
            a_k, a_k_inv = zip(*(klt_transform(st.k_cov[h], st.q_energy[h]) for h in range(Hkv)))
            a_k, a_k_inv = torch.stack(a_k), torch.stack(a_k_inv)
        elif scheme.k_transform == "hadamard":
            a_k, a_k_inv = H, H
        elif scheme.k_transform == "none":
            a_k, a_k_inv = eye, eye
        else:
            raise ValueError(f"k_transform {scheme.k_transform!r}: use klt, hadamard or none")
        if scheme.v_transform == "hadamard":
            a_v = a_v_inv = H
        elif scheme.v_transform == "none":
            a_v = a_v_inv = eye
        else:
            raise ValueError(f"v_transform {scheme.v_transform!r}: use hadamard or none")
        zero = torch.zeros(Hkv, D, dtype=torch.float64)
        mu_k = st.k_mean if scheme.center_k else zero
        mu_v = st.v_mean if scheme.center_v else zero
        cast = lambda t: t.to(dtype=dtype, device=device).contiguous()  # noqa: E731
        return LayerPlan(cast(a_k), cast(a_k_inv), cast(mu_k), cast(a_v), cast(a_v_inv), cast(mu_v), kb, vb)

    # -- file -----------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        def arr(t: torch.Tensor) -> dict:
            t = t.detach().to(torch.float32).contiguous().cpu()
            return {"shape": list(t.shape), "f32le": base64.b64encode(t.numpy().astype("<f4").tobytes()).decode()}

        return {"format": PROFILE_FORMAT, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "source": self.source,
                "sensitivity_bits": SENSITIVITY_BITS,
                "sensitivity": None if self.sensitivity is None else [list(p) for p in self.sensitivity],
                "layers": [{"k_mean": arr(s.k_mean), "k_cov": arr(s.k_cov), "q_energy": arr(s.q_energy),
                            "v_mean": arr(s.v_mean)} for s in self.layers]}

    @classmethod
    def from_json(cls, d: dict, where: str = "KV profile") -> "KVProfile":
        import numpy as np

        if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{where}: not a KV profile of format {PROFILE_FORMAT!r}")

        def arr(a, name) -> torch.Tensor:
            try:
                shape = [int(x) for x in a["shape"]]
                raw = base64.b64decode(a["f32le"], validate=True)
                t = torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy()).to(torch.float64)
                return t.reshape(shape)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"{where}: {name}: not a stored array ({e})") from None

        try:
            layers = [LayerStats(*(arr(l[k], f"layer {i} {k}") for k in ("k_mean", "k_cov", "q_energy", "v_mean")))
                      for i, l in enumerate(d["layers"])]
            sens = d.get("sensitivity")
            if sens is not None:
                if d.get("sensitivity_bits") != SENSITIVITY_BITS:
                    raise ValueError(f"sensitivity measured at {d.get('sensitivity_bits')} bits, this version "
                                     f"reads {SENSITIVITY_BITS}")
                sens = [(float(a), float(b)) for a, b in sens]
            return cls(int(d["num_layers"]), int(d["num_kv_heads"]), int(d["head_dim"]), layers, sens,
                       dict(d.get("source") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def save(self, model_dir: str | Path) -> Path:
        from exl2.core.files import write_text_atomic

        path = Path(model_dir) / PROFILE_FILE
        write_text_atomic(path, json.dumps(self.to_json()) + "\n")
        return path

    @classmethod
    def load(cls, model_dir: str | Path, cfg: ModelConfig | None = None) -> "KVProfile | None":
        """The profile stored in a model directory, or None when there is none."""
        path = Path(model_dir) / PROFILE_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: not readable JSON ({e})") from None
        prof = cls.from_json(d, str(path))
        if cfg is not None:
            prof.check(cfg, str(path))
        return prof


def klt_transform(cov: torch.Tensor, q_energy: torch.Tensor, *, floor: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, A^-1), float64, for one kv head: A = W^1/2 U diag(lambda^-1/4) H (module docstring).

    ``cov`` [D, D]: the centered pre-RoPE key covariance; ``q_energy`` [D]: the queries' mean energy per
    channel.  Eigenvalues below ``floor`` x their mean are raised to it (a direction the calibration never saw
    vary must not be scaled up without bound)."""
    D = cov.shape[-1]
    cov = cov.to(torch.float64)
    w = q_energy.to(torch.float64)
    w = ((w[: D // 2] + w[D // 2:]) / 2).repeat(2)  # both channels of a RoPE pair alike
    w = w.clamp_min(max(float(w.mean()) * 1e-6, 1e-30))
    sw = w.sqrt()
    C = sw[:, None] * ((cov + cov.T) / 2) * sw[None, :]
    with fixed_threads():      # LAPACK: its last bits depend on the thread count (core/threads.py)
        lam, U = torch.linalg.eigh(C)
    lam = lam.clamp_min(max(float(lam.clamp_min(0).mean()) * floor, 1e-30))
    s = lam ** -0.25
    H = hadamard(D)
    A = (sw[:, None] * U) * s[None, :] @ H
    A_inv = H.T @ ((U.T / s[:, None]) / sw[None, :])
    return A, A_inv


def weights_profile(model, source: str = "weights") -> KVProfile:
    """A profile from the weights alone: the key and value biases as means (zero without them), unit
    covariances and query energies, no sensitivities.  The fallback when no calibration rows can be made."""
    cfg = model.cfg
    Hkv, D = cfg.num_kv_heads, cfg.head_dim
    layers = []
    for block in model.layers:
        attn = block.self_attn
        kb = getattr(attn.k_proj, "bias", None)
        vb = getattr(attn.v_proj, "bias", None)
        mean = lambda b: (torch.zeros(Hkv, D, dtype=torch.float64) if b is None  # noqa: E731
                          else b.detach().double().cpu().reshape(Hkv, D))
        layers.append(LayerStats(mean(kb), torch.eye(D, dtype=torch.float64).repeat(Hkv, 1, 1),
                                 torch.ones(Hkv, D, dtype=torch.float64), mean(vb)))
    return KVProfile(cfg.num_layers, Hkv, D, layers, None, {"derived_from": source})
