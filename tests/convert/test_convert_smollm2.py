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
    # Measured with this preset on 4 held-out rows x 256 (2026-11-25, 1ceaba5): ppl 22.25 -> 25.66 (+15 %),
    # KL 0.236, before refined scale codes and asymmetric calibration existed.  The ppl bound keeps its 1.5x.
    # The KL bound guards both levers.  At 4.0 bpw on this model, refined codes cut KL by 13 % (0.1546 ->
    # 0.1339, docs/decisions/0004) and alpha 0.25 by 10 % (0.1363 -> 0.1229, 0007).  Applied to 0.236:
    # about 0.184 with both, 0.204 without asym, 0.212 without refined codes.  0.20 sits 8 % above the value
    # with both (runs are seeded; machines differ by float rounding only) and under either loss.  Derived from
    # those records, not re-measured at this preset: the message prints today's value.
    assert v["ppl_exl2"] < 1.5 * v["ppl_fp16"]
    assert v["kld_mean"] < 0.20, f"KL {v['kld_mean']:.4f} (ppl {v['ppl_fp16']:.2f} -> {v['ppl_exl2']:.2f})"
    rep = CliRunner().invoke(inspect_main, [str(out)])
    assert rep.exit_code == 0 and "all layers valid" in rep.output
    assert (out / "README.md").read_text().count("| ") > 30
