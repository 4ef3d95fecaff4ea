#!/usr/bin/env bash
# Create (once) the private venv in which llm-compressor runs for bench/peers/llmcompressor.py.
#
# llm-compressor pins its own transformers (<= 5.17) and pulls datasets/accelerate/auto-round, so it
# lives in .peers/llmc-venv (ignored by git), never in the project's environment. torch is pinned to
# the CPU build 2.13.0 in the same resolve (and through a constraints file), so pip never fetches a
# multi-GB CUDA torch. Idempotent: re-running only verifies the install and prints the versions.
#
#   bash bench/peers/setup_llmcompressor.sh            # PYTHON=python3.11 to choose the interpreter
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LLMC_VENV:-$ROOT/.peers/llmc-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
LLMC_PIN="llmcompressor==0.14.0.1"

mkdir -p "$(dirname "$VENV")"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

CONSTRAINTS="$VENV/constraints.txt"
printf '%s\n' "$TORCH_PIN" > "$CONSTRAINTS"

if ! "$PY" -c "import llmcompressor, torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    "$PY" -m pip install -q --upgrade pip >&2 || true
    # CPU torch first (from local wheels when present), then llm-compressor with torch pinned in the
    # same invocation and via the constraints file.
    # (the grep drops pip's noise about this machine's file:// extra indexes lacking a package)
    "$PY" -m pip install -q "$TORCH_PIN" -c "$CONSTRAINTS" 2> >(grep -v 'is ignored: it is neither' >&2) >&2
    "$PY" -m pip install -q "$LLMC_PIN" "$TORCH_PIN" -c "$CONSTRAINTS" 2> >(grep -v 'is ignored: it is neither' >&2) >&2
fi

"$PY" - <<'EOF'
import importlib.metadata as md
for p in ("llmcompressor", "compressed-tensors", "torch", "transformers", "accelerate", "datasets"):
    try:
        print(f"{p}=={md.version(p)}")
    except md.PackageNotFoundError:
        print(f"{p}: not installed")
cuda_pkgs = [d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia-") and "ml-py" not in d.metadata["Name"].lower()]
if cuda_pkgs:
    print("WARNING: CUDA packages present:", ", ".join(sorted(cuda_pkgs)))
EOF
