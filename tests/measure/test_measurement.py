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
