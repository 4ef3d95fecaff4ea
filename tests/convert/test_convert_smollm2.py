"""Real-model tier: SmolLM2-135M converted to 4.0 bpw with a small calibration preset, then validated."""
from __future__ import annotations

import json
import pytest
from click.testing import CliRunner

from exl2.convert.cli import convert_main, inspect_main

pytestmark = pytest.mark.slow


def test_smollm2_4bpw_end_to_end(smollm2_dir, tmp_path):
    work = tmp_path / "work"
    r = CliRunner().invoke(convert_main, ["-i", str(smollm2_dir), "-o", str(work), "-b", "4.0", "-mr", "4",
                                          "-ml", "256", "-r", "8", "-l", "256", "--status-json"])
    assert r.exit_code == 0, r.output
    out = work / "bpw-4.00" / "model"
    v = json.loads((out / "validation.json").read_text())
    strat = json.loads((work / "bpw-4.00" / "strategy.json").read_text())
    assert 3.9 < strat["bpw"] <= 4.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["exl2"]["asym"] == 0.25        # auto: 8 x 256 tokens are under 50,000
    # Measured with this preset (`python bench/e2e_bound.py`, docs/decisions/0012-e2e-kl-bound.md) on two CPUs:
    # KL 0.2081 / 0.2255 with today's defaults, 0.2405 / 0.2328 without refined scale codes, 0.2025 / 0.2250 with
    # --asym 0 (a Xeon on 2026-12-05, an AVX-512 EPYC on 2026-12-06; the same code gives both: runs are seeded,
    # the CPUs round differently).  The bound sits between the two variants on both; refined codes are guarded
    # for certain by tests/quant_kernels/test_gptq.py.  Asymmetric calibration cannot be guarded here:
    # with 8 x 256 quantization rows its auto alpha (0.25) measured 3 % worse than off; its math is guarded by
    # tests/quant_kernels/test_gptq.py (the least-squares target) and its choice by the asym check above.
    assert v["ppl_exl2"] < 1.5 * v["ppl_fp16"]          # 22.25 -> 24.28 / 25.50 measured
    assert v["kld_mean"] < 0.229, f"KL {v['kld_mean']:.4f} (ppl {v['ppl_fp16']:.2f} -> {v['ppl_exl2']:.2f})"
    rep = CliRunner().invoke(inspect_main, [str(out)])
    assert rep.exit_code == 0 and "all layers valid" in rep.output
    assert (out / "README.md").read_text().count("| ") > 30
