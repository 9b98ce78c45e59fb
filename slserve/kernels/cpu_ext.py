"""The C++ CPU helper for batched LoRA (csrc/lora_cpu.cpp), compiled on first use and cached.

The torch path loops over adapter segments; from Python every small matmul costs several
microseconds of interpreter and dispatch overhead, which at decode batch sizes is more than the
matmul itself. The same loop in C++ costs a fraction of that and runs segments on all intra-op
threads. If the compiler is missing the engine falls back to the Python loop (same results).
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "lora_cpu.cpp"


@cache
def lora_apply_op():
    """torch.ops.slserve.lora_apply, or None when the extension cannot be built here."""
    try:
        from torch.utils.cpp_extension import load

        load(name="slserve_lora_cpu", sources=[str(SOURCE)], is_python_module=False,
             extra_cflags=["-O3", "-march=native", "-ffast-math"], verbose=False)
        return torch.ops.slserve.lora_apply
    except Exception as exc:  # no compiler, no ninja, ...: the Python loop is still correct
        logger.warning("C++ LoRA helper unavailable, using the Python loop: %s", exc)
        return None
