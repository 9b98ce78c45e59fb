"""The C++ CPU helpers (csrc/*.cpp), compiled on first use and cached by torch.

- `lora_apply`: the loop over adapter segments of kernels/lora.py:apply_lora. From Python every
  small matmul costs several microseconds of dispatch, and a bfloat16 library matmul with a few
  rows tens of microseconds of set-up, more than the arithmetic at decode batch sizes.
- `paged_decode_attention`: one query per sequence, reading K/V in place through the block
  table, instead of gathering the cache and running tiny batched matmuls.
- `add_rms_norm`, `rotary_write_kv`, `silu_mul`: the element-wise steps of a decoder layer, one
  pass each (see slserve/model/ops.py).

If the compiler is missing, the engine falls back to the pure torch path (same results).
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))


@cache
def cpu_ops():
    """torch.ops.slserve with the C++ helpers, or None when they cannot be built here."""
    try:
        from torch.utils.cpp_extension import load

        load(name="slserve_cpu", sources=[str(s) for s in SOURCES], is_python_module=False,
             extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], verbose=False)
        return torch.ops.slserve
    except Exception as exc:  # no compiler, no ninja, ...: the torch path is still correct
        logger.warning("C++ CPU helpers unavailable, using the pure torch path: %s", exc)
        return None


def lora_apply_op():
    ops = cpu_ops()
    return None if ops is None else ops.lora_apply


def decode_attention_op():
    ops = cpu_ops()
    return None if ops is None else ops.paged_decode_attention


def layer_ops():
    """The decoder's element-wise steps (model/ops.py): fused C++ loops when built, else torch."""
    from slserve.model.ops import CpuOps, TorchOps

    ops = cpu_ops()
    return TorchOps() if ops is None else CpuOps(ops)
