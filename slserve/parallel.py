"""Tensor parallelism: which slice of every weight, head and page a rank holds, and its collectives.

Megatron-style split of a Llama-family decoder over N ranks:

    column-parallel (split the output): q, k, v, gate, up     no communication
    row-parallel    (split the input):  o, down               one all-reduce of [T, hidden] each
    vocabulary-parallel:                embedding, lm_head    one all-reduce of [T, hidden];
                                                              a gather of [R, vocab / N] to rank 0

Attention heads and KV heads are split by rank (KV heads replicated when there are fewer than
ranks), so each rank's KV pages hold its own heads: the same page ids on every rank, each page a
rank's slice. LoRA follows the base split the S-LoRA way, so that it adds only rank-sized traffic:

    column-parallel module: A whole on every rank, B^T split by output columns     no traffic
    row-parallel module:    A split by input columns (partial x_i A_i^T), one all-reduce of the
                            [T, r] shrink, B^T split by output columns, added into the rank's
                            columns of the base output before the base all-reduce sums them

One table, `module_ranges`, names the slice of every module's input and output a rank holds; the
base weights, the LoRA weights and the adapter page layout are all cut by it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slserve.config import ModelConfig

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


class TPConfigError(ValueError):
    """A model that cannot be split over the requested number of ranks."""


def tp_problems(cfg: ModelConfig, size: int) -> list[str]:
    """Why `cfg` cannot be split over `size` ranks (empty when it can)."""
    problems = []
    if cfg.num_heads % size:
        problems.append(f"{cfg.num_heads} attention heads")
    kvh = cfg.num_kv_heads
    if kvh % size and size % kvh:
        problems.append(f"{kvh} KV heads (neither divides the other)")
    if cfg.intermediate_size % size:
        problems.append(f"intermediate size {cfg.intermediate_size}")
    if cfg.hidden_size % size:
        problems.append(f"hidden size {cfg.hidden_size}")
    return problems


def check_tp(cfg: ModelConfig, size: int) -> None:
    problems = tp_problems(cfg, size)
    if problems:
        works = [n for n in range(1, cfg.num_heads + 1) if not tp_problems(cfg, n)]
        raise TPConfigError(
            f"tensor parallel size {size} does not divide this model's {', '.join(problems)}; "
            f"sizes that work: {', '.join(map(str, works))}"
        )


@dataclass(frozen=True)
class Shard:
    """This process's place in the tensor-parallel group and the slices it holds."""

    rank: int = 0
    size: int = 1

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The model as one rank sees it: its heads, KV heads and intermediate columns."""
        return dataclasses.replace(
            cfg,
            num_heads=cfg.num_heads // self.size,
            num_kv_heads=max(1, cfg.num_kv_heads // self.size),
            intermediate_size=cfg.intermediate_size // self.size,
        )

    def _even(self, total: int) -> range:
        n = total // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    def kv_heads(self, cfg: ModelConfig) -> range:
        if cfg.num_kv_heads >= self.size:
            return self._even(cfg.num_kv_heads)
        head = self.rank * cfg.num_kv_heads // self.size  # replicated: ranks share a head
        return range(head, head + 1)

    def vocab(self, cfg: ModelConfig) -> range:
        """This rank's rows of the embedding and lm_head (the last rank's may be shorter)."""
        n = -(-cfg.vocab_size // self.size)
        return range(min(self.rank * n, cfg.vocab_size), min((self.rank + 1) * n, cfg.vocab_size))

    def module_ranges(self, cfg: ModelConfig) -> dict[str, tuple[range, range]]:
        """(input range, output range) of every LoRA target module that this rank holds.

        The base weight of a column-parallel module is cut by its output range and that of a
        row-parallel one by its input range (its output is summed over ranks); a LoRA pair is cut
        by both: A [r, in] by the input range, B [out, r] by the output range."""
        d = cfg.head_dim
        heads = self._even(cfg.num_heads)
        kv = self.kv_heads(cfg)
        q = range(heads.start * d, heads.stop * d)
        kv_cols = range(kv.start * d, kv.stop * d)
        inter = self._even(cfg.intermediate_size)
        hidden_all = range(cfg.hidden_size)
        hidden = self._even(cfg.hidden_size)
        return {
            "q_proj": (hidden_all, q),
            "k_proj": (hidden_all, kv_cols),
            "v_proj": (hidden_all, kv_cols),
            "o_proj": (q, hidden),
            "gate_proj": (hidden_all, inter),
            "up_proj": (hidden_all, inter),
            "down_proj": (inter, hidden),
        }

    def lora_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
        """(in, out) of every module's LoRA pair on this rank: the adapter page layout."""
        return {m: (len(i), len(o)) for m, (i, o) in self.module_ranges(cfg).items()}

    def hidden_columns(self, cfg: ModelConfig) -> range:
        """The columns of a row-parallel output that this rank's LoRA expand writes."""
        return self._even(cfg.hidden_size)


