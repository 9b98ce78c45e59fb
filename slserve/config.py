"""Frozen, validated configuration. The CLI maps onto these fields one to one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Quantization modes of the base linear layers (slserve/model/quant.py): int8 and q4 weight-only,
# w8a8 int8 weights and per-token int8 activations.
QUANTIZATIONS = ("int8", "q4", "w8a8")


def default_cache_dir() -> Path:
    """Where converted weights and the default adapter directory live (read once, here)."""
    root = os.environ.get("SLSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slserve"
    )
    return Path(root)


def cpu_march() -> str:
    """SLSERVE_CPU_MARCH: the -march target of the C++ CPU helpers (default native)."""
    return os.environ.get("SLSERVE_CPU_MARCH", "").strip() or "native"


def cpu_ext_disabled() -> bool:
    """SLSERVE_NO_CPU_EXT=1: never build or load the C++ CPU helpers (the pure torch path)."""
    return os.environ.get("SLSERVE_NO_CPU_EXT", "").strip().lower() in ("1", "true", "yes")


CPU_BLAS = ("auto", "openblas", "torch")


def cpu_blas() -> str:
    """SLSERVE_CPU_BLAS: which BLAS runs float32 CPU matmuls of 8 rows and more. "torch" is
    torch's own (MKL); "openblas" is the scipy-openblas32 wheel; "auto" (the default) picks
    OpenBLAS on AMD CPUs, where MKL's sgemm ran 1.1-1.6x slower, and torch's elsewhere."""
    choice = os.environ.get("SLSERVE_CPU_BLAS", "").strip().lower() or "auto"
    if choice not in CPU_BLAS:
        raise ValueError(f"SLSERVE_CPU_BLAS={choice!r}: expected one of {', '.join(CPU_BLAS)}")
    if choice == "auto":
        return "openblas" if cpu_vendor() == "AuthenticAMD" else "torch"
    return choice


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD), or "" where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "vendor_id":
                return value.strip()
    except OSError:
        pass
    return ""


def cxx_compiler() -> str:
    """The C++ compiler torch's extension builder uses (CXX), part of the helpers' build key."""
    return os.environ.get("CXX", "c++")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (oneDNN packs bfloat16 only with AVX512
    BW/VL/DQ or AVX-NE-CONVERT); elsewhere a bfloat16 matmul is emulated and several times slower
    than a float32 one."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def auto_dtype(device: str) -> str:
    """dtype "auto": bfloat16 on GPUs and on CPUs that compute it natively, float32 elsewhere."""
    if torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        return "float32"
    return "bfloat16"


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder, read from a Hugging Face config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA target module."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; `LLM(...)` and `slserve serve` build one of these."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"  # bfloat16 | float32 | float16 | auto (see auto_dtype)
    quantization: str | None = None  # None, or a mode of QUANTIZATIONS for the base projections
    device: str = "cpu"
    seed: int = 0
    # The unified pool: KV pages and adapter pages share it.
    pool_bytes: int = 4 << 30
    page_tokens: int = 16
    # Per-step limits of the continuous batcher. A decode step reads every weight once whatever its
    # rows, so wider steps cost less per token (bfloat16 on a 2-core CPU: 1690 tok/s at 128 rows,
    # 2010 at 256) and, with many adapters, share each adapter's bytes among more requests.
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_queue: int = 4096
    # Admission may let a request whose adapter is already in the batch (or resident) go ahead of
    # earlier ones, at most this many times per request (scheduler.py); 0: first come first served.
    affinity_bound: int = 32
    # Keep full KV pages for reuse by later requests with the same prefix and adapter
    # (memory/prefix_cache.py).
    prefix_caching: bool = True
    # Adapters.
    adapter_dir: str | None = None
    max_lora_rank: int = 64
    host_cache_bytes: int = 4 << 30
    preload_adapters: bool = False  # parse adapters into host RAM at start-up, while they fit
    max_upload_bytes: int = 512 << 20
    tp: int = 1  # tensor-parallel ranks: worker processes started by slserve (tp.py)
    tp_timeout: float = 60.0  # a tensor-parallel step that takes longer means a hung worker
    kernel_backend: str = "auto"  # auto | torch | triton
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    cpu_extension: bool = True  # the C++ LoRA loop on CPUs (falls back to Python if it cannot build)
    # Server stop: how long SIGTERM waits for requests in flight before ending them with an error.
    drain_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", auto_dtype(self.device))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or None for none), "
                             f"got {self.quantization!r}")
        if self.page_tokens < 1:
            raise ValueError("page_tokens must be >= 1")
        if self.pool_bytes <= 0:
            raise ValueError("pool_bytes must be positive")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.affinity_bound < 0:
            raise ValueError("affinity_bound must be >= 0")
        if self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be >= 1")
        if self.host_cache_bytes <= 0:
            raise ValueError("host_cache_bytes must be positive")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.tp < 1:
            raise ValueError("tp must be >= 1")
        if not 0 < self.tp_timeout < float("inf"):
            raise ValueError("tp_timeout must be a positive number of seconds")
        if not 0 <= self.drain_timeout < float("inf"):
            raise ValueError("drain_timeout must be a finite number of seconds >= 0")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError("kernel_backend must be auto, torch or triton")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def adapter_path(self) -> Path:
        return Path(self.adapter_dir) if self.adapter_dir else default_cache_dir() / "adapters"
