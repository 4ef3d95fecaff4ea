"""Every converter option, declared once.

Each :class:`Option` row says everything about one option: its field of :class:`ConvertOptions`, its
`exl2-convert` flags, its default, its help, how text from the command line or a value from an `exl2-batch`
spec becomes a value, what values are allowed, which finished work a change invalidates, and where it is
recorded in ``quantization_config``.  Everything else is derived from the table here:

- the click options of `exl2-convert` (:func:`click_options`),
- the :class:`ConvertOptions` dataclass (fields and defaults) and its checks (:func:`check_options`),
- the resume rules of the job (:data:`MEASURE_PARAMS`, :data:`QUANT_PARAMS`, :data:`LEGACY`, :data:`DEFAULT_CHANGED`,
  :func:`flag_of`),
- the keys, defaults and checks of an `exl2-batch` spec (:data:`BATCH_DEFAULTS`, :func:`from_spec`),
- what the written model's ``quantization_config`` says of the options (:func:`recorded`).

A check returns why a value is wrong (a phrase) or None; callers put the flag or spec key in front.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from exl2.core.errors import UserError
from exl2.quant_kernels.qparams import TABLES, VALID_BITS


class OptionError(UserError, ValueError):
    """An option's value is not allowed; the message names the flag (or spec key) and says why."""


