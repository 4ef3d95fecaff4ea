"""measurement.json: ExLlamaV2's layout both ways, provenance, and refusal of another model's file."""
from __future__ import annotations

import json

import pytest

from exl2.measure import measurement as mj
from exl2.measure.optimize import optimize
from exl2.quant_kernels.qparams import ATTN_OPTIONS, ATTN_PROJ, MLP_OPTIONS, MLP_PROJ

# Written by hand the way ExLlamaV2's measure pass writes it (group-size keys as strings, no "exl2" block).
EXLLAMAV2_STYLE = """{
    "measurement": {
        "model.layers.0.self_attn": [
            {"accuracy": 0.91, "total_bits": 1000,
             "q_proj": {"group_size": {"3": 64, "2": 64}, "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4},
             "k_proj": {"group_size": {"3": 64, "2": 64}, "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4},
             "v_proj": {"group_size": {"3": 64, "2": 64}, "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4},
             "o_proj": {"group_size": {"3": 64, "2": 64}, "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4}},
            {"accuracy": 0.99, "total_bits": 4000,
             "q_proj": {"group_size": {"8": 128}, "bits": [8], "bits_prop": [1], "scale_bits": 4},
             "k_proj": {"group_size": {"8": 128}, "bits": [8], "bits_prop": [1], "scale_bits": 4},
             "v_proj": {"group_size": {"8": 128}, "bits": [8], "bits_prop": [1], "scale_bits": 4},
             "o_proj": {"group_size": {"8": 128}, "bits": [8], "bits_prop": [1], "scale_bits": 4}}
        ],
        "model.layers.0.mlp": [
            {"accuracy": 0.9, "total_bits": 2000,
             "gate_proj": {"group_size": {"3": 64, "2": 64}, "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4},
             "up_proj": {"group_size": {"3": 64, "2": 64}, "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4},
             "down_proj": {"group_size": {"6": 32, "3": 64, "2": 64}, "bits": [6, 3, 2], "bits_prop": [0.05, 0.2, 0.75], "scale_bits": 4}}
        ],
        "model.norm.norm": null,
        "lm_head.linear": null
    },
    "last_module_idx": 3
}"""


def test_reads_exllamav2_file(tmp_path):
    p = tmp_path / "measurement.json"
    p.write_text(EXLLAMAV2_STYLE)
    data = mj.load(p)
    e = data["measurement"]["model.layers.0.mlp"][0]
    opts = mj.entry_options(e)
    assert opts["down_proj"] == MLP_OPTIONS[0][2]
    assert mj.entry_options(data["measurement"]["model.layers.0.self_attn"][0])["q_proj"] == ATTN_OPTIONS[0][0]
    # A directory is accepted too, as with ExLlamaV2's -m.
    assert mj.load(tmp_path)["last_module_idx"] == 3
    # The optimizer takes it as is.
    sol = optimize(data["measurement"], numel=1000, bpw=6.0)
    assert sol.choice == {"model.layers.0.self_attn": 1, "model.layers.0.mlp": 0}


