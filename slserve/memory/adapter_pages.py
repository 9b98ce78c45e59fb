"""The device tier: adapter weights as pages of the unified pool, pinned while used, evicted LRU.

Layout of one adapter in the pool. Each layer's weights form one contiguous block:

    A_qkv  [rq + rk + rv, hidden]   the q, k, v A matrices stacked: one shrink feeds three expands
    A_o    [ro, q_size]
    A_gu   [rg + ru, hidden]        gate and up stacked likewise
    A_down [rd, intermediate]
    B^T_q [rq, q_size]  B^T_k [rk, kv_size]  B^T_v [rv, kv_size]  B^T_o [ro, hidden]
    B^T_gate [rg, intermediate]  B^T_up [ru, intermediate]  B^T_down [rd, hidden]

(absent modules take no room; B^T already carries the module's scale). Layer blocks are packed
into as few runs of consecutive pages as the free space allows, so a block is always contiguous
and every matrix is one range of the pool; nothing is padded to a maximum rank. Where each
matrix sits is written once per residency into the adapter's slot table (kernels/lora.py), which
the LoRA op reads directly.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from slserve.adapters.peft_format import LoRAAdapter
from slserve.config import ModelConfig
from slserve.kernels.lora import SLOT_FIELDS, slot_row
from slserve.memory.pool import Owner, PagePool

logger = logging.getLogger(__name__)

# group -> the modules it fuses, in the column order of the fused base projection
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


def group_columns(model: ModelConfig) -> dict[str, int]:
    """Column offset of each module inside its group's fused output."""
    q, kv, inter = model.q_size, model.kv_size, model.intermediate_size
    return {"q_proj": 0, "k_proj": q, "v_proj": q + kv, "o_proj": 0,
            "gate_proj": 0, "up_proj": inter, "down_proj": 0}


@dataclass
class LayerSlot:
    """Where one (layer, group) of an adapter sits: offsets into pool.flat, for kernels."""

    a_off: int
    rank: int  # rows of the stacked A
    expands: list[tuple[str, int, int, int]]  # (module, b_off, h0, r)


@dataclass(frozen=True)
class AdapterVersion:
    """The weights a request was first admitted with: after a delete or a replace, a preempted
    request gets exactly these back. `generation` counts the name's invalidations."""

    adapter: LoRAAdapter
    generation: int


@dataclass(eq=False)
class DeviceAdapter:
    name: str
    adapter: LoRAAdapter
    runs: list[tuple[int, int]]  # (first page, page count)
    slots: list[dict[str, LayerSlot]]  # per layer
    table: torch.Tensor  # int64 [layers, len(GROUPS), SLOT_FIELDS]: the same, for the LoRA op
    num_pages: int
    generation: int = 0
    pins: int = 0
    stale: bool = False  # replaced, deleted or a private old version: freed once the last user lets go
    ready: Future | None = None

    @property
    def version(self) -> AdapterVersion:
        return AdapterVersion(self.adapter, self.generation)


@dataclass
class AdapterPageStats:
    loads: int = 0
    evictions: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    misses: int = 0


