"""Session-wide test setup, loaded before any test module."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU, Triton kernels are tested in Triton's interpreter, and TRITON_INTERPRET must be set before
    # triton itself is first imported (its own library functions are decorated then), which some test modules do
    # indirectly. Harmless elsewhere: CPU code paths never launch Triton kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")
