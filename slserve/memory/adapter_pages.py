"""The device tier's books (rank 0): which adapters are resident, where, pinned by whom, LRU.

No tensors here. Placing an adapter reserves runs of consecutive pool pages and lays its weights
out in them (adapter_layout.py); the copy itself is a command, `AdapterLoad`, that the step plan
carries to every rank's model runner, which writes its slice of the weights at those offsets.
Freeing is `AdapterFree`. Layer blocks are packed into as few runs of consecutive pages as the
free space allows, so a block is always contiguous and every matrix is one range of the pool.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from slserve.adapters.peft_format import LoRAAdapter
from slserve.config import ModelConfig
from slserve.memory.adapter_layout import (
    FINAL_NORM,
    AdapterLayout,
    extras_elems,
    group_columns,
    lay_out,
    lay_out_extras,
    layer_elems,
)
from slserve.memory.pool import Owner, PagePool, background_executor
from slserve.memory.prefix_cache import PrefixCache
from slserve.parallel import ROW_PARALLEL
from slserve.plan import AdapterCommand, AdapterFree, AdapterLoad

logger = logging.getLogger(__name__)


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
    slot: int  # this residency's id in step plans (never reused)
    runs: list[tuple[int, int]]  # (first page, page count)
    layout: AdapterLayout
    num_pages: int
    generation: int = 0
    pins: int = 0
    stale: bool = False  # replaced, deleted or a private old version: freed once the last user lets go

    @functools.cached_property
    def weight_elems(self) -> int:
        """Pool elements of its weights (this rank's share), without page rounding."""
        return sum(s.rank * (s.in_features + s.out_features) for s in self.layout.slots)

    @property
    def version(self) -> AdapterVersion:
        return AdapterVersion(self.adapter, self.generation)

    @property
    def prefix_pages(self) -> tuple[int, ...]:
        """KV pages holding its prefix keys and values (prefix tuning), shared by its requests."""
        return self.layout.extras.prefix_pages


@dataclass
class AdapterPageStats:
    loads: int = 0
    evictions: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    misses: int = 0


class DeviceAdapterCache:
    """Resident adapters by name (LRU order), plus stale ones still pinned by running requests.

    `model` is a rank's config and `shapes` its LoRA shapes (parallel.py: Shard.local_config,
    Shard.lora_shapes; the whole model by default). `executor` runs host loads (default: one
    worker thread); `on_host(name)` tells whether `get_host(name)` answers without reading and
    parsing files (default: always). Every placement and release appends a command to
    `commands`, which the engine hands to the model runners with the next step
    (`take_commands`). `page_tokens`: the KV page's tokens, for prefix K/V pages. `spare`: the
    prefix cache, whose unreferenced pages go before any idle adapter when a placement needs room."""

    def __init__(
        self,
        pool: PagePool,
        model: ModelConfig,
        get_host: Callable[[str], LoRAAdapter],
        executor: Executor | None = None,
        shapes: dict[str, tuple[int, int]] | None = None,
        on_host: Callable[[str], bool] | None = None,
        page_tokens: int = 16,
        spare: PrefixCache | None = None,
    ):
        self.pool = pool
        self.model = model
        self.shapes = shapes or model.module_shapes()
        self.page_tokens = page_tokens
        self.get_host = get_host
        self.on_host = on_host or (lambda name: True)
        self.spare = spare
        self.commands: list[AdapterCommand] = []
        self._slots = itertools.count(1)
        self.resident: OrderedDict[str, DeviceAdapter] = OrderedDict()
        self.stale: list[DeviceAdapter] = []
        self.stats = AdapterPageStats()
        self._prefetched: set[str] = set()
        self._columns = group_columns(model)
        # An output scale covers the module's columns of the rank's output: all hidden columns
        # of a row-parallel module (parallel.py: output_scale_slice).
        self._widths = {m: model.hidden_size if m in ROW_PARALLEL else out
                        for m, (_, out) in self.shapes.items()}
        self._loader = executor or background_executor("slserve-adapter-load")
        self._host_loading: dict[str, tuple[Future, int]] = {}  # name -> (host load, generation)
        self._generation: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- sizes -------------------------------------------------------------------------------
    def _layer_ranks(self, adapter: LoRAAdapter) -> list[dict[str, int]]:
        ranks: list[dict[str, int]] = [{} for _ in range(self.model.num_layers)]
        for (layer, module), w in adapter.modules.items():
            ranks[layer][module] = w.a.shape[0]
        return ranks

    def _layer_scales(self, adapter: LoRAAdapter) -> list[dict[str, int]]:
        """layer -> module -> vectors of its output scale (2 with a shift)."""
        scales: list[dict[str, int]] = [{} for _ in range(self.model.num_layers)]
        for (layer, module), s in adapter.output_scales.items():
            scales[layer][module] = 1 if s.shift is None else 2
        return scales

    @staticmethod
    def _norm_keys(adapter: LoRAAdapter) -> list[tuple[int, str]]:
        return sorted(adapter.norms) + ([FINAL_NORM] if adapter.final_norm is not None else [])

    def _sizes(self, adapter: LoRAAdapter) -> list[int]:
        """Pool elements of each layer block, then of the extras block when there is one."""
        sizes = [layer_elems(r, self.shapes, s, self._widths)
                 for r, s in zip(self._layer_ranks(adapter), self._layer_scales(adapter), strict=True)]
        n = adapter.virtual_tokens.shape[0] if adapter.virtual_tokens is not None else 0
        extras = extras_elems(n, len(self._norm_keys(adapter)), self.model.hidden_size)
        return sizes + [extras] if extras else sizes

    def prefix_pages_needed(self, adapter: LoRAAdapter) -> int:
        """Whole KV pages of its prefix keys and values (0 without one)."""
        n = 0 if adapter.prefix_kv is None else adapter.prefix_kv.shape[2]
        return -(-n // self.page_tokens)

    def pages_needed(self, adapter: LoRAAdapter) -> int:
        """Pages the adapter takes if its weights get one run (the usual case), prefix pages included."""
        weights = -(-sum(self._sizes(adapter)) // self.pool.page_elems)
        prefix = self.prefix_pages_needed(adapter)
        return weights + prefix if prefix else max(1, weights)

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
        self.invalidate_copy(name)

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

    def _available(self) -> int:
        """Free pages plus the cached prefix pages nobody references (evicted on demand)."""
        return self.pool.num_free + (self.spare.idle_pages if self.spare is not None else 0)

    def _evict_one(self) -> bool:
        """Free one unreferenced cached prefix page, or else one idle adapter; False if neither."""
        if self.spare is not None and self.spare.evict(1):
            return True
        return self.evict_idle(1) > 0

    def idle_pages(self) -> int:
        return sum(d.num_pages for d in self.resident.values() if d.pins == 0)

    def _start_host_load(self, name: str) -> None:
        self._host_loading[name] = (self._loader.submit(self.get_host, name), self.generation(name))

    def ready(self, name: str) -> bool:
        """Whether acquiring `name` reads no files on this thread: resident, or parsed on the
        host. If not, its host load starts in the background (admission waits for it)."""
        if name in self.resident or self.on_host(name):
            return True
        loading = self._host_loading.get(name)
        if loading is None:
            self._start_host_load(name)
            return False
        if loading[0].done():  # failed, or parsed and already evicted from the host again:
            del self._host_loading[name]  # acquire raises the error, or parses it once more
            return True
        return False

    def prefetch(self, names: list[str], keep_free_pages: int) -> None:
        """Warm the host tier for queued requests, and copy host-ready adapters into free pages
        (never evicting) while the current step runs."""
        for name in names:
            if name in self.resident:
                continue
            loading = self._host_loading.get(name)
            if loading is None:
                self._start_host_load(name)
                continue
            fut, generation = loading
            if not fut.done():
                continue
            del self._host_loading[name]
            if fut.exception() is not None or generation != self.generation(name):
                continue  # admission surfaces the error; a load begun before a replace is stale
            adapter = fut.result()
            if self._available() - self.pages_needed(adapter) < keep_free_pages:
                continue
            if self._load(adapter, 0, may_evict=False, background=True) is not None:
                self._prefetched.add(name)
                self.stats.prefetches += 1

    def take_commands(self) -> list[AdapterCommand]:
        """The loads and frees since the last call, in order, for the next step plan."""
        commands, self.commands = self.commands, []
        return commands

    def discard(self, slots: set[int]) -> None:
        """Forget the device copies with these slot ids (a failed step may have left them
        unwritten): new requests load them again; pinned ones go once their users let go."""
        for name, dev in list(self.resident.items()):
            if dev.slot in slots:
                self.invalidate_copy(name)

    def invalidate_copy(self, name: str) -> None:
        dev = self.resident.pop(name, None)
        if dev is None:
            return
        self._prefetched.discard(name)
        if dev.pins:
            dev.stale = True
            self.stale.append(dev)
        else:
            self._free(dev)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # -- placement ---------------------------------------------------------------------------
    def _load(
        self,
        adapter: LoRAAdapter,
        reserve_pages: int,
        may_evict: bool,
        background: bool = False,
        private: bool = False,
    ) -> DeviceAdapter | None:
        sizes = self._sizes(adapter)
        need = self.pages_needed(adapter)
        if self.pool.num_free < need + reserve_pages and self.spare is not None:
            self.spare.evict(need + reserve_pages - self.pool.num_free)
        if self.pool.num_free < need + reserve_pages:
            if not may_evict:
                return None
            self.evict_idle(need + reserve_pages - self.pool.num_free)
            if self.pool.num_free < need + reserve_pages:
                return None
        runs = self._place(sizes)
        while runs is None and may_evict and self._evict_one():
            # Enough pages but too scattered: evicting more merges free runs.
            runs = self._place(sizes)
        if runs is None:
            return None
        layer_offsets, runs = runs
        prefix_pages = self._alloc_prefix(adapter, runs)
        if prefix_pages is None:
            return None
        layout = self._lay_out(adapter, layer_offsets, prefix_pages)
        dev = DeviceAdapter(name=adapter.name, adapter=adapter, slot=next(self._slots), runs=runs,
                            layout=layout, num_pages=sum(n for _, n in runs) + len(prefix_pages),
                            generation=self.generation(adapter.name))
        self.commands.append(AdapterLoad(dev.slot, layout, adapter, background))
        if private:
            dev.stale = True
            self.stale.append(dev)
        else:
            self.resident[adapter.name] = dev
        self.stats.loads += 1
        return dev

    def _alloc_prefix(self, adapter: LoRAAdapter, runs: list[tuple[int, int]]) -> tuple[int, ...] | None:
        """KV pages for the adapter's prefix (anywhere: they are read through block tables); None,
        with its runs given back, when the packing of its weights left too few pages."""
        n = self.prefix_pages_needed(adapter)
        if n > self.pool.num_free:
            for start, count in runs:
                self.pool.free_run(start, count, Owner.ADAPTER)
            return None
        return tuple(self.pool.alloc(n, Owner.ADAPTER))

    def _lay_out(self, adapter: LoRAAdapter, offsets: list[int],
                 prefix_pages: tuple[int, ...]) -> AdapterLayout:
        layers = self.model.num_layers
        layout = lay_out(self._layer_ranks(adapter), self.shapes, self._columns, offsets[:layers],
                         self._layer_scales(adapter), self._widths, bool(adapter.config.get("use_rslora")))
        n = adapter.virtual_tokens.shape[0] if adapter.virtual_tokens is not None else 0
        extras = lay_out_extras(n, self._norm_keys(adapter), self.model.hidden_size,
                                offsets[layers] if len(offsets) > layers else -1, prefix_pages,
                                0 if adapter.prefix_kv is None else adapter.prefix_kv.shape[2])
        return dataclasses.replace(layout, extras=extras)

    def _place(self, sizes: list[int]) -> tuple[list[int], list[tuple[int, int]]] | None:
        """Pack consecutive blocks into runs: one run if possible, else the largest free runs
        first. Returns (element offset of each block, runs) or None; no runs for no elements (an
        adapter of prefix pages alone)."""
        pe = self.pool.page_elems
        total = sum(sizes)
        if total == 0:
            return [0] * len(sizes), []
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

    def _free(self, dev: DeviceAdapter) -> None:
        self.commands.append(AdapterFree(dev.slot))
        for start, n in dev.runs:
            self.pool.free_run(start, n, Owner.ADAPTER)
        self.pool.free(list(dev.prefix_pages), Owner.ADAPTER)
        dev.runs = []
        extras = dataclasses.replace(dev.layout.extras, prefix_pages=())
        dev.layout = dataclasses.replace(dev.layout, extras=extras)

    def owned_pages(self) -> list[int]:
        """Every page held by a resident or stale adapter (for invariant checks)."""
        return [p for d in (*self.resident.values(), *self.stale)
                for p in (*(q for s, n in d.runs for q in range(s, s + n)), *d.prefix_pages)]

    def snapshot(self) -> dict[str, int]:
        return {
            "device_count": len(self.resident),
            "device_pages": sum(d.num_pages for d in self.resident.values()),
            "device_bytes": sum(d.num_pages for d in self.resident.values()) * self.pool.page_elems
            * self.pool.itemsize,
            "device_pinned": sum(1 for d in self.resident.values() if d.pins),
            "prefix_pages": sum(len(d.prefix_pages) for d in (*self.resident.values(), *self.stale)),
            "loads": self.stats.loads,
            "evictions": self.stats.evictions,
            "prefetches": self.stats.prefetches,
            "prefetch_hits": self.stats.prefetch_hits,
            "misses": self.stats.misses,
        }
