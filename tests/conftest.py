"""Test-wide settings. Triton runs in its interpreter on machines without a GPU; the variable
must be set before triton is first imported, hence here."""

import os

try:
    import torch

    _has_gpu = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")