def test_round_trip_in_exllamav2_layout(tmp_path):
    shapes = {"q_proj": (256, 256, True), "k_proj": (256, 64, True), "v_proj": (256, 64, True), "o_proj": (256, 256, False)}
    entries = [mj.entry(0.5 + i / 100, dict(zip(ATTN_PROJ, row)), shapes) for i, row in enumerate(ATTN_OPTIONS)]
    m = {"model.layers.0.self_attn": entries, "model.norm.norm": None, "lm_head.linear": None}
    prov = {"tool_version": "0.1.0", "checkpoint_sha256": "ab" * 32, "calibration_sha256": "cd" * 32, "rows": 4, "length": 256}
    p = tmp_path / "m.json"
    mj.save(p, m, 2, prov)
    raw = json.loads(p.read_text())
    assert set(raw) == {"measurement", "last_module_idx", "exl2"}
    first = raw["measurement"]["model.layers.0.self_attn"][0]
    assert set(first) == {"accuracy", "total_bits", *ATTN_PROJ}
    assert first["q_proj"] == {"group_size": {"3": 64, "2": 64}, "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4}
    assert first["total_bits"] == sum(qp.total_bits(*shapes[n]) for n, qp in zip(ATTN_PROJ, ATTN_OPTIONS[0]))
    back = mj.load(p, checkpoint_sha256="ab" * 32)
    assert [mj.entry_options(e) for e in back["measurement"]["model.layers.0.self_attn"]] == \
           [dict(zip(ATTN_PROJ, row)) for row in ATTN_OPTIONS]
    assert back["exl2"]["format"] == mj.FORMAT
    assert not list(tmp_path.glob("*.tmp"))


def test_refuses_other_checkpoint_unless_forced(tmp_path):
    p = tmp_path / "m.json"
    e = mj.entry(0.9, dict(zip(MLP_PROJ, MLP_OPTIONS[0])), {"gate_proj": (64, 128, False), "up_proj": (64, 128, False), "down_proj": (128, 64, False)})
    mj.save(p, {"model.layers.0.mlp": [e]}, 0, {"checkpoint_sha256": "11" * 32})
    with pytest.raises(mj.MeasurementError, match="measured on another checkpoint"):
        mj.load(p, checkpoint_sha256="22" * 32)
    assert mj.load(p, checkpoint_sha256="22" * 32, force=True)


@pytest.mark.parametrize("text, message", [
    ("{}", "not a measurement file"),
    ('{"measurement": {"a": []}, "last_module_idx": 0}', "module a must have a non-empty list"),
    ('{"measurement": {"a": [{"accuracy": 1}]}, "last_module_idx": 0}', r"a\[0\] needs 'accuracy' and 'total_bits'"),
    ('{"measurement": {"a": [{"accuracy": 1, "total_bits": 5}]}, "last_module_idx": 0}', "names no projection"),
    ('{"measurement": {"a": [{"accuracy": 1, "total_bits": 5, "q_proj": {"group_size": 64, "bits": [7], "bits_prop": [1]}}]}, "last_module_idx": 0}',
     "bad option"),
    ('{"measurement": {}}', "missing 'last_module_idx'"),
    ("not json", "cannot read measurement"),
])
def test_bad_files(tmp_path, text, message):
    p = tmp_path / "m.json"
    p.write_text(text)
    with pytest.raises(mj.MeasurementError, match=message):
        mj.load(p)


def test_missing_file(tmp_path):
    with pytest.raises(mj.MeasurementError, match="no such file"):
        mj.load(tmp_path / "nope.json")


# ---- values: NaN / Infinity / null / strings are refused, naming file, module and entry (issue #21, item 9) ----

def _one_module_file(tmp_path, entry_text: str, second_text: str | None = None):
    first = ('{"accuracy": 0.9, "total_bits": 2000, '
             '"gate_proj": {"group_size": {"4": 128}, "bits": [4], "bits_prop": [1], "scale_bits": 4}}')
    body = ", ".join(x for x in (first, entry_text, second_text) if x)
    p = tmp_path / "measurement.json"
    p.write_text('{"measurement": {"model.layers.0.mlp": [' + body + '], "lm_head.linear": null}, '
                 '"last_module_idx": 3}')
    return p


_OPT = '"gate_proj": {"group_size": {"8": 128}, "bits": [8], "bits_prop": [1], "scale_bits": 4}'


@pytest.mark.parametrize("field, value", [
    ("accuracy", "NaN"), ("accuracy", "Infinity"), ("accuracy", "-Infinity"), ("accuracy", "null"),
    ("accuracy", '"0.99"'), ("accuracy", "true"), ("accuracy", "1.5"), ("accuracy", "-0.01"),
    ("total_bits", "NaN"), ("total_bits", "null"), ("total_bits", '"4000"'), ("total_bits", "0"),
    ("total_bits", "-4000"), ("total_bits", "4000.5"), ("total_bits", "Infinity"),
    ("token_err", "NaN"), ("token_err", "-0.5"), ("token_err", "null"),
])
def test_bad_values_are_refused_with_file_module_and_index(tmp_path, field, value):
    fields = {"accuracy": "0.99", "total_bits": "4000", field: value}
    e = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + ", " + _OPT + "}"
    p = _one_module_file(tmp_path, e)
    with pytest.raises(mj.MeasurementError) as info:
        mj.load(p)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}: model.layers.0.mlp[1]: {field} must be")
    assert msg.endswith(f"got {json.loads(value)!r}")


