"""Test set-up: Triton kernels run under its interpreter when no CUDA GPU is present."""

import os

try:  # the interpreter must be chosen before triton is imported anywhere
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard requirement of the suite
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