def base_weight_slice(key: str, cfg: ModelConfig, shard: Shard) -> tuple[int, range] | None:
    """(dimension, range) of a checkpoint tensor this rank reads, or None for the whole tensor."""
    if not shard.parallel:
        return None
    if key in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0, shard.vocab(cfg)
    parts = key.split(".")
    if len(parts) < 2 or parts[-2] not in shard.module_ranges(cfg):
        return None
    module, kind = parts[-2], parts[-1]
    in_range, out_range = shard.module_ranges(cfg)[module]
    if module in COLUMN_PARALLEL:
        return 0, out_range  # weight [out, in] and bias [out]
    if kind == "weight":
        return 1, in_range
    return None  # a row-parallel bias is added once, after the sum: see model/llama.py


def lora_slice(module: str, a: torch.Tensor, b: torch.Tensor, ranges: dict[str, tuple[range, range]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's views of a LoRA pair: A [r, in] cut by the input range, B [out, r] by the output."""
    in_range, out_range = ranges[module]
    if len(in_range) != a.shape[1]:
        a = a[:, in_range.start : in_range.stop]
    if len(out_range) != b.shape[0]:
        b = b[out_range.start : out_range.stop]
    return a, b


def output_scale_slice(module: str, v: torch.Tensor, ranges: dict[str, tuple[range, range]]) -> torch.Tensor:
    """This rank's view of a module's per-column output scale (or shift): its output columns for a
    column-parallel module; the whole vector for a row-parallel one, whose every rank scales its
    partial sum of all columns before the all-reduce adds them (a scale of the sum is the sum of
    the scaled parts)."""
    if module in ROW_PARALLEL:
        return v
    _, out_range = ranges[module]
    return v[out_range.start : out_range.stop]


class Collectives:
    """The two collectives of a step, as no-ops on one rank. NCCL on CUDA, gloo on CPU."""

    def __init__(self, shard: Shard):
        self.shard = shard

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.shard.parallel:
            dist.all_reduce(t)
        return t

    def gather_vocab(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Every rank's [R, vocab slice] of logits, joined on rank 0 (None elsewhere)."""
        if not self.shard.parallel:
            return local
        if local.shape[0] == 0:  # every rank runs the same plan: all skip together
            return local.new_zeros(0, vocab_size) if self.shard.rank == 0 else None
        width = -(-vocab_size // self.shard.size)
        if local.shape[1] < width:  # the last rank's slice is padded to the common width
            local = torch.cat([local, local.new_zeros(local.shape[0], width - local.shape[1])], dim=1)
        parts = [torch.empty_like(local) for _ in range(self.shard.size)] if self.shard.rank == 0 else None
        dist.gather(local.contiguous(), parts, dst=0)
        if self.shard.rank != 0:
            return None
        return torch.cat(parts, dim=1)[:, :vocab_size]
