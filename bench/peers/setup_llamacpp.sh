#!/usr/bin/env bash
# Build llama.cpp's quantization tools (CPU only) from the sources vendored in the llama-cpp-python sdist.
#
#   bash bench/peers/setup_llamacpp.sh        # idempotent; ~15-20 min on 2 cores the first time
#
# Result, under <repo>/.peers/llama.cpp/ (nothing here is tracked by git):
#   src/       the vendored llama.cpp tree (convert_hf_to_gguf.py, gguf-py/, ...)
#   bin/       llama-quantize, llama-imatrix, llama-perplexity, llama-bench (decode speed)
#   VERSION    the llama.cpp commit the sdist vendors (the build itself reports "unknown": no .git)
#
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36), JOBS (default 2), PYTHON (default python).
# The converter uses its own vendored gguf-py and needs numpy, torch (CPU; never installed here),
# transformers and sentencepiece (installed with --no-deps when missing).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROOT="$REPO/.peers/llama.cpp"
DL="$REPO/.peers/dl"
SDIST="$DL/llama_cpp_python-$VERSION.tar.gz"
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-bench)

mkdir -p "$ROOT" "$DL"

# 1. the sdist (pip, PyPI only)
if [ ! -f "$SDIST" ]; then
    echo "== downloading llama-cpp-python==$VERSION sdist"
    "$PYTHON" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DL"
fi

# 2. the vendored llama.cpp tree (re-extracted only when the sdist version changes)
STAMP="$ROOT/src/.from-sdist"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$VERSION" ]; then
    echo "== extracting vendor/llama.cpp from $SDIST"
    TMP="$(mktemp -d "$ROOT/extract.XXXXXX")"
    trap 'rm -rf "$TMP"' EXIT
    top="llama_cpp_python-$VERSION"
    tar -xzf "$SDIST" -C "$TMP" "$top/vendor/llama.cpp" "$top/.git/modules/vendor/llama.cpp/HEAD"
    rm -rf "$ROOT/src" "$ROOT/build"
    mv "$TMP/$top/vendor/llama.cpp" "$ROOT/src"
    rm -f "$ROOT/src/.git"   # a gitdir link into the sdist's .git, which we do not keep
    commit="$(tr -d '[:space:]' < "$TMP/$top/.git/modules/vendor/llama.cpp/HEAD")"
    echo "$commit" > "$ROOT/VERSION"
    echo "$VERSION" > "$STAMP"
    rm -rf "$TMP"
    trap - EXIT
fi

# 3. build the tools (CPU, Release, static, no curl/openssl, no server/tests/examples). The extracted tree
#    has no .git: stop git from finding an enclosing repository (ours) and give the vendored commit instead.
export GIT_CEILING_DIRECTORIES="$ROOT"
COMMIT="$(cat "$ROOT/VERSION")"
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
CMAKE_ARGS=("${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TOOLS=ON
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON -DGGML_NATIVE=ON
    "-DLLAMA_BUILD_COMMIT=${COMMIT:0:9}" -DLLAMA_BUILD_NUMBER=0)
want="${CMAKE_ARGS[*]} | ${TOOLS[*]}"
have_all=1
for t in "${TOOLS[@]}"; do [ -x "$ROOT/bin/$t" ] || have_all=0; done
[ -f "$ROOT/bin/.build-args" ] && [ "$(cat "$ROOT/bin/.build-args")" = "$want" ] || have_all=0
if [ "$have_all" = 0 ]; then
    echo "== building ${TOOLS[*]} with -j$JOBS"
    start=$(date +%s)
    cmake -S "$ROOT/src" -B "$ROOT/build" "${CMAKE_ARGS[@]}"
    cmake --build "$ROOT/build" --config Release -j "$JOBS" --target "${TOOLS[@]}"
    mkdir -p "$ROOT/bin"
    for t in "${TOOLS[@]}"; do cp -f "$ROOT/build/bin/$t" "$ROOT/bin/$t"; done
    echo "$want" > "$ROOT/bin/.build-args"
    echo "== build took $(( $(date +%s) - start )) s"
fi

# 4. the converter: it puts its own gguf-py first on sys.path and imports torch, numpy and transformers
#    (all present; never install a torch here). Its Llama path imports sentencepiece before it looks for a
#    tokenizer.model, even for BPE vocabularies (SmolLM2): install that alone, --no-deps.
if ! "$PYTHON" -c "import sentencepiece" 2>/dev/null; then
    echo "== installing sentencepiece (--no-deps)"
    "$PYTHON" -m pip install --no-deps "sentencepiece>=0.1.98,<0.3.0"
fi
if ! "$PYTHON" "$ROOT/src/convert_hf_to_gguf.py" --help >/dev/null; then
    echo "convert_hf_to_gguf.py does not import with $PYTHON (needs torch, numpy, transformers)" >&2
    exit 1
fi

echo "llama.cpp $(cat "$ROOT/VERSION") ready in $ROOT/bin"
