"""The one dispatcher of the quantization kernels: one function per op, native when it can be, else torch.

Each function checks its arguments (dtype, device, shape, contiguity, alignment) and raises ``TypeError`` /
``ValueError`` naming the offending tensor -- never ``assert`` -- then runs one of two twins with the same
signature::

    CUDA tensor and an extension built with CUDA  ->  the CUDA kernel
    CPU tensor and the extension loaded            ->  the C++ (OpenMP) kernel
    otherwise                                      ->  ``reference.<op>``, the pure-torch twin

"Otherwise" is: the reference path is forced (below), ``EXL2_NO_EXT=1`` is set, or the extension did not
build.  Every native result equals the reference bit for bit, except :func:`matmul`, whose fp32 sums run in
another order (tolerance in tests/quant_kernels/test_native.py).  :func:`backend` says which path a call on
a given tensor or layer takes, at the moment it is asked.

Forcing the reference path.  ``EXL2_NO_EXT=1`` in the environment (never builds or loads the extension), or
in code ``with ops.reference_only(): ...`` (also usable as a decorator) or ``ops.force_reference(True)``,
which returns the previous setting.  The switch is process-wide, not per thread, and it decides every op
here, so code that calls only ``ops`` (``codec.pack_layer``, ``codec.dequantize_layer``, ``gptq.quantize``)
runs entirely on the reference inside it.

Layers.  :func:`matmul` and :func:`dequantize_layer` take a :class:`layout.PreparedLayer`, made once per
layer by ``codec.prepare_layer(tensors, prescale=..., name=...)``: that call validates the stored tensors
(``codec.validate_layer``) and decodes the group table, the permutation and the fp32 scales (through
:func:`group_scales`, i.e. natively when it can), so a call here checks only ``x`` against the layer.  A
runtime linear layer keeps the prepared layer and calls, per forward::

    layer = codec.prepare_layer(tensors, name=prefix).to(device)     # at load: validates once
    y = ops.matmul(x2d, layer)[:, :out_features]                      # x2d [M, K] fp16/fp32 -> [M, Np]
    if layer.bias is not None: y = y + layer.bias[:out_features]      # matmul adds no bias

On the reference path ``matmul`` rebuilds the whole fp16 weight on every call; a caller that runs there for
long (``backend(layer) == "reference"``) does better to keep ``dequantize_layer(layer)`` once instead.
"""
from __future__ import annotations

import contextlib

import torch

from . import ext, reference
from .finite import all_finite
from .layout import EXL2FormatError, PreparedLayer
from .qparams import VALID_BITS
from .reference import GroupScales

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

_forced_reference = False


# ------------------------------------------------------------------------------------------------
# The switch and the query
# ------------------------------------------------------------------------------------------------

def force_reference(on: bool = True) -> bool:
    """Route every op to its torch reference (``on``) or back to the native kernels; returns the setting
    it replaces.  Process-wide."""
    global _forced_reference
    prev, _forced_reference = _forced_reference, bool(on)
    return prev


@contextlib.contextmanager
def reference_only():
    """``with ops.reference_only(): ...`` runs every op inside on the torch reference (then restores the
    previous setting; nests)."""
    prev = force_reference(True)
    try:
        yield
    finally:
        force_reference(prev)


def backend(t) -> str:
    """The path an op on ``t`` (a tensor or a :class:`PreparedLayer`) takes now: ``'cuda'``, ``'cpu'``
    (the native C++ kernels) or ``'reference'``.  Builds the extension on first use unless forced off."""
    if isinstance(t, PreparedLayer):
        t = t.q_weight
    if _forced_reference:
        return "reference"
    m = ext.get()
    if m is None:
        return "reference"
    if t.device.type == "cuda":
        return "cuda" if getattr(m, "has_cuda", False) else "reference"
    return "cpu"


def _native(t: torch.Tensor):
    """(module, prefix) for the native op on t's device, or (None, None) for the reference."""
    b = backend(t)
    if b == "reference":
        return None, None
    return ext.get(), ("" if b == "cpu" else "cuda_")


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------

