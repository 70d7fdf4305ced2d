#!/usr/bin/env bash
# Download the wheels that `import xgrammar` needs on a GPU machine that already has torch, transformers and
# pydantic (and so numpy and typing-extensions) but no network: xgrammar itself and apache-tvm-ffi, its one
# dependency those do not bring. triton and torch are never downloaded (the machine has its own).
#
# Usage: benchmarks/prepare_xgrammar_wheels.sh [PYTHON_VERSION] [PLATFORM]
#   PYTHON_VERSION: the target's Python, e.g. 3.11 or 3.12 (default: this machine's)
#   PLATFORM: pip's platform tag of the target (default: manylinux_2_28_x86_64)
# Then, on the target:  pip install --no-index --no-deps .wheels/*.whl
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON_VERSION="${1:-$(python3 -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')}"
PLATFORM="${2:-manylinux_2_28_x86_64}"
XGRAMMAR_VERSION="${XGRAMMAR_VERSION:-0.2.8}"
TVM_FFI_VERSION="${TVM_FFI_VERSION:-0.1.15.post2}"
DEST=".wheels"  # git-ignored

mkdir -p "$DEST"
for requirement in "xgrammar==${XGRAMMAR_VERSION}" "apache-tvm-ffi==${TVM_FFI_VERSION}"; do
    # --no-deps: xgrammar declares torch and triton, which the target has and which must not be fetched.
    python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
        --platform "$PLATFORM" --dest "$DEST" "$requirement"
done
ls -l "$DEST"