def test_nan_error_would_have_been_read_as_perfect(tmp_path):
    """Why NaN is refused: our optimizer clamps errors with max(0, x), and max(0, NaN) is 0; the module would
    silently get its cheapest option.  The optimizer refuses it on its own too (for data not read by load)."""
    m = {"model.layers.0.mlp": [{"accuracy": 0.9, "total_bits": 10, "token_err": 0.1},
                                {"accuracy": 0.99, "total_bits": 20, "token_err": float("nan")}]}
    with pytest.raises(ValueError, match=r"model.layers.0.mlp\[1\] has a non-finite error"):
        optimize(m, numel=10, bpw=1.5)


def test_accuracy_bounds_are_accepted(tmp_path):
    """ExLlamaV2 writes max(1e-6, 1 - mean error): never 0, never above 1; 0 and 1 themselves are valid."""
    e0 = '{"accuracy": 0, "total_bits": 3000, ' + _OPT + '}'
    e1 = '{"accuracy": 1.0, "total_bits": 4000.0, "token_err": 0, ' + _OPT + '}'
    data = mj.load(_one_module_file(tmp_path, e0, e1))
    assert [e["accuracy"] for e in data["measurement"]["model.layers.0.mlp"]] == [0.9, 0, 1.0]


def test_save_refuses_a_nan_before_writing(tmp_path):
    e = mj.entry(0.9, dict(zip(MLP_PROJ, MLP_OPTIONS[0])), {"gate_proj": (64, 128, False), "up_proj": (64, 128, False),
                                                            "down_proj": (128, 64, False)})
    e["token_err"] = float("nan")
    with pytest.raises(mj.MeasurementError, match=r"model.layers.0.mlp\[0\]: token_err must be"):
        mj.save(tmp_path / "m.json", {"model.layers.0.mlp": [e]}, 3)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["-1", "2.5", '"3"', "null"])
def test_last_module_idx_must_be_an_integer(tmp_path, value):
    p = tmp_path / "m.json"
    p.write_text(EXLLAMAV2_STYLE.replace('"last_module_idx": 3', f'"last_module_idx": {value}'))
    with pytest.raises(mj.MeasurementError, match="'last_module_idx' must be a non-negative integer"):
        mj.load(p)


# ---- ExLlamaV2 before 0.0.11 (issue #21, item 12) ----

# The shape ExLlamaV2 0.0.10 exported: one record per linear layer with its options, plus base_perplexity.
PRE_0_0_11 = {
    "measurement": [
        {"key": "model.layers.0.self_attn.q_proj", "numel": 16777216,
         "options": [{"desc": "0.05:3b/0.95:2b 32g s4", "bpw": 2.19, "total_bits": 36909875.2, "err": 0.114,
                      "qparams": {"group_size": 32, "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4}}]},
    ],
    "last_module_idx": 66,
    "base_perplexity": 6.1,
}


@pytest.mark.parametrize("variant", ["as exported", "without base_perplexity", "only base_perplexity"])
def test_pre_0_0_11_file_is_refused_saying_so(tmp_path, variant):
    data = json.loads(json.dumps(PRE_0_0_11))
    if variant == "without base_perplexity":
        del data["base_perplexity"]
    elif variant == "only base_perplexity":
        data["measurement"] = {}
    p = tmp_path / "measurement.json"
    p.write_text(json.dumps(data))
    with pytest.raises(mj.MeasurementError, match=r"written by ExLlamaV2 before 0\.0\.11") as info:
        mj.load(p)
    assert str(info.value).startswith(str(p)) and "\n" not in str(info.value)