class DeviceAdapterCache:
    """Resident adapters by name (LRU order), plus stale ones still pinned by running requests.

    `executor` runs host loads and background copies (default: one worker thread)."""

    def __init__(
        self,
        pool: PagePool,
        model: ModelConfig,
        get_host: Callable[[str], LoRAAdapter],
        executor: Executor | None = None,
    ):
        self.pool = pool
        self.model = model
        self.get_host = get_host
        self.resident: OrderedDict[str, DeviceAdapter] = OrderedDict()
        self.stale: list[DeviceAdapter] = []
        self.stats = AdapterPageStats()
        self._prefetched: set[str] = set()
        self._columns = group_columns(model)
        self._copier = executor or ThreadPoolExecutor(max_workers=1,
                                                      thread_name_prefix="slserve-adapter-copy")
        self._host_loading: dict[str, tuple[Future, int]] = {}  # name -> (host load, generation)
        self._generation: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- sizes -------------------------------------------------------------------------------
    def _layer_elems(self, adapter: LoRAAdapter, layer: int) -> int:
        total = 0
        for (lyr, _module), w in adapter.modules.items():
            if lyr == layer:
                total += w.a.numel() + w.b.numel()
        return total

    def pages_needed(self, adapter: LoRAAdapter) -> int:
        """Pages the adapter takes if it gets one run (the usual case)."""
        elems = sum(self._layer_elems(adapter, layer) for layer in range(self.model.num_layers))
        return max(1, -(-elems // self.pool.page_elems))

    # -- residency ---------------------------------------------------------------------------
    def generation(self, name: str) -> int:
        return self._generation.get(name, 0)

    def acquire(
        self, name: str, reserve_pages: int = 0, version: AdapterVersion | None = None
    ) -> DeviceAdapter | None:
        """Make `name` resident and pin it; None when it cannot fit now without preempting.

        `version`: the weights the request was first admitted with. If the name was deleted or
        replaced since, those weights are pinned again: a still-pinned stale copy, or else a
        private copy that no other request sees and that is freed with its last pin.
        Without a version, raises whatever the host tier raises for an adapter that is gone or
        unreadable.
        """
        current = version is None or version.generation == self.generation(name)
        dev = self.resident.get(name) if current else self._stale_copy(version.adapter)
        if dev is None:
            self.stats.misses += 1
            # A known version needs no host lookup: the name may be gone from the store already.
            adapter = version.adapter if version is not None else self.get_host(name)
            dev = self._load(adapter, reserve_pages, may_evict=True, private=not current)
            if dev is None:
                return None
            if not current:
                dev.generation = version.generation
        elif current and name in self._prefetched:
            self.stats.prefetch_hits += 1
        if dev.ready is not None:
            dev.ready.result()
            dev.ready = None
        if current:
            self._prefetched.discard(name)
            self.resident.move_to_end(name)
        dev.pins += 1
        return dev

    def _stale_copy(self, adapter: LoRAAdapter) -> DeviceAdapter | None:
        return next((d for d in self.stale if d.adapter is adapter), None)

    def release(self, dev: DeviceAdapter) -> None:
        dev.pins -= 1
        if dev.pins == 0 and dev.stale:
            self.stale.remove(dev)
            self._free(dev)

    def invalidate(self, name: str) -> None:
        """The adapter was replaced or deleted: new requests must not see the old weights."""
        self._generation[name] = self.generation(name) + 1
        self._prefetched.discard(name)
        self._host_loading.pop(name, None)
        dev = self.resident.pop(name, None)
        if dev is None:
            return
        if dev.pins:
            dev.stale = True
            self.stale.append(dev)
        else:
            self._free(dev)

    def evict_idle(self, pages: int) -> int:
        """Evict unpinned adapters, least recently used first, until `pages` are freed."""
        freed = 0
        for name in list(self.resident):
            if freed >= pages:
                break
            dev = self.resident[name]
            if dev.pins == 0:
                del self.resident[name]
                self._prefetched.discard(name)
                self._free(dev)
                freed += dev.num_pages
                self.stats.evictions += 1
        return freed

    def idle_pages(self) -> int:
        return sum(d.num_pages for d in self.resident.values() if d.pins == 0)

    def prefetch(self, names: list[str], keep_free_pages: int) -> None:
        """Warm the host tier for queued requests, and copy host-ready adapters into free pages
        (never evicting) while the current step runs."""
        for name in names:
            if name in self.resident:
                continue
            loading = self._host_loading.get(name)
            if loading is None:
                self._host_loading[name] = (self._copier.submit(self.get_host, name), self.generation(name))
                continue
            fut, generation = loading
            if not fut.done():
                continue
            del self._host_loading[name]
            if fut.exception() is not None or generation != self.generation(name):
                continue  # admission surfaces the error; a load begun before a replace is stale
            adapter = fut.result()
            if self.pool.num_free - self.pages_needed(adapter) < keep_free_pages:
                continue
            if self._load(adapter, 0, may_evict=False, background=True) is not None:
                self._prefetched.add(name)
                self.stats.prefetches += 1

    def close(self) -> None:
        self._copier.shutdown(wait=False, cancel_futures=True)

    # -- placement ---------------------------------------------------------------------------
    def _load(
        self,
        adapter: LoRAAdapter,
        reserve_pages: int,
        may_evict: bool,
        background: bool = False,
        private: bool = False,
    ) -> DeviceAdapter | None:
        sizes = [self._layer_elems(adapter, layer) for layer in range(self.model.num_layers)]
        need = self.pages_needed(adapter)
        if self.pool.num_free < need + reserve_pages:
            if not may_evict:
                return None
            self.evict_idle(need + reserve_pages - self.pool.num_free)
            if self.pool.num_free < need + reserve_pages:
                return None
        runs = self._place(sizes)
        while runs is None and may_evict and self.idle_pages() > 0:
            # Enough pages but too scattered: evicting more idle adapters merges free runs.
            self.evict_idle(1)
            runs = self._place(sizes)
        if runs is None:
            return None
        layer_offsets, runs = runs
        dev = self._build(adapter, runs, layer_offsets)
        dev.generation = self.generation(adapter.name)
        try:
            if background:
                dev.ready = self._copier.submit(self._copy, dev)
            else:
                self._copy(dev)
        except BaseException:
            self._free(dev)
            raise
        if private:
            dev.stale = True
            self.stale.append(dev)
        else:
            self.resident[adapter.name] = dev
        self.stats.loads += 1
        return dev

    def _place(self, sizes: list[int]) -> tuple[list[int], list[tuple[int, int]]] | None:
        """Pack consecutive layer blocks into runs: one run if possible, else the largest free runs
        first. Returns (element offset of each layer block, runs) or None."""
        pe = self.pool.page_elems
        total = sum(sizes)
        start = self.pool.alloc_run(max(1, -(-total // pe)))
        if start is not None:
            offsets, off = [], start * pe
            for s in sizes:
                offsets.append(off)
                off += s
            return offsets, [(start, max(1, -(-total // pe)))]
        runs: list[tuple[int, int]] = []
        offsets: list[int] = []
        layer = 0
        free_runs = sorted(self.pool.free_runs(), key=lambda r: -r[1])
        for run_start, run_len in free_runs:
            if layer == len(sizes):
                break
            capacity, used, first = run_len * pe, 0, layer
            while layer < len(sizes) and used + sizes[layer] <= capacity:
                offsets.append(run_start * pe + used)
                used += sizes[layer]
                layer += 1
            if layer > first:
                n = max(1, -(-used // pe))
                got = self.pool.alloc_run(n)  # the lowest run that fits; may differ from run_start
                assert got is not None
                shift = (got - run_start) * pe
                offsets[first:] = [o + shift for o in offsets[first:]]
                runs.append((got, n))
                free_runs = sorted(self.pool.free_runs(), key=lambda r: -r[1])
        if layer < len(sizes):
            for s, n in runs:
                self.pool.free_run(s, n, Owner.ADAPTER)
            return None
        return offsets, runs

    def _build(self, adapter: LoRAAdapter, runs, layer_offsets: list[int]) -> DeviceAdapter:
        m = self.model
        shapes = m.module_shapes()
        slots: list[dict[str, LayerSlot]] = []
        for layer in range(m.num_layers):
            off = layer_offsets[layer]
            layer_slots: dict[str, LayerSlot] = {}
            a_offs: dict[str, int] = {}
            for group, modules in GROUPS.items():
                present = [mod for mod in modules if (layer, mod) in adapter.modules]
                if not present:
                    continue
                a_offs[group] = off
                rank = 0
                for mod in present:
                    r = adapter.modules[(layer, mod)].a.shape[0]
                    off += r * shapes[mod][0]
                    rank += r
                layer_slots[group] = LayerSlot(a_off=a_offs[group], rank=rank, expands=[])
            for group, modules in GROUPS.items():
                h0 = 0
                for mod in modules:
                    w = adapter.modules.get((layer, mod))
                    if w is None:
                        continue
                    r = w.a.shape[0]
                    layer_slots[group].expands.append((mod, off, h0, r))
                    off += r * shapes[mod][1]
                    h0 += r
            slots.append(layer_slots)
        return DeviceAdapter(
            name=adapter.name, adapter=adapter, runs=runs, slots=slots, table=self._table(slots),
            num_pages=sum(n for _, n in runs),
        )

    def _table(self, slots: list[dict[str, LayerSlot]]) -> torch.Tensor:
        shapes = self.model.module_shapes()
        rows = []
        for layer_slots in slots:
            for group, modules in GROUPS.items():
                slot = layer_slots.get(group)
                if slot is None:  # rank 0: the adapter leaves this group alone
                    rows.append(slot_row(0, 0, 0, []))
                    continue
                expands = [(b_off, r, shapes[mod][1], h0, self._columns[mod])
                           for mod, b_off, h0, r in slot.expands]
                rows.append(slot_row(slot.a_off, slot.rank, shapes[modules[0]][0], expands))
        return torch.tensor(rows, dtype=torch.int64).view(len(slots), len(GROUPS), SLOT_FIELDS)

    def _copy(self, dev: DeviceAdapter) -> None:
        """Write the host weights into the adapter's pages (scale folded into B^T)."""
        flat, shapes = self.pool.flat, self.model.module_shapes()
        for layer, layer_slots in enumerate(dev.slots):
            for slot in layer_slots.values():
                row = slot.a_off
                for mod, _b_off, _h0, r in slot.expands:
                    w = dev.adapter.modules[(layer, mod)]
                    n = r * shapes[mod][0]
                    flat[row : row + n].copy_(w.a.reshape(-1))
                    row += n
                for mod, b_off, _h0, r in slot.expands:
                    w = dev.adapter.modules[(layer, mod)]
                    out = shapes[mod][1]
                    # Scale in float32, then one transposing, rounding copy into the pages.
                    flat[b_off : b_off + r * out].view(r, out).copy_((w.b * w.scale).t())

    def _free(self, dev: DeviceAdapter) -> None:
        if dev.ready is not None:
            # Its pages must not be reused while the copy still writes them; a failed copy
            # leaves nothing to keep.
            wait([dev.ready])
            dev.ready = None
        for start, n in dev.runs:
            self.pool.free_run(start, n, Owner.ADAPTER)
        dev.runs = []

    def owned_pages(self) -> list[int]:
        """Every page held by a resident or stale adapter (for invariant checks)."""
        return [p for d in (*self.resident.values(), *self.stale) for s, n in d.runs for p in range(s, s + n)]

    def snapshot(self) -> dict[str, int]:
        return {
            "device_count": len(self.resident),
            "device_pages": sum(d.num_pages for d in self.resident.values()),
            "device_bytes": sum(d.num_pages for d in self.resident.values()) * self.pool.page_elems
            * self.pool.data.element_size(),
            "device_pinned": sum(1 for d in self.resident.values() if d.pins),
            "loads": self.stats.loads,
            "evictions": self.stats.evictions,
            "prefetches": self.stats.prefetches,
            "prefetch_hits": self.stats.prefetch_hits,
            "misses": self.stats.misses,
        }
