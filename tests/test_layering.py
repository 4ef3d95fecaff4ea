"""The import-linter contracts in .importlinter hold: the stage order, no network modules in library code, the
optimizer free of torch.  import-linter is in the `test` extra; without it this test fails rather than skips."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    run = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
           "sys.exit(lint_imports_command())", "--config", str(REPO / ".importlinter"), "--no-cache", "--no-logo"]
    r = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout, r.stdout


def test_runtime_cli_loads_no_later_stage():
    """exl2-eval and exl2-generate start without importing the layer loop, measurement or the converter."""
    code = ("import sys, exl2.runtime.cli, exl2.runtime.evaluate, exl2.calibration.textrows; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('exl2.'))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    loaded = r.stdout.split()
    assert "exl2.runtime.cli" in loaded
    later = [m for m in loaded if m.split(".")[1] in ("layers", "measure", "convert")]
    assert not later, later
