"""The C++ CPU helpers (csrc/*.cpp), compiled on first use and cached by torch.

- `lora_apply`: the loop over adapter segments of kernels/lora.py:apply_lora. From Python every
  small matmul costs several microseconds of dispatch, and a bfloat16 library matmul with a few
  rows tens of microseconds of set-up, more than the arithmetic at decode batch sizes.
- `paged_decode_attention`: one query per sequence, reading K/V in place through the block
  table, instead of gathering the cache and running tiny batched matmuls.
- `add_rms_norm`, `rotary_write_kv`, `silu_mul`: the element-wise steps of a decoder layer, one
  pass each (see slserve/model/ops.py); `row_argmax`: greedy sampling's argmax over float32 or bfloat16
  logits, vectorised (torch's is a scalar loop).
- `int8_linear`, `q4_linear`: quantized base projections (--quantization, slserve/model/quant.py)
  at decode row counts, reading a quarter (int8) or under a fifth (q4) of float32's weight bytes.
- `openblas_linear`: float32 x @ W^T through OpenBLAS, loaded at run time, one single-threaded
  sgemm per torch thread (SLSERVE_CPU_BLAS, see `float32_gemm`).

If the compiler is missing, the engine falls back to the pure torch path (same results).

The helpers are compiled for the CPU they run on (`-march=native`: AVX512-BF16 loops where the
CPU has them). A build cache copied or shared to a CPU without those instructions would die with
an illegal instruction, so the extension's name carries a hash of the compiler, the flags and the
CPU's ISA flags: another CPU builds (and caches) its own. Two environment variables, for fleets
and for tests: SLSERVE_CPU_MARCH picks the target instead of `native` (a portable baseline such
as x86-64-v2), and SLSERVE_NO_CPU_EXT=1 skips the build (the torch path, as with no compiler).
"""

from __future__ import annotations

import hashlib
import logging
import platform
import re
from functools import cache
from pathlib import Path

import torch

from slserve.config import cpu_blas, cpu_ext_disabled, cpu_march, cxx_compiler

logger = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))


# /proc/cpuinfo flags that change what the compiler may emit for -march=native (x86 and Arm).
_ISA_FLAG = re.compile(r"^(avx|amx|sse|ssse|fma|f16c|bmi|vnni|asimd|sve|sha|aes|fp16|bf16|i8mm)")


def cpu_isa() -> str:
    """The CPU's instruction-set flags relevant to code generation, as one sorted string."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(f for f in value.split() if _ISA_FLAG.match(f))
                break
    except OSError:  # not Linux: torch's coarse level still tells AVX2 from AVX512 machines
        pass
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {' '.join(sorted(flags))}"


def build_flags(target: str) -> list[str]:
    return ["-O3", f"-march={target}", "-ffast-math", "-fopenmp"]


def extension_name(cflags: list[str]) -> str:
    """slserve_cpu_<hash of compiler, flags and, for native builds, this CPU's ISA flags>."""
    key = [cxx_compiler(), *cflags]
    if any(f == "-march=native" for f in cflags):
        key.append(cpu_isa())
    return "slserve_cpu_" + hashlib.sha256("\n".join(key).encode()).hexdigest()[:12]


@cache
def cpu_ops():
    """torch.ops.slserve with the C++ helpers, or None when they cannot be built here."""
    if cpu_ext_disabled():
        logger.info("C++ CPU helpers disabled by SLSERVE_NO_CPU_EXT, using the pure torch path")
        return None
    try:
        from torch.utils.cpp_extension import load

        cflags = build_flags(cpu_march())
        load(name=extension_name(cflags), sources=[str(s) for s in SOURCES], is_python_module=False,
             extra_cflags=cflags, extra_ldflags=["-ldl"], verbose=False)
        return torch.ops.slserve
    except Exception as exc:  # no compiler, no ninja, ...: the torch path is still correct
        logger.warning("C++ CPU helpers unavailable, using the pure torch path: %s", exc)
        return None


@cache
def float32_gemm():
    """`gemm(out, x, w)`: out = x @ w^T in float32 through OpenBLAS, when SLSERVE_CPU_BLAS
    chooses it (config.cpu_blas); None means torch's own matmul."""
    return openblas_linear_op() if cpu_blas() == "openblas" else None


def openblas_linear_op():
    """The OpenBLAS matmul, whatever SLSERVE_CPU_BLAS says, or None when the helpers or the
    scipy-openblas32 wheel are missing or the library does not load."""
    ops = cpu_ops()
    if ops is None:
        return None
    try:
        import scipy_openblas32
    except ImportError:
        logger.warning("OpenBLAS was chosen but scipy-openblas32 is not installed")
        return None
    lib = Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"
    if not ops.openblas_load(str(lib), "scipy_"):
        logger.warning("could not load OpenBLAS from %s, using torch's matmul", lib)
        return None
    return ops.openblas_linear


def row_argmax_op():
    ops = cpu_ops()
    return None if ops is None else ops.row_argmax


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
