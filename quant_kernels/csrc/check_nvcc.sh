#!/usr/bin/env bash
# Compile every CUDA kernel file with nvcc for sm_80 and sm_90 (no GPU and no CUDA build of torch
# needed: the .cu files include no torch headers).  Exits non-zero on any compiler error; exits 0 with
# a message when nvcc is absent.  Usage: quant_kernels/csrc/check_nvcc.sh   (NVCC=/path/to/nvcc to pick one)
set -euo pipefail
src="${BASH_SOURCE[0]}"; [[ "$src" == */* ]] || src="./$src"
here="$(cd "${src%/*}" && pwd)"
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" ]]; then
    echo "check_nvcc: nvcc not found; CUDA kernels not compiled (nothing checked)"
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fail=0
for cu in "$here"/cuda/*.cu; do
    name="$(basename "$cu" .cu)"
    if "$nvcc" -c -std=c++17 -O3 -Werror all-warnings -I "$here" \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
        -o "$tmp/$name.o" "$cu"; then
        echo "check_nvcc: ok   cuda/$name.cu"
    else
        echo "check_nvcc: FAIL cuda/$name.cu"
        fail=1
    fi
done
if [[ $fail -ne 0 ]]; then exit 1; fi
echo "check_nvcc: all CUDA kernels compile for sm_80 and sm_90 ($("$nvcc" --version | tail -1))"
