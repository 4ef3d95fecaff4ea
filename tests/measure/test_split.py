"""A measurement in layer ranges (measure/split.py), in this process: the joined measurement.json is the same
bytes as a whole run's, an interrupted part resumes, and missing or mismatched parts are refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from exl2.measure.measure import run_measurement
from exl2.measure.split import (SplitError, layer_ranges, measure_part, merge_parts, part_dir, range_states,
                                states_path)

PROV = {"checkpoint_sha256": "x", "rows": 4}


@pytest.mark.parametrize("n, parts, expect", [
    (3, 2, [(0, 2), (2, 3)]), (30, 4, [(0, 8), (8, 16), (16, 23), (23, 30)]), (2, 5, [(0, 1), (1, 2)]),
    (5, 1, [(0, 5)])])
def test_layer_ranges_cover_every_layer_once_in_balanced_parts(n, parts, expect):
    assert layer_ranges(n, parts) == expect


@pytest.fixture(scope="module")
def moe_tiny(tmp_path_factory, tiny_builder, tiny_tokenizer):
    from exl2.calibration import default_rows

    d = tiny_builder("qwen3_moe", tmp_path_factory.mktemp("moe") / "model", num_hidden_layers=3)
    shutil.copy(tiny_tokenizer, d / "tokenizer.json")
    return d, default_rows(d / "tokenizer.json", rows=4, length=64, vocab_size=512).input_ids


def _split_run(d, ids, work, ranges, n_layers):
    range_states(d, ids, ranges, work)
    for a, b in ranges:
        measure_part(d, ids, work, a, b)
    return merge_parts(work, ranges, n_layers, work / "measurement.json", PROV)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3_moe"])
def test_parts_joined_are_the_same_bytes_as_one_run(kind, tiny_qwen_rows, moe_tiny, tmp_path):
    d, ids = tiny_qwen_rows(3) if kind == "qwen2" else moe_tiny
    whole = tmp_path / "whole"
    run_measurement(d, ids, whole, provenance=PROV)
    for ranges in ([(0, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)]):
        work = tmp_path / f"split{len(ranges)}"
        _split_run(d, ids, work, ranges, 3)
        assert (work / "measurement.json").read_bytes() == (whole / "measurement.json").read_bytes()
        # each part's checkpoint is gone once the part is finished
        assert not list(work.glob("part-*/*.checkpoint.safetensors"))


def test_sampled_parts_joined_are_the_same_bytes_as_one_run(tiny_qwen_rows, tmp_path, monkeypatch):
    """With the errors sampled (every 4th token: the floor of sampled tokens lowered for these short rows)."""
    from exl2.measure import measure as mm

    monkeypatch.setattr(mm, "MIN_SAMPLED", 0)
    d, ids = tiny_qwen_rows(3)
    run_measurement(d, ids, tmp_path / "whole", provenance=PROV)
    unsampled = run_measurement(d, ids, tmp_path / "unsampled", stride=1)
    work = tmp_path / "split"
    joined = _split_run(d, ids, work, [(0, 2), (2, 3)], 3)
    assert (work / "measurement.json").read_bytes() == (tmp_path / "whole" / "measurement.json").read_bytes()
    assert joined["measurement"] != unsampled["measurement"]


def test_interrupted_part_resumes_and_finished_parts_are_not_measured_again(tiny_qwen_rows, tmp_path,
                                                                            stop_after_first_layer):
    d, ids = tiny_qwen_rows(3)
    whole = tmp_path / "whole"
    run_measurement(d, ids, whole, provenance=PROV)
    work, ranges = tmp_path / "split", [(0, 2), (2, 3)]
    range_states(d, ids, ranges, work)

    with pytest.raises(stop_after_first_layer.error):
        measure_part(d, ids, work, 0, 2, status=stop_after_first_layer)
    seen = []
    measure_part(d, ids, work, 0, 2, status=seen.append)
    assert [e["layer"] for e in seen if "layer" in e] == [1]         # layer 0 came from the part's checkpoint
    measure_part(d, ids, work, 2, 3)
    seen.clear()
    measure_part(d, ids, work, 2, 3, status=seen.append)             # finished: read back, nothing measured
    assert seen == []
    merge_parts(work, ranges, 3, work / "measurement.json", PROV)
    assert (work / "measurement.json").read_bytes() == (whole / "measurement.json").read_bytes()


def test_states_pass_resumes_from_its_last_file(tiny_qwen_rows, tmp_path):
    d, ids = tiny_qwen_rows(3)
    full = range_states(d, ids, [(0, 1), (1, 2), (2, 3)], tmp_path / "a")
    part = tmp_path / "b"
    range_states(d, ids, [(0, 1), (1, 2)], part)         # files for layers 0 and 1 only
    range_states(d, ids, [(0, 1), (1, 2), (2, 3)], part)  # continues from layer 1's file
    from safetensors.torch import load_file

    for f in full:
        a, b = load_file(f), load_file(part / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_or_foreign_parts_are_refused(tiny_qwen_rows, tmp_path):
    d, ids = tiny_qwen_rows(3)
    ranges = [(0, 2), (2, 3)]
    with pytest.raises(SplitError, match="states-0002.safetensors: the input states of layers 2-2 are missing"):
        measure_part(d, ids, tmp_path, 2, 3)
    range_states(d, ids, ranges, tmp_path)
    measure_part(d, ids, tmp_path, 0, 2)
    with pytest.raises(SplitError, match=r"part-0002-0003.part.json: layers 2-2 are not measured yet"):
        merge_parts(tmp_path, ranges, 3, tmp_path / "m.json", PROV)
    with pytest.raises(SplitError, match="do not cover layers 0-2 once each"):
        merge_parts(tmp_path, [(0, 2), (1, 3)], 3, tmp_path / "m.json", PROV)
    measure_part(d, ids, tmp_path, 2, 3)
    other = part_dir(tmp_path, 2, 3) / "part.json"
    data = json.loads(other.read_text())
    other.write_text(json.dumps(dict(data, layers=[1, 3])))
    with pytest.raises(SplitError, match=r"holds layers \[1, 3\], expected \[2, 3\]"):
        merge_parts(tmp_path, ranges, 3, tmp_path / "m.json", PROV)
    assert not (tmp_path / "m.json").exists()
    assert states_path(tmp_path, 2).exists()