def check_tensor(t, name: str, dtypes=None, dim: int | None = None, contiguous: bool = False):
    """``t`` itself if it is a tensor the kernels can read (dtype among ``dtypes``, ``dim`` dimensions, on a
    CPU or CUDA device, contiguous if asked, aligned to its element size); else TypeError/ValueError naming
    ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        if t.dtype not in dtypes:
            want = " or ".join(str(d) for d in dtypes)
            raise TypeError(f"{name} must have dtype {want}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {t.stride()})")
    if t.numel() and t.data_ptr() % t.element_size():
        # The kernels read elements through typed pointers: each must sit on its own size boundary.
        raise ValueError(f"{name} is not aligned to its {t.element_size()}-byte elements (a byte-offset view?)")
    return t


def _same_device(**tensors):
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError("tensors must share one device, got " + ", ".join(f"{n} on {d}" for n, d in devs.items()))


def _bits(bits, allowed=VALID_BITS) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise EXL2FormatError(f"bits must be one of {allowed}, got {bits!r}")
    return bits


def _layer(layer) -> PreparedLayer:
    if not isinstance(layer, PreparedLayer):
        raise TypeError(f"layer must be a PreparedLayer (codec.prepare_layer(tensors) makes one), "
                        f"got {type(layer).__name__}")
    return layer


# ------------------------------------------------------------------------------------------------
# Bitstream
# ------------------------------------------------------------------------------------------------

def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``q [rows, N]`` (any integer dtype, values < 2^bits) -> int32 words ``[rows*bits/32, N]``."""
    check_tensor(q, "q", _INT_DTYPES, dim=2)
    _bits(bits)
    rows, n = q.shape
    if (rows * bits) % 32:
        raise EXL2FormatError(f"q: {rows} rows x {bits} bits is not a whole number of 32-bit words")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise EXL2FormatError(f"q: codes must lie in [0, {2**bits - 1}] for {bits}-bit rows")
    m, pre = _native(q)
    if m is None:
        return reference.pack_bits(q, bits)
    return getattr(m, pre + "pack_bits")(q.to(torch.int32).contiguous(), bits)


def unpack_bits(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """int32 ``words [W, N]`` -> int64 codes ``[rows, N]`` (inverse of :func:`pack_bits`)."""
    check_tensor(words, "words", torch.int32, dim=2)
    _bits(bits)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows must be a non-negative int, got {rows!r}")
    if words.shape[0] * 32 < rows * bits:
        raise EXL2FormatError(f"words: {words.shape[0]} words cannot hold {rows} codes of {bits} bits")
    m, pre = _native(words)
    if m is None:
        return reference.unpack_bits(words, bits, rows)
    return getattr(m, pre + "unpack_bits")(words.contiguous(), bits, rows)


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------

def group_scales(q_scale: torch.Tensor, q_scale_max: torch.Tensor, prescale: float = 1.0) -> torch.Tensor:
    """Loader scales ``[G, Np]`` as fp32 holding fp16 values, from the stored ``q_scale`` (int32
    ``[G, Np/8]``) and ``q_scale_max`` (fp16 ``[G]``), ``prescale`` applied (:func:`layout.decode_scales`)."""
    check_tensor(q_scale, "q_scale", torch.int32, dim=2)
    check_tensor(q_scale_max, "q_scale_max", torch.float16, dim=1)
    _same_device(q_scale=q_scale, q_scale_max=q_scale_max)
    if q_scale_max.shape[0] != q_scale.shape[0]:
        raise ValueError(f"q_scale_max has {q_scale_max.shape[0]} groups, q_scale {q_scale.shape[0]}")
    m, pre = _native(q_scale)
    if m is None:
        return reference.group_scales(q_scale, q_scale_max, prescale)
    smax_mul = float(torch.tensor(prescale / 256.0, dtype=torch.float32))
    return getattr(m, pre + "group_scales")(q_scale.contiguous(), q_scale_max.contiguous(), smax_mul)


def dequantize_layer(layer: PreparedLayer) -> torch.Tensor:
    """fp16 weight ``[Np, K]`` exactly as the loader reconstructs it, for a prepared layer."""
    _layer(layer)
    m, pre = _native(layer.q_weight)
    if m is None:
        return reference.dequantize_layer(layer)
    return getattr(m, pre + "dequantize")(layer.q_weight, layer.scales, layer.groups, layer.perm)


def matmul(x: torch.Tensor, layer: PreparedLayer) -> torch.Tensor:
    """``y = x @ W`` for ``x [M, K]`` (fp16 or fp32) and a prepared layer: ``[M, Np]`` in x's dtype.

    The native kernels gather x by the permutation and decode the weight piece by piece (never the whole
    weight: on the CPU a block of rows of one column for a few rows of x, a panel of rows and columns for
    more), accumulating in fp32.  Padded columns are exactly 0; no bias is added.
    """
    check_tensor(x, "x", (torch.float16, torch.float32), dim=2)
    _layer(layer)
    if x.shape[1] != layer.perm.shape[0]:
        raise ValueError(f"x has {x.shape[1]} features, the layer has K = {layer.perm.shape[0]}")
    _same_device(x=x, q_weight=layer.q_weight)
    m, pre = _native(layer.q_weight)
    if m is None:
        return reference.matmul(x, layer)
    return getattr(m, pre + "matmul")(x.contiguous(), layer.q_weight, layer.scales, layer.groups,
                                      layer.perm).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# GPTQ
# ------------------------------------------------------------------------------------------------

def find_scales(w: torch.Tensor, bits: int) -> GroupScales:
    """Scales of one group ``w [rows, N]`` fp32 (:func:`reference.find_scales`).

    The native search sums the 97 error totals in double (torch sums fp32 in its own order), so the two
    could pick different grid points only if two totals agree to ~1e-7 relative; no such tie has been
    seen in the tests (every width, shapes up to 128 x 257, whole GPTQ runs).  Everything else (base
    scales, codes, the fp16 scale_max and scales) is computed exactly as the reference does.  The CPU kernel
    stops summing a grid point once its running total exceeds a finished total: the terms are non-negative, so
    such a point cannot be chosen, and the totals that are finished are the same numbers.
    """
    check_tensor(w, "w", torch.float32, dim=2)
    _bits(bits)
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}")
    if not all_finite(w):           # the CPU kernel's early stop and ordering assume finite error totals
        raise ValueError("w holds inf or NaN")
    m, pre = _native(w)
    if m is None:
        return reference.find_scales(w, bits)
    codes, smax, scale = getattr(m, pre + "find_scales")(w.contiguous(), bits)
    return GroupScales(codes, smax, scale)


