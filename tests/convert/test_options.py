"""convert/options.py: one declaration per option, and everything derived from it agrees."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from exl2.convert import options as opt
from exl2.convert.batch import SpecError, parse_spec, plan
from exl2.convert.cli import convert_main


def test_every_flag_is_on_the_command_line_with_its_default():
    text = CliRunner().invoke(convert_main, ["--help"], terminal_width=200).output
    for o in opt.OPTIONS:
        for flag in o.flags:
            assert flag in text, flag
    assert "[default: 4.125]" in text and "[default: auto]" in text and "[default: 2048]" in text


@pytest.mark.parametrize("name, text, spec_value, expected", [
    ("bits", "3,4.5", [3, 4.5], [3.0, 4.5]),
    ("head_bits", "8", 8, 8),
    ("rows", "7", 7, 7),
    ("norm", "2", 2, 2.0),
    ("asym", "auto", "auto", None),
    ("asym", "0.25", 0.25, 0.25),
])
def test_command_line_and_spec_give_the_same_value(name, text, spec_value, expected):
    o = opt.BY_NAME[name]
    assert o.from_text(text) == o.from_spec(spec_value) == expected
    assert o.check(expected) is None


@pytest.mark.parametrize("name, value, why", [
    ("bits", [1.0], "outside any model's feasible range"),
    ("bits", [4.0, 4.0], "lists a target twice"),
    ("head_bits", 7, "must be one of 2, 3, 4, 5, 6, 8"),
    ("length", 1, "must be at least 2"),
    ("norm", 5.0, "must be between 1 and 4"),
    ("asym", 1.5, "between 0 (off) and 1"),
])
def test_one_check_refuses_a_value_everywhere(tmp_path, name, value, why):
    """The same check refuses the value in the API (ConvertOptions), on the command line and in a spec."""
    o = opt.BY_NAME[name]
    assert why in o.check(value)
    kw = {"in_dir": "i", "work_dir": "w", name: value}
    with pytest.raises(opt.OptionError, match=f"^{o.short} .*{re.escape(why)}"):
        opt.check_options(opt.ConvertOptions(**kw))
    if o.flags:
        shown = ",".join(f"{b:g}" for b in value) if name == "bits" else str(value)
        r = CliRunner().invoke(convert_main, ["-i", "x", "-o", "y", o.flags[0], shown])
        said = "is not one of" if o.choices else why         # click refuses a value outside the choices itself
        assert r.exit_code == 2 and said in r.output and r.output.startswith("error: "), r.output
    with pytest.raises(SpecError, match=f"{o.key} = .*{re.escape(why)}"):
        parse_spec({"output": "o", "model": [{"path": "a", o.key: value}]}, tmp_path, "s.toml")


def test_resume_rules_come_from_the_declaration():
    assert set(opt.MEASURE_PARAMS) == {"checkpoint_sha256", "cal_dataset", "measurement_rows", "measurement_length",
                                       "measure_stride", "seed", "tables"}
    assert set(opt.QUANT_PARAMS) == {"checkpoint_sha256", "cal_dataset", "rows", "length", "head_bits", "seed",
                                     "asym", "measurement_sha256"}
    assert opt.flag_of("rows") == "-r" and opt.flag_of("asym") == "--asym"


def test_spec_defaults_are_the_converter_defaults(tmp_path):
    spec = parse_spec({"output": "o", "model": [{"path": "a"}]}, tmp_path, "s.toml")
    tasks = plan(spec)
    defaults = opt.ConvertOptions()
    for t in tasks:
        for name, value in t.options.items():
            if name not in ("in_dir", "work_dir", "compile_dir", "bits", "measure_only", "device"):
                assert value == getattr(defaults, name), name
    assert [t.bpw for t in tasks if t.kind == "quantize"] == defaults.bits


@pytest.mark.parametrize("kw", [{}, {"asym": 0.0, "norm": 2.0, "head_bits": 8, "cal_dataset": "/d/cal.txt"},
                                {"rows": 16, "length": 512}])
def test_quantization_config_records_what_the_spec_compares(kw):
    o = opt.ConvertOptions(in_dir="i", work_dir="w", **kw)
    calibration = {"rows": o.rows, "length": o.length,
                   "dataset": Path(o.cal_dataset).name if o.cal_dataset else "(default)"}
    q = opt.quantization_config(o, 4.0, calibration=calibration, provenance={"tool": "exl2"}, tables=o.tables)
    assert opt.read_recorded(q) == opt.recorded(o, 4.0)
    assert q["exl2"]["asym"] == opt.resolved_asym(o)


def test_outputs_written_before_an_option_existed_read_as_its_legacy_value():
    old = {"quant_method": "exl2", "bits": 4.0, "head_bits": 6,
           "calibration": {"rows": 100, "length": 2048, "dataset": "(default)"}, "exl2": {"tool": "exl2"}}
    got = opt.read_recorded(old)
    assert (got["exl2.tables"], got["exl2.asym"], got["exl2.norm"]) == ("exl2", 0.0, None)
