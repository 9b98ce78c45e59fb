"""One model runner per rank: the model shard, the rank's pool storage and one backend.

Each step it applies the plan's adapter commands (writing its slice of each loaded adapter into
its pages), prepares the backend's tensors and runs the forward; rank 0 gets the logits back.
Under tensor parallelism ranks 1..N-1 run the same code in worker processes (tp.py); with one
rank the engine calls it in process.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from slserve.adapters.peft_format import LoRAAdapter
from slserve.backends import make_backend
from slserve.config import EngineConfig, ModelConfig
from slserve.kernels.cpu_ext import layer_ops
from slserve.memory.adapter_layout import FINAL_NORM, AdapterLayout, RankWeights, SlotView, write_adapter
from slserve.memory.kv_cache import KVCache, kv_page_elems
from slserve.memory.pool import allocate_storage, background_executor
from slserve.model.llama import LlamaModel
from slserve.model.loader import load_state_dict
from slserve.model.ops import TorchOps
from slserve.parallel import Collectives, Shard, lora_slice, output_scale_slice
from slserve.plan import AdapterCommand, AdapterFree, AdapterLoad, StepPlan

logger = logging.getLogger(__name__)

def rank_weights(adapter: LoRAAdapter, ranges: dict[str, tuple[range, range]],
                 copy: bool = False) -> RankWeights:
    """A rank's slices of every LoRA pair and output scale, its KV heads of a prefix, and the
    virtual tokens and saved norms whole: views, or contiguous copies to send to another process."""
    def own(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.contiguous() if copy and t is not None else t

    pairs = {}
    for (layer, module), w in adapter.modules.items():
        a, b = lora_slice(module, w.a, w.b, ranges)
        pairs[(layer, module)] = (own(a), own(b), w.scale)
    scales = {}
    for (layer, module), s in adapter.output_scales.items():
        shift = None if s.shift is None else own(output_scale_slice(module, s.shift, ranges))
        scales[(layer, module)] = (own(output_scale_slice(module, s.vector, ranges)), shift)
    norms = dict(adapter.norms)
    if adapter.final_norm is not None:
        norms[FINAL_NORM] = adapter.final_norm
    prefix = adapter.prefix_kv
    if prefix is not None:  # [layers, 2, n, kv_heads, head_dim]: the rank's KV heads, as its KV pages
        kv, d = ranges["k_proj"][1], prefix.shape[-1]
        prefix = own(prefix[..., kv.start // d : kv.stop // d, :])
    return RankWeights(pairs, scales, adapter.virtual_tokens, norms, prefix)


def runner_device(config: EngineConfig, shard: Shard) -> torch.device:
    """One device per rank: cuda:<rank> under TP on GPUs."""
    device = torch.device(config.device)
    if device.type == "cuda" and shard.parallel:
        return torch.device("cuda", shard.rank)
    return device


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: Path, cfg: ModelConfig, shard: Shard,
                 num_pages: int):
        self.shard = shard
        self.device = device = runner_device(config, shard)
        self.comm = Collectives(shard)
        local = shard.local_config(cfg)
        dtype = config.torch_dtype
        use_cpu_ext = config.cpu_extension and device.type == "cpu"
        t0 = time.perf_counter()
        state = load_state_dict(model_path, dtype, cfg, shard, config.quantization)
        ops = layer_ops() if use_cpu_ext else TorchOps()
        self.model = LlamaModel(cfg, state, device, cfg.max_position_embeddings, ops, shard, self.comm)
        del state
        self.storage = allocate_storage(num_pages, kv_page_elems(local, config.page_tokens), dtype, device)
        self.flat = self.storage.view(-1)
        self.kv = KVCache(self.storage, local, config.page_tokens)
        # the pool as KV pages, for adapters' prefix pages: [pages, layers, 2, page_tokens, kv_heads, D]
        self.kv_pages = self.storage.view(num_pages, local.num_layers, 2, config.page_tokens,
                                          local.num_kv_heads, local.head_dim)
        self.backend = make_backend(config.kernel_backend, cfg, shard, self.comm, device, config.page_tokens,
                                    use_cpu_ext)
        self.ranges = shard.module_ranges(cfg)
        self.layouts: dict[int, AdapterLayout] = {}  # adapter slot -> where its weights sit
        self._views: dict[tuple[int, int], SlotView] = {}  # (slot, nested rank) -> its view, made once
        self._copies: dict[int, Future] = {}  # slot -> a background copy still writing its pages
        self._copier: ThreadPoolExecutor | None = None
        logger.debug("rank %d/%d: model shard loaded in %.1fs", shard.rank, shard.size,
                     time.perf_counter() - t0)

    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Apply the plan's adapter commands, then run its forward: logits [R, vocab] on rank 0."""
        self.apply(plan.adapter_commands)
        for seg in plan.segments:
            self._wait(seg.slot)
        for src, dst, slots in plan.kv_copies:  # a prefix's partial page into the request's first page
            self.kv_pages[dst, :, :, :slots].copy_(self.kv_pages[src, :, :, :slots])
        if not plan.input_ids:
            return None
        views = [self.view(seg.slot, seg.rank) for seg in plan.segments]
        ctx = self.backend.prepare(plan, self.kv, views, self.flat)
        return self.model(ctx, self.kv, self.backend)

    def apply(self, commands: list[AdapterCommand]) -> None:
        for cmd in commands:
            if isinstance(cmd, AdapterFree):
                self._wait(cmd.slot)  # its pages must not be reused while a copy still writes them
                self.layouts.pop(cmd.slot, None)
                self._views = {key: v for key, v in self._views.items() if key[0] != cmd.slot}
                continue
            assert isinstance(cmd, AdapterLoad)
            weights = cmd.weights if cmd.weights is not None else rank_weights(cmd.adapter, self.ranges)
            self.layouts[cmd.slot] = cmd.layout
            self._views[(cmd.slot, 0)] = cmd.layout.view()
            if cmd.background:  # a prefetch: copy while this step's forward runs
                if self._copier is None:
                    self._copier = background_executor("slserve-adapter-copy")
                self._copies[cmd.slot] = self._copier.submit(write_adapter, self.flat, cmd.layout, weights,
                                                             self.kv_pages)
            else:
                write_adapter(self.flat, cmd.layout, weights, self.kv_pages)

    def view(self, slot: int, rank: int) -> SlotView:
        """A resident adapter's view for segments asking for `rank` (0: its own ranks)."""
        key = (slot, rank)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self.layouts[slot].view(rank)
        return view

    def _wait(self, slot: int) -> None:
        copy = self._copies.pop(slot, None)
        if copy is not None:
            copy.result()

    def close(self) -> None:
        if self._copier is not None:
            self._copier.shutdown(wait=True, cancel_futures=True)