def refine_codes(w: torch.Tensor, gs: GroupScales, bits: int, span: int,
                 row_weight: torch.Tensor | None = None) -> GroupScales:
    """:func:`reference.refine_codes` of one group ``w [rows, N]`` fp32 from ``find_scales``' result ``gs``.

    The native kernel sums each candidate's squared errors in double (torch sums fp32 in its own order), so
    the two could pick different codes only where two candidates' errors agree to ~1e-7 relative, as for
    :func:`find_scales`.  ``row_weight`` (a lever that was not adopted) and CUDA tensors take the reference.
    """
    check_tensor(w, "w", torch.float32, dim=2)
    _bits(bits)
    if gs.codes.shape != (w.shape[1],):
        raise ValueError(f"codes has shape {tuple(gs.codes.shape)}, w has {w.shape[1]} columns")
    m, pre = _native(w)
    if m is None or pre or row_weight is not None:
        return reference.refine_codes(w, gs, bits, span, row_weight)
    codes, scale = m.refine_codes(w.contiguous(), bits, span, gs.codes.to(torch.int64).contiguous(),
                                  gs.scale_max.reshape(1).contiguous())
    return GroupScales(codes, gs.scale_max, scale)


def gptq_group(W: torch.Tensor, Hinv: torch.Tensor | None, a: int, scale: torch.Tensor, bits: int,
               codes: torch.Tensor, Q: torch.Tensor, err: torch.Tensor | None) -> None:
    """GPTQ's row loop over the group of rows ``[a, a + rows)``, in place (:func:`reference.gptq_group`).

    ``W [rows, N]`` fp32 (those rows of the permuted weight; updated in place), ``Hinv [K, K]`` fp32
    (None: round to nearest), ``scale [N]`` fp32 (fp16-exact), outputs ``codes [rows, N]`` int64,
    ``Q [rows, N]`` fp32 and ``err [rows, N]`` fp32 (unused when Hinv is None).  Every W, codes, Q and
    err must be contiguous (row slices of contiguous [K, N] tensors are).  The update of the rows after
    the group stays with the caller (a matmul).
    """
    check_tensor(W, "W", torch.float32, dim=2, contiguous=True)
    rows, n = W.shape
    check_tensor(scale, "scale", torch.float32, dim=1, contiguous=True)
    check_tensor(codes, "codes", torch.int64, dim=2, contiguous=True)
    check_tensor(Q, "Q", torch.float32, dim=2, contiguous=True)
    _bits(bits)
    if scale.shape[0] != n:
        raise ValueError(f"scale has {scale.shape[0]} columns, W has {n}")
    for name, t in (("codes", codes), ("Q", Q)):
        if t.shape != W.shape:
            raise ValueError(f"{name} must have W's shape {tuple(W.shape)}, got {tuple(t.shape)}")
    if Hinv is not None:
        check_tensor(Hinv, "Hinv", torch.float32, dim=2, contiguous=True)
        check_tensor(err, "err", torch.float32, dim=2, contiguous=True)
        if Hinv.shape[0] != Hinv.shape[1]:
            raise ValueError(f"Hinv must be square, got shape {tuple(Hinv.shape)}")
        if isinstance(a, bool) or not isinstance(a, int) or a < 0 or a + rows > Hinv.shape[0]:
            raise ValueError(f"a = {a!r}: rows [a, a + {rows}) must lie inside Hinv's {Hinv.shape[0]} rows")
        if err.shape != W.shape:
            raise ValueError(f"err must have W's shape {tuple(W.shape)}, got {tuple(err.shape)}")
    _same_device(W=W, Hinv=Hinv, scale=scale, codes=codes, Q=Q, err=err)
    m, pre = _native(W)
    if m is None:
        reference.gptq_group(W, Hinv, a, scale, bits, codes, Q, err)
        return
    empty = torch.empty(0, dtype=torch.float32, device=W.device)
    getattr(m, pre + "gptq_group")(W, empty if Hinv is None else Hinv, a if Hinv is not None else 0, scale, bits,
                                   codes, Q, empty if err is None else err)


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------

