"""The unified paged pool: one preallocated device region, one allocator, three kinds of owner.

Accounting and storage live apart. `PagePool` is the allocator: which page belongs to whom, on
rank 0 only, with no tensors. `allocate_storage` makes the region itself, `[num_pages,
page_elems]`, once per rank: under tensor parallelism every rank holds its slice of every page
(its KV heads, its part of each adapter), under the same page ids.

A page holds `page_tokens` tokens of K and V for every layer (see kv_cache.py), so a sequence
needs one page per `page_tokens` tokens whatever the layer count. Adapter weights take runs of
consecutive pages (see adapter_pages.py): a contiguous run lets the CPU path view an adapter's A
and B^T as ordinary matrices with no copy, and lets a kernel reach any row by offset.

KV pages are taken from the top of the region and adapter runs from the bottom, so the two
owners rarely interleave and long free runs survive for adapters. The third owner, the prefix
cache (prefix_cache.py), holds full KV pages for reuse: a page passes to it from a request's KV
(`transfer`), and goes back to the free list when the cache evicts it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum

import numpy as np
import torch

_MADV_HUGEPAGE = 14


class Owner(StrEnum):
    KV = "kv"
    ADAPTER = "adapter"
    PREFIX = "prefix"  # full KV pages kept for reuse by the prefix cache


class OutOfPages(RuntimeError):
    pass


class PoolCorrupted(RuntimeError):
    """The allocator's books disagree with what its owners hold: nothing built on them can be trusted."""


def _advise_huge_pages(t: torch.Tensor) -> None:
    """Ask Linux to back a host buffer with 2 MiB pages before it is first touched.

    Every decode step streams the resident adapters' weights and the KV pages in use out of this
    buffer; with 4 KiB pages that is a TLB miss every 4 KiB, and on the CPU path the adapter
    reads run about a fifth faster on huge pages. Transparent huge pages in their common
    `madvise` mode apply only where asked; elsewhere this is a no-op.
    """
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return
    huge = 1 << 21
    start = (t.data_ptr() + huge - 1) & ~(huge - 1)
    end = (t.data_ptr() + t.numel() * t.element_size()) & ~(huge - 1)
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)


def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs its intra-op threads on (already loaded with torch, so opening
    it by name returns that copy), or None."""
    for name in ("libgomp.so.1", "libiomp5.so", "libomp.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _one_intra_op_thread() -> None:
    """This thread's parallel regions run on one thread; every other thread keeps its own count.

    Not `torch.set_num_threads(1)`: besides this thread's count it stores a process-wide number
    that any thread then adopts the first time code in another library (our C++ helpers, say)
    starts a parallel region there, and the engine's thread did so after the adapter loader
    started, so every op of the engine ran on one core (a 256-row decode step with adapters took
    2x as long). OpenMP's own setting is per thread. torch's per-thread set-up runs first, since
    it would reset the setting the first time this thread asks for it."""
    torch.get_num_threads()
    runtime = _openmp_runtime()
    if runtime is not None:
        runtime.omp_set_num_threads(1)


def background_executor(name: str) -> ThreadPoolExecutor:
    """One worker thread for adapter work beside the engine (parsing, copies into the pool), its
    torch ops on one intra-op thread: a parallel op there would start a second team of threads on
    cores the engine's team already fills, and every engine op then waits for its slowest thread."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_one_intra_op_thread)


def allocate_storage(num_pages: int, page_elems: int, dtype: torch.dtype, device: torch.device | str
                     ) -> torch.Tensor:
    """One rank's pool region, zeroed: [num_pages, page_elems]."""
    data = torch.empty(num_pages, page_elems, dtype=dtype, device=device)
    _advise_huge_pages(data)
    return data.zero_()


class PagePool:
    """The allocator of the unified pool (rank 0): pages by owner, no tensors."""

    def __init__(self, num_pages: int, page_elems: int, itemsize: int):
        if num_pages < 1:
            raise ValueError("the pool needs at least one page")
        self.num_pages = num_pages
        self.page_elems = page_elems
        self.itemsize = itemsize
        self._free = np.ones(num_pages, dtype=bool)
        self._used = {owner: 0 for owner in Owner}

    @property
    def num_free(self) -> int:
        return self.num_pages - sum(self._used.values())

    def used(self, owner: Owner) -> int:
        return self._used[owner]

    def alloc(self, n: int, owner: Owner = Owner.KV) -> list[int]:
        """n pages anywhere, highest first."""
        if n == 0:
            return []
        free = np.flatnonzero(self._free)
        if len(free) < n:
            raise OutOfPages(f"need {n} pages, {len(free)} free")
        pages = free[-n:][::-1]
        self._free[pages] = False
        self._used[owner] += n
        return pages.tolist()

    def alloc_run(self, n: int, owner: Owner = Owner.ADAPTER) -> int | None:
        """The first run of n consecutive free pages (lowest address), or None if there is none."""
        starts = self.free_runs()
        for start, length in starts:
            if length >= n:
                self._free[start : start + n] = False
                self._used[owner] += n
                return start
        return None

    def free_runs(self) -> list[tuple[int, int]]:
        """(start, length) of every maximal run of free pages, in address order."""
        padded = np.concatenate(([False], self._free, [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(padded))
        return [(int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2], strict=True)]

    def free(self, pages: list[int], owner: Owner = Owner.KV) -> None:
        if not pages:
            return
        idx = np.asarray(pages, dtype=np.int64)
        if self._free[idx].any():
            raise RuntimeError("double free of a pool page")
        self._free[idx] = True
        self._used[owner] -= len(pages)

    def transfer(self, pages: list[int], source: Owner, target: Owner) -> None:
        """Pages in use change owner (a request's full KV page joins the prefix cache)."""
        if self._free[np.asarray(pages, dtype=np.int64)].any():
            raise RuntimeError("transfer of a free pool page")
        self._used[source] -= len(pages)
        self._used[target] += len(pages)

    def free_run(self, start: int, n: int, owner: Owner = Owner.ADAPTER) -> None:
        self.free(list(range(start, start + n)), owner)

    def check(self, owned: dict[Owner, list[int]]) -> None:
        """Raise PoolCorrupted unless the pages each owner says it holds are exactly the used pages:
        none held twice, none held but free, none used but held by nobody, counts by owner right."""
        problems = []
        held = np.zeros(self.num_pages, dtype=np.int64)
        for owner, pages in owned.items():
            idx = np.asarray(pages, dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= self.num_pages):
                problems.append(f"{owner} holds a page outside the pool")
                continue
            np.add.at(held, idx, 1)
            if len(pages) != self._used[owner]:
                problems.append(f"{owner} holds {len(pages)} pages, the allocator counts {self._used[owner]}")
        if (held > 1).any():
            problems.append(f"{int((held > 1).sum())} pages held twice")
        if (self._free & (held > 0)).any():
            problems.append(f"{int((self._free & (held > 0)).sum())} pages held but marked free")
        if (~self._free & (held == 0)).any():
            problems.append(f"{int((~self._free & (held == 0)).sum())} pages used but held by nobody")
        if problems:
            raise PoolCorrupted("page pool invariants broken: " + "; ".join(problems))

    def stats(self) -> dict[str, int]:
        return {
            "pages_total": self.num_pages,
            "pages_free": self.num_free,
            "pages_kv": self._used[Owner.KV],
            "pages_adapter": self._used[Owner.ADAPTER],
            "pages_prefix": self._used[Owner.PREFIX],
            "page_bytes": self.page_elems * self.itemsize,
        }