# ----------------------------------------------------------------------------------------------- values

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _targets_text(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError("is not a comma-separated list of numbers") from None


def _targets_spec(value) -> list[float]:
    value = [value] if _number(value) else value
    if not isinstance(value, list) or not value or not all(_number(b) for b in value):
        raise ValueError("must be a non-empty list of numbers, e.g. [3.0, 4.0]")
    return [float(b) for b in value]


def _check_targets(bits: list[float]) -> str | None:
    if not bits:
        return "give at least one target"
    for b in bits:
        if not 1.5 <= b <= 9.0:
            return f"{b:g} is outside any model's feasible range (about 2 to 8 bits per weight)"
    if len({f"{b:g}" for b in bits}) != len(bits):
        return "lists a target twice"
    return None


def _text_to(kind: type, why: str) -> Callable[[str], Any]:
    """A command-line parser: ``kind(text)``, or ValueError(``why``)."""
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(why) from None
    return parse


_int_text = _text_to(int, "is not a whole number")
_float_text = _text_to(float, "is not a number")


def _int_spec(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("must be an integer")
    return value


def _at_least(least: int) -> Callable[[int], str | None]:
    return lambda v: None if v >= least else f"must be at least {least}"


def _float_spec(value) -> float:
    if not _number(value):
        raise ValueError("must be a number")
    return float(value)


def _asym_text(text: str) -> float | None:
    if text is None or str(text).strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError("is neither 'auto' nor a number") from None


def _asym_spec(value) -> float | None:
    if value == "auto":
        return None
    if not _number(value):
        raise ValueError('must be "auto" or a number between 0 (off) and 1')
    return float(value)


def _check_asym(alpha: float | None) -> str | None:
    return None if alpha is None or 0.0 <= alpha <= 1.0 else 'must be "auto" or a number between 0 (off) and 1'


def _path_spec(value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError("must be a path (string)")
    return value or None


def _given(value) -> str | None:
    return None if value else "is required"


def _ray_address(value) -> str | None:
    if value is None or value in ("local", "auto") or (":" in value and value.rpartition(":")[2].isdigit()):
        return None
    return "must be 'local', 'auto' or the head node's HOST:PORT"


def _one_of(choices) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"


# ----------------------------------------------------------------------------------------------- the table

# Asymmetric calibration's alpha when --asym is not given or is "auto": the correction is estimated from the
# quantization rows, so the full correction needs enough of them (docs/decisions/0007-asymmetric-calibration.md).
ASYM_AUTO_TOKENS = 50_000
ASYM_FULL, ASYM_FEW_TOKENS = 1.0, 0.25


@dataclass(frozen=True)
class Option:
    name: str                          # the ConvertOptions field
    default: Any
    help: str = ""
    flags: tuple[str, ...] = ()        # exl2-convert flags; () if the option has none
    switch: bool = False               # a flag without a value that sets the option to `not default`
    metavar: str | None = None
    choices: tuple | None = None       # allowed values (the command line shows them)
    show_default: str | bool = True    # the default as --help shows it (True: the default itself)
    required: bool = False
    from_text: Callable[[str], Any] = str                  # command-line text -> value (ValueError: why not)
    from_spec: Callable[[Any], Any] | None = None          # exl2-batch value -> value; None: not a spec key
    spec_key: str | None = None                            # the spec's name for it, if not `name`
    check: Callable[[Any], str | None] = lambda v: None    # the value -> why it is not allowed, or None
    invalidates: tuple[str, ...] = ()  # "measure", "quant": the finished work a change of value invalidates
    legacy: Any = None                 # the value job files written before the option existed used
    recorded_as: str | None = None     # where quantization_config records it ("head_bits", "exl2.tables")

    @property
    def flag(self) -> str:
        """How messages name the option: its long flag, else its field name."""
        return next((f for f in self.flags if f.startswith("--")), self.name)

    @property
    def short(self) -> str:
        """The shortest flag (ExLlamaV2's spelling where there is one), else the field name."""
        return min(self.flags, key=len) if self.flags else self.name

    @property
    def key(self) -> str | None:
        """The option's key in an exl2-batch spec ([defaults] and [[model]]), or None."""
        return (self.spec_key or self.name) if self.from_spec else None


OPTIONS: tuple[Option, ...] = (
    # --- what to convert, and where the work and the output go
    Option("in_dir", None, "Hugging Face model directory (config.json, *.safetensors, tokenizer.json).",
           flags=("-i", "--in-dir"), metavar="DIR", required=True, show_default=False, check=_given),
    Option("work_dir", None, "Working directory; an existing job there is resumed.",
           flags=("-o", "--out-dir"), metavar="DIR", required=True, show_default=False, check=_given),
    Option("compile_dir", None, "Write the finished model here (one folder per target when -b lists several). "
           "Default: OUT_DIR/bpw-X.XX/model.", flags=("-cf", "--compile-full"), metavar="DIR", show_default=False),
    # --- the targets
    Option("bits", [4.125], "Target bits per weight of the decoder layers; a comma-separated list reuses one "
           "measurement.", flags=("-b", "--bits"), metavar="BPW[,BPW...]", show_default="4.125",
           from_text=_targets_text, from_spec=_targets_spec, spec_key="bpw", check=_check_targets),
    Option("head_bits", 6, "Bits of the output head.", flags=("-hb", "--head-bits"), choices=VALID_BITS,
           from_text=_int_text, from_spec=_int_spec, check=_one_of(VALID_BITS), invalidates=("quant",),
           recorded_as="head_bits"),
    # --- measurement reuse
    Option("measurement", None, "Reuse this measurement.json instead of measuring.", flags=("-m", "--measurement"),
           metavar="FILE", show_default=False),
    Option("output_measurement", None, "Measure only, and write measurement.json here too.",
           flags=("-om", "--output-measurement"), metavar="FILE", show_default=False),
    Option("force_measurement", False, "Use a measurement made on another checkpoint.",
           flags=("--force-measurement",), switch=True),
    # --- calibration
    Option("cal_dataset", None, "Calibration data: parquet, jsonl or text. Default: the embedded mix.",
           flags=("-c", "--cal-dataset"), metavar="FILE", show_default=False, from_spec=_path_spec,
           invalidates=("measure", "quant")),
    Option("rows", 100, "Quantization rows.", flags=("-r", "--dataset-rows"), metavar="N", from_text=_int_text,
           from_spec=_int_spec, check=_at_least(1), invalidates=("quant",)),
    Option("length", 2048, "Tokens per quantization row.", flags=("-l", "--length"), metavar="N",
           from_text=_int_text, from_spec=_int_spec, check=_at_least(2), invalidates=("quant",)),
    Option("measurement_rows", 16, "Measurement rows.", flags=("-mr", "--measurement-rows"), metavar="N",
           from_text=_int_text, from_spec=_int_spec, check=_at_least(1), invalidates=("measure",)),
    Option("measurement_length", 2048, "Tokens per measurement row.", flags=("-ml", "--measurement-length"),
           metavar="N", from_text=_int_text, from_spec=_int_spec, check=_at_least(2), invalidates=("measure",)),
    Option("measure_stride", 4, "Estimate each candidate's output error from the first and every N-th token of "
           "the measurement rows, keeping at least 1,024 tokens (1: every token, as ExLlamaV2). The Hessians always "
           "see every token; why 4: docs/decisions/0017-measure-stride.md.", flags=("--measure-stride",), metavar="N",
           from_text=_int_text, from_spec=_int_spec, check=_at_least(1), invalidates=("measure",), legacy=1),
    Option("seed", 0, "Seed of the random calibration rows.", flags=("--seed",), metavar="N", from_text=_int_text,
           from_spec=_int_spec, invalidates=("measure", "quant")),
    # --- the method
    Option("tables", "exl2", "Options to measure: ExLlamaV2's tables, or those plus our candidates with 8-bit "
           "leading rows (docs/options.md; why: docs/decisions/0006-extended-option-tables-and-norm.md). "
           "Ignored with -m.", flags=("--tables",), choices=tuple(TABLES),
           from_spec=str, check=_one_of(tuple(TABLES)), invalidates=("measure",), legacy="exl2",
           recorded_as="exl2.tables"),
    Option("norm", None, "Allocate by minimising the sum of module errors to this power (2: squared errors). "
           "Default: ExLlamaV2's sweep of norms 1.5-3.5, keeping the one with the smallest maximum module error.",
           flags=("--norm",), metavar="P", show_default=False, from_text=_float_text, from_spec=_float_spec,
           check=lambda p: None if p is None or 1.0 <= p <= 4.0 else "must be between 1 and 4",
           recorded_as="exl2.norm"),
    Option("asym", None, "Asymmetric calibration: GPTQ toward the full-precision model's output instead of the "
           "output of the layer's own, already perturbed inputs, the correction scaled by ALPHA (0: off, GPTQ as "
           f"ExLlamaV2 runs it). auto: 1 with at least {ASYM_AUTO_TOKENS:,} quantization tokens (-r x -l), else "
           f"{ASYM_FEW_TOKENS:g} (why: docs/decisions/0007-asymmetric-calibration.md). Costs one more copy of the "
           "calibration states and extra forward passes.",
           flags=("--asym",), metavar="ALPHA|auto", show_default="auto", from_text=_asym_text,
           from_spec=_asym_spec, check=_check_asym, invalidates=("quant",), legacy=0.0, recorded_as="exl2.asym"),
    # --- output and running
    Option("shard_mib", 8192, "Maximum shard size in MiB; 0 for one file.", flags=("-ss", "--shard-size"),
           metavar="MIB", from_text=_int_text, check=_at_least(0)),
    Option("fresh", False, "Delete the working directory's contents and start over.", flags=("-nr", "--no-resume"),
           switch=True),
    Option("device", "cpu", "Where the work runs.", flags=("--device",), choices=("cpu", "cuda"),
           check=_one_of(("cpu", "cuda"))),
    Option("ray", None, "Measure the layers in parallel on Ray: 'local' starts an instance on this machine, "
           "'auto' or HOST:PORT joins a cluster (whose workers must see -o). The same measurement.json as "
           "without; quantization stays in this process.", flags=("--ray",), metavar="ADDRESS",
           check=_ray_address),
    Option("ray_workers", None, "Layer ranges measured in parallel with --ray, one Ray task each. Default: as "
           "many as the cluster's CPUs hold tasks of --ray-threads (its GPUs with --device cuda). In an "
           "exl2-batch spec: measure_workers (default: not split).", flags=("--ray-workers",), metavar="N",
           show_default=False, from_text=_int_text, from_spec=_int_spec, spec_key="measure_workers",
           check=lambda v: None if v is None else _at_least(1)(v)),
    Option("ray_threads", None, "Threads (and Ray CPUs) of each --ray task. Default: this process's thread "
           "count, which makes measurement.json the same bytes as a run without --ray (a different count "
           "changes the last bits of the errors).", flags=("--ray-threads",), metavar="N", show_default=False,
           from_text=_int_text, check=lambda v: None if v is None else _at_least(1)(v)),
    Option("validate", True, "Skip the perplexity/KL check of the written model.", flags=("--no-validate",),
           switch=True),
    Option("validation_rows", 4, "Held-out rows of the validation.", from_spec=_int_spec, check=_at_least(1)),
    Option("plan_check", True, "Run even where the plan predicts that memory or disk will not suffice.",
           flags=("--no-plan-check",), switch=True),
    Option("measure_only", False),     # -om sets it; exl2-batch's measurement task too
)

BY_NAME = {o.name: o for o in OPTIONS}

ConvertOptions = dataclasses.make_dataclass(
    "ConvertOptions",
    [(o.name, Any, field(default_factory=(lambda d=o.default: list(d))) if isinstance(o.default, list)
      else field(default=o.default)) for o in OPTIONS])
ConvertOptions.__module__ = __name__
ConvertOptions.__doc__ = "The converter's options (see OPTIONS for what each means); keyword arguments."

# The resume rules: the parameters whose change makes finished measurement or quantization unusable.  The
# job adds the two it derives itself (the checkpoint's and the measurement's hash).
MEASURE_PARAMS = ("checkpoint_sha256",) + tuple(o.name for o in OPTIONS if "measure" in o.invalidates)
QUANT_PARAMS = (("checkpoint_sha256",) + tuple(o.name for o in OPTIONS if "quant" in o.invalidates)
                + ("measurement_sha256",))
LEGACY = {o.name: o.legacy for o in OPTIONS if o.legacy is not None}
# options whose default is no longer what older job files used: a refused resume says which value goes on
DEFAULT_CHANGED = frozenset(name for name, was in LEGACY.items() if was != BY_NAME[name].default)


def flag_of(name: str) -> str:
    """How a message names parameter ``name`` (its short flag)."""
    if name == "checkpoint_sha256":
        return "-i (the checkpoint's content changed)"
    return BY_NAME[name].short


def auto_asym(rows: int, length: int) -> float:
    """The default alpha: 1 with at least ``ASYM_AUTO_TOKENS`` quantization tokens, else 0.25."""
    return ASYM_FULL if rows * length >= ASYM_AUTO_TOKENS else ASYM_FEW_TOKENS


def resolved_asym(opts) -> float:
    return auto_asym(opts.rows, opts.length) if opts.asym is None else opts.asym


def resolved_stride(opts) -> int:
    """The stride the measurement uses for ``measure_stride`` (measure.measure.effective_stride): lower when the
    measurement rows hold too few tokens, 1 for short ones."""
    from exl2.measure.measure import effective_stride

    return effective_stride(opts.measurement_rows, opts.measurement_length, opts.measure_stride)


# ----------------------------------------------------------------------------------------------- derived

def check_options(opts) -> None:
    """Every option's value allowed (OptionError naming the flag otherwise)."""
    for o in OPTIONS:
        value = getattr(opts, o.name)
        if o.name == "bits" and opts.measure_only:
            continue
        why = o.check(value)
        if why:
            shown = ",".join(f"{b:g}" for b in value) if o.name == "bits" else value
            raise OptionError(f"{o.short} {shown}: {why}")


def click_options(fn):
    """Decorate an exl2-convert click command with every option that has flags."""
    import click

    def parse(o: Option):
        def callback(ctx, param, value):
            if value is None or o.switch:
                return value
            try:
                v = o.from_text(value)
            except ValueError as e:
                raise click.BadParameter(f"{value!r} {e}") from None
            why = o.check(v)
            if why:
                raise click.BadParameter(f"{value!r}: {why}")
            return v
        return callback

    for o in reversed([o for o in OPTIONS if o.flags]):
        if o.switch:
            fn = click.option(*o.flags, o.name, flag_value=not o.default, default=o.default, help=o.help)(fn)
            continue
        default = o.show_default if isinstance(o.show_default, str) else o.default
        fn = click.option(*o.flags, o.name, default=None if default is None else str(default),
                          required=o.required, metavar=o.metavar, help=o.help, callback=parse(o),
                          show_default=bool(o.show_default) and default is not None,
                          type=click.Choice([str(c) for c in o.choices]) if o.choices else None)(fn)
    return fn


BATCH_DEFAULTS = {o.key: o.default for o in OPTIONS if o.key}


def from_spec(where: str, table: dict, base: Path) -> dict:
    """An exl2-batch settings table ([defaults] or one [[model]]) as {spec key: value}; OptionError naming
    ``where`` and the key for anything unknown or not allowed.  Paths resolve against ``base``."""
    by_key = {o.key: o for o in OPTIONS if o.key}
    out = {}
    for key, value in table.items():
        o = by_key.get(key)
        if o is None:
            raise OptionError(f"{where}: unknown key {key!r} (known: {', '.join(by_key)})")
        try:
            v = o.from_spec(value)
        except ValueError as e:
            raise OptionError(f"{where}: {key} = {value!r}: {e}") from None
        why = o.check(v)
        if why:
            raise OptionError(f"{where}: {key} = {value!r}: {why}")
        if o.name == "cal_dataset" and v:
            v = str(base / v)
        out[key] = v
    return out


def spec_to_options(settings: dict) -> dict:
    """{spec key: value} -> ConvertOptions keyword arguments."""
    by_key = {o.key: o.name for o in OPTIONS if o.key}
    return {by_key[k]: v for k, v in settings.items()}


def quantization_config(opts, bpw: float, *, calibration: dict, provenance: dict, tables: str) -> dict:
    """The ``quantization_config`` of the model written for target ``bpw``: ExLlamaV2's keys, then ours under
    "exl2" (ExLlamaV2's "version" would be the version of ExLlamaV2 that wrote the files, so ours lives there).

    ``calibration``: the rows actually used; ``provenance``: tool, version, bpw reached, checkpoint hash;
    ``tables``: the option tables of the measurement the strategy came from."""
    return {"quant_method": "exl2", "bits": bpw, "head_bits": opts.head_bits, "calibration": calibration,
            "exl2": {**provenance, "tables": tables, "norm": opts.norm, "asym": resolved_asym(opts)}}


def recorded(opts, bpw: float) -> dict:
    """What :func:`quantization_config` records of the options for target ``bpw``, as {dotted path: value};
    the exl2-batch driver compares an existing output with its spec through it and :func:`read_recorded`."""
    values = {"bits": bpw,
              "calibration.rows": opts.rows, "calibration.length": opts.length,
              "calibration.dataset": Path(opts.cal_dataset).name if opts.cal_dataset else "(default)"}
    for o in OPTIONS:
        if o.recorded_as:
            values[o.recorded_as] = resolved_asym(opts) if o.name == "asym" else getattr(opts, o.name)
    return values


def read_recorded(qconf: dict) -> dict:
    """:func:`recorded`'s view of a written quantization_config; options that did not exist when it was
    written read as their legacy value (or None)."""
    out = {}
    for path in recorded(ConvertOptions(), 0.0):
        node = qconf
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None and path.startswith("exl2."):
            node = next((o.legacy for o in OPTIONS if o.recorded_as == path), None)
        out[path] = node
    return out