def _kv_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    return bits


def kv_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``x [..., D]`` -> (uint8 codes, fp16 scales), as :func:`kv_quant.kv_quantize`."""
    check_tensor(x, "x", torch.float16)
    _kv_bits(bits)
    if x.dim() < 1 or x.shape[-1] % 64:
        raise ValueError(f"x must have a last dimension that is a multiple of 64, got shape {tuple(x.shape)}")
    m, pre = _native(x)
    if m is None:
        return reference.kv_quantize(x, bits)
    if not all_finite(x):
        raise ValueError("x holds inf or NaN")
    D = x.shape[-1]
    lead = x.shape[:-1]
    q, s, overflow = getattr(m, pre + "kv_quantize")(x.reshape(-1, D).contiguous(), bits)
    if overflow:
        raise ValueError(f"x: the fp16 Hadamard rotation overflows (max |x| = {x.abs().max().item()}; "
                         "sums of 32 values must stay <= 65504, which max |x| <= 2047 guarantees)")
    return q.reshape(*lead, D * bits // 8), s.reshape(*lead, D // 32)


def kv_dequantize(q: torch.Tensor, scales: torch.Tensor, bits: int, D: int) -> torch.Tensor:
    """Inverse of :func:`kv_quantize` (as :func:`kv_quant.kv_dequantize`)."""
    check_tensor(q, "q", torch.uint8)
    check_tensor(scales, "scales", torch.float16)
    _kv_bits(bits)
    if isinstance(D, bool) or not isinstance(D, int) or D <= 0 or D % 64:
        raise ValueError(f"D must be a positive multiple of 64, got {D!r}")
    if q.dim() < 1 or q.shape[-1] != D * bits // 8:
        raise ValueError(f"q must have last dimension D*bits/8 = {D * bits // 8}, got shape {tuple(q.shape)}")
    if scales.dim() < 1 or scales.shape[-1] != D // 32:
        raise ValueError(f"scales must have last dimension D/32 = {D // 32}, got shape {tuple(scales.shape)}")
    if scales.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"scales leading shape {tuple(scales.shape[:-1])} does not match q's {tuple(q.shape[:-1])}")
    _same_device(q=q, scales=scales)
    m, pre = _native(q)
    if m is None:
        return reference.kv_dequantize(q, scales, bits, D)
    if not all_finite(scales):
        raise ValueError("scales holds inf or NaN")
    lead = q.shape[:-1]
    x, overflow = getattr(m, pre + "kv_dequantize")(q.reshape(-1, q.shape[-1]).contiguous(),
                                                    scales.reshape(-1, D // 32).contiguous(), bits, D)
    if overflow:
        raise ValueError("q: the decoded values overflow the fp16 Hadamard butterfly (|x'| > ~2047)")
    return x.reshape(*lead, D)
