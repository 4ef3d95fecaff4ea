"""The measurement pass on a tiny random Qwen2: schema, monotone errors, resume equals uninterrupted."""
from __future__ import annotations


import pytest

from exl2.measure import measurement as mj
from exl2.measure.measure import run_measurement
from exl2.layers.checkpoint import checkpoint_progress
from exl2.quant_kernels.qparams import ATTN_OPTIONS, MLP_OPTIONS


@pytest.fixture(scope="module")
def tiny(tiny_qwen_rows):
    return tiny_qwen_rows(3)


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    d, ids = tiny
    return run_measurement(d, ids, tmp_path_factory.mktemp("w"), provenance={"checkpoint_sha256": "x"})


def test_schema(uninterrupted):
    m = uninterrupted["measurement"]
    assert uninterrupted["last_module_idx"] == 2 * 3 + 2
    assert m["model.norm.norm"] is None and m["lm_head.linear"] is None
    for i in range(3):
        attn, mlp = m[f"model.layers.{i}.self_attn"], m[f"model.layers.{i}.mlp"]
        assert len(attn) == 19 and len(mlp) == 17
        assert [mj.entry_options(e) for e in attn] == [dict(zip(("q_proj", "k_proj", "v_proj", "o_proj"), r))
                                                        for r in ATTN_OPTIONS]
        assert [tuple(mj.entry_options(e).values()) for e in mlp] == list(MLP_OPTIONS)
        for entries in (attn, mlp):
            assert all(0 < e["accuracy"] <= 1 and e["token_err"] >= 0 for e in entries)


def test_error_falls_with_bits_at_equal_group_size(uninterrupted):
    m = uninterrupted["measurement"]
    for i in range(3):
        attn = m[f"model.layers.{i}.self_attn"]
        # Uniform 4, 6 and 8 bits, all with 128-row groups: options 6, 16 and 18.
        assert attn[6]["accuracy"] < attn[16]["accuracy"] < attn[18]["accuracy"]
        mlp = m[f"model.layers.{i}.mlp"]
        # Uniform 4-bit g32 (option 8) vs 8-bit g128 on every projection (option 16).
        assert mlp[0]["accuracy"] < mlp[8]["accuracy"] < mlp[16]["accuracy"]


def test_resume_after_interruption_gives_the_same_measurement(tiny, uninterrupted, tmp_path, stop_after_first_layer):
    d, ids = tiny

    with pytest.raises(stop_after_first_layer.error):
        run_measurement(d, ids, tmp_path, provenance={"checkpoint_sha256": "x"}, status=stop_after_first_layer)
    assert checkpoint_progress(tmp_path, "measure")["next_layer"] == 1
    seen = []
    resumed = run_measurement(d, ids, tmp_path, provenance={"checkpoint_sha256": "x"}, status=seen.append)
    assert [e["layer"] for e in seen if "layer" in e] == [1, 2]          # layer 0 was not measured again
    assert resumed["measurement"] == uninterrupted["measurement"]
    assert checkpoint_progress(tmp_path, "measure") is None


def test_one_layer_resident_at_a_time(tiny, tmp_path, monkeypatch):
    """Memory grows with one layer, not with depth: no two decoder layers' weights are alive together."""
    import gc
    import weakref

    from exl2.runtime.loader import ModelParts

    d, ids = tiny
    alive: list[weakref.ref] = []
    real_block = ModelParts.block

    def tracked(self, i):
        b = real_block(self, i)
        alive.append(weakref.ref(b))
        return b

    monkeypatch.setattr(ModelParts, "block", tracked)
    most = [0]

    def check(event):
        gc.collect()
        most[0] = max(most[0], sum(r() is not None for r in alive))

    run_measurement(d, ids, tmp_path, status=check)
    assert len(alive) == 3 and most[0] == 1


def test_other_tables_measure_the_same_entries_for_shared_options(tiny, uninterrupted, tmp_path):
    # Every module is measured on the FP16 path's states, so a table holding some of the default options
    # (here a reordered subset, written in cost order) gives those options the same entries: runs with different tables concatenate.
    from dataclasses import replace

    from exl2.layers.stream import ATTN, MLP

    d, ids = tiny
    pick_a, pick_m = [18, 4], [16, 0]
    specs = (replace(ATTN, options=[ATTN_OPTIONS[i] for i in pick_a]),
             replace(MLP, options=[MLP_OPTIONS[i] for i in pick_m]))
    other = run_measurement(d, ids, tmp_path, modules=specs)["measurement"]
    m = uninterrupted["measurement"]
    for i in range(3):
        for kind, pick in (("self_attn", pick_a), ("mlp", pick_m)):
            key = f"model.layers.{i}.{kind}"
            assert len(other[key]) == len(pick)
            table = ATTN_OPTIONS if kind == "self_attn" else MLP_OPTIONS
            by_option = {tuple(mj.entry_options(e).values()): e for e in other[key]}
            for j in pick:
                e = by_option[tuple(table[j])]
                assert e["total_bits"] == m[key][j]["total_bits"]
                assert e["accuracy"] == pytest.approx(m[key][j]["accuracy"], rel=1e-6)
                assert e["token_err"] == pytest.approx(m[key][j]["token_err"], rel=1e-6)
