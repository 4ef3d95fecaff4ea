# Set-up and entry points.  Every target installs what it needs first, so each works on a fresh clone.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install test demo

# torch==2.13.0 is pinned first so pip takes the CPU build from local disk instead of a CUDA build.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'

# The whole test suite (CPU; CUDA tests skip without a device).
test: install
	$(PYTHON) -m pytest -q

# The main job.  Until exl2-convert lands (issue 6) this is the format self-check: golden layers from an
# independent writer, then every option of the tables quantized, packed, validated and reloaded.
demo: install
	$(PYTHON) -m exl2.quant_kernels.selfcheck --golden ../shared/golden/exl2_layers.safetensors
