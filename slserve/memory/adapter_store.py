"""The two slow adapter tiers: the disk directory and a byte-bounded host-RAM LRU of parsed adapters.

Disk layout (PEFT's, so a directory can be copied in by hand):

    root/<name>/adapter_config.json
    root/<name>/adapter_model.safetensors

Start-up only lists names and file sizes; an adapter is parsed the first time it is asked for.
Writes are atomic: a new adapter is validated, written to a temp directory inside root, fsynced and
renamed into place, so a crash leaves either the old adapter or the new one, never a mix. Working
directories carry a '~' in their name, which no adapter name may contain, and are cleaned up (or
rolled back) at start-up:

    .slserve-tmp~<name>~<id>    an upload being written           -> deleted
    .slserve-old~<name>~<id>    the previous copy during replace  -> restored if <name> is missing,
                                                                     else deleted
    .slserve-trash~<name>~<id>  a removed adapter being deleted   -> deleted
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from slserve.adapters.dora import BaseWeights
from slserve.adapters.host_copy import host_copy
from slserve.adapters.peft_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    LoRAAdapter,
    load_peft_adapter,
    parse_peft_adapter,
    read_adapter_dir,
)
from slserve.config import ModelConfig

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TMP, _OLD, _TRASH = ".slserve-tmp~", ".slserve-old~", ".slserve-trash~"
# A load that raced with a replace of the same name is retried this many times, then served
# without being cached.
_LOAD_ATTEMPTS = 3


class AdapterExistsError(AdapterError):
    """The name is taken and replace was not asked for (HTTP 409)."""


class AdapterNotFoundError(AdapterError, KeyError):
    """No adapter of that name (HTTP 404). Also a KeyError, as a missing mapping key is."""

    # KeyError's str() is the repr of its argument; the message should read as plain text.
    __str__ = ValueError.__str__


def validate_name(name: object) -> str:
    """The name itself if it is a legal adapter name, else AdapterError.

    A name becomes a directory under root, so only a flat, portable alphabet is allowed; '.' and
    '..' match that alphabet but would escape the directory.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1 to 64 characters from A-Z a-z 0-9 . _ - (not '.' or '..')"
        )
    return name


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    created: float  # seconds since the epoch (mtime of the adapter's directory)
    size_bytes: int  # on disk
    ranks: dict[str, int] | None  # None until the adapter has been parsed once
    target_modules: tuple[str, ...] | None
    kind: str | None = None  # adapters.kinds.KINDS key; None until parsed
    num_virtual: int = 0  # slots it puts before a prompt (virtual tokens, prefix K/V); declared until parsed


@dataclass
class _DiskEntry:
    created: float
    size_bytes: int
    version: int  # unique per write, so a load can tell that the adapter changed under it
    ranks: dict[str, int] | None = None
    target_modules: tuple[str, ...] | None = None
    kind: str | None = None
    num_virtual: int = 0


_PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def _declared_virtual_tokens(path: Path) -> int:
    """The slots a prompt-learning adapter's config declares, read without parsing its weights, so
    that a request's length is checked against them before the adapter's first use (parsing checks
    them against the weights and then replaces this figure)."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        if isinstance(config, dict) and config.get("peft_type") in _PROMPT_LEARNING:
            return max(0, int(config.get("num_virtual_tokens") or 0))
    except (OSError, ValueError, TypeError):
        pass  # reported when it is parsed
    return 0


class AdapterStore:
    """Disk tier plus host LRU tier. Thread-safe: the engine thread and a prefetch thread share it."""

    def __init__(self, root: Path, model: ModelConfig, max_rank: int, host_cache_bytes: int,
                 base: BaseWeights | None = None, serving_dtype: torch.dtype = torch.float32) -> None:
        """base: the base model's weights, which DoRA adapters need (without, they are refused).
        serving_dtype: the pool's; parsed adapters are kept as host_copy makes them for it."""
        if host_cache_bytes <= 0:
            raise ValueError("host_cache_bytes must be positive")
        self.root = Path(root)
        self.model = model
        self.base = base
        self.max_rank = max_rank
        self.host_capacity_bytes = host_cache_bytes
        self.serving_dtype = serving_dtype
        # _lock guards every in-memory field and is never held across disk I/O or parsing.
        # _write_lock serialises add/remove so their renames cannot interleave.
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._versions = itertools.count(1)
        self._disk: dict[str, _DiskEntry] = {}
        self._host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self._host_bytes = 0
        self._loading: dict[str, Future[LoRAAdapter]] = {}
        self._hits = self._misses = self._evictions = self._disk_loads = 0

        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._scan()

    # -- start-up ------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Finish what a crash interrupted: roll a half-done replace back, drop temp directories."""
        for entry in os.scandir(self.root):
            prefix = next((p for p in (_TMP, _OLD, _TRASH) if entry.name.startswith(p)), None)
            if prefix is None:
                continue
            name = entry.name[len(prefix) :].split("~", 1)[0]
            if prefix == _OLD and _NAME.fullmatch(name) and not (self.root / name).exists():
                logger.warning("restoring adapter %r from an interrupted replace", name)
                os.rename(entry.path, self.root / name)
            else:
                logger.info("removing leftover %s", entry.path)
                _remove_path(Path(entry.path))
        _fsync_dir(self.root)

    def _scan(self) -> None:
        for entry in os.scandir(self.root):
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                validate_name(entry.name)
            except AdapterError:
                logger.warning("ignoring %s: not a valid adapter name", entry.path)
                continue
            if not os.path.exists(os.path.join(entry.path, CONFIG_FILE)):
                logger.warning("ignoring %s: no %s", entry.path, CONFIG_FILE)
                continue
            # Registered without parsing; a broken adapter is reported when it is first used.
            self._disk[entry.name] = self._disk_entry(Path(entry.path))
        logger.info("adapter store %s: %d adapters on disk", self.root, len(self._disk))

    def _disk_entry(self, path: Path) -> _DiskEntry:
        size = sum(f.stat().st_size for f in os.scandir(path) if f.is_file(follow_symlinks=False))
        return _DiskEntry(created=path.stat().st_mtime, size_bytes=size, version=next(self._versions),
                          num_virtual=_declared_virtual_tokens(path))

    # -- queries -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._disk)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._disk

    def __len__(self) -> int:
        with self._lock:
            return len(self._disk)

    def info(self, name: str, parse: bool = False) -> AdapterInfo:
        """Disk facts; ranks and target modules once parsed (parse=True parses now if needed)."""
        if parse:
            self.get(name)
        with self._lock:
            e = self._entry(name)
            return AdapterInfo(
                name=name,
                created=e.created,
                size_bytes=e.size_bytes,
                ranks=dict(e.ranks) if e.ranks is not None else None,
                target_modules=e.target_modules,
                kind=e.kind,
                num_virtual=e.num_virtual,
            )

    def is_cached(self, name: str) -> bool:
        """Whether the parsed adapter sits in the host tier now."""
        with self._lock:
            return name in self._host

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "disk_count": len(self._disk),
                "disk_bytes": sum(e.size_bytes for e in self._disk.values()),
                "host_count": len(self._host),
                "host_bytes": self._host_bytes,
                "host_capacity_bytes": self.host_capacity_bytes,
                "host_hits": self._hits,
                "host_misses": self._misses,
                "host_evictions": self._evictions,
                "disk_loads": self._disk_loads,
            }

    def _entry(self, name: str) -> _DiskEntry:
        """Caller holds _lock."""
        entry = self._disk.get(name)
        if entry is None:
            raise AdapterNotFoundError(f"adapter {name!r} not found")
        return entry

    # -- host tier -----------------------------------------------------------------------------

    def get(self, name: str) -> LoRAAdapter:
        """The parsed adapter, from the host LRU or else from disk (then cached if it fits)."""
        with self._lock:
            self._entry(name)
            adapter = self._host.get(name)
            if adapter is not None:
                self._host.move_to_end(name)
                self._hits += 1
                return adapter
            self._misses += 1
            pending = self._loading.get(name)
            if pending is None:
                pending = self._loading[name] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            # Another thread is already reading this adapter; share its result or its error.
            return pending.result()
        try:
            adapter = self._load(name)
        except BaseException as e:
            with self._lock:
                self._loading.pop(name, None)
            pending.set_exception(e)
            raise
        with self._lock:
            self._loading.pop(name, None)
        pending.set_result(adapter)
        return adapter

    def preload(self) -> int:
        """Parse adapters into the host tier, in name order, until the next one would evict an
        earlier one. Returns how many are cached. An adapter that fails to parse is skipped here and
        reported when a request asks for it."""
        for name in self.names():
            with self._lock:
                evictions = self._evictions
            try:
                self.get(name)
            except AdapterError as exc:
                logger.warning("not preloading adapter %r: %s", name, exc)
            with self._lock:
                if self._evictions != evictions:
                    break
        with self._lock:
            return len(self._host)

    def _load(self, name: str) -> LoRAAdapter:
        """Read and parse from disk; cache unless the adapter was replaced or removed meanwhile."""
        for attempt in range(_LOAD_ATTEMPTS):
            with self._lock:
                version = self._entry(name).version
            try:
                adapter = host_copy(load_peft_adapter(self.root / name, self.model, self.max_rank, name,
                                                      self.base), self.serving_dtype)
            except AdapterError:
                # A replace or remove moves the directory away for a moment: wait for that write
                # to finish and read again if the adapter changed; otherwise the error is its own.
                with self._write_lock:
                    pass
                with self._lock:
                    changed = self._entry(name).version != version
                if changed and attempt + 1 < _LOAD_ATTEMPTS:
                    continue
                raise
            with self._lock:
                self._disk_loads += 1
                entry = self._entry(name)
                if entry.version == version:
                    self._note_parsed(entry, adapter)
                    self._insert(name, adapter)
                    return adapter
            logger.info("adapter %r changed while loading; reading it again", name)
        return adapter

    def _insert(self, name: str, adapter: LoRAAdapter) -> None:
        """Caller holds _lock. Evicts least recently used adapters until the byte bound holds."""
        self._drop(name)
        if adapter.nbytes > self.host_capacity_bytes:
            logger.info(
                "adapter %r (%d bytes) is larger than the host cache (%d bytes); not cached",
                name,
                adapter.nbytes,
                self.host_capacity_bytes,
            )
            return
        self._host[name] = adapter
        self._host_bytes += adapter.nbytes
        while self._host_bytes > self.host_capacity_bytes:
            evicted, old = self._host.popitem(last=False)
            self._host_bytes -= old.nbytes
            self._evictions += 1
            logger.debug("host cache evicted adapter %r", evicted)

    def _drop(self, name: str) -> None:
        """Caller holds _lock."""
        old = self._host.pop(name, None)
        if old is not None:
            self._host_bytes -= old.nbytes

    @staticmethod
    def _note_parsed(entry: _DiskEntry, adapter: LoRAAdapter) -> None:
        entry.ranks = dict(adapter.ranks)
        entry.target_modules = adapter.target_modules
        entry.kind = adapter.kind
        entry.num_virtual = adapter.num_virtual

    # -- disk tier -----------------------------------------------------------------------------

    def add_from_path(self, name: str, src_dir: str | os.PathLike, replace: bool = False) -> AdapterInfo:
        """Copy the adapter in directory src_dir into the store under `name` (validated first)."""
        validate_name(name)
        config_bytes, weights_bytes = read_adapter_dir(src_dir, name)
        return self.add_from_bytes(name, config_bytes, weights_bytes, replace=replace)

    def add_from_bytes(
        self, name: str, config_bytes: bytes, weights_bytes: bytes, replace: bool = False
    ) -> AdapterInfo:
        """Store an uploaded adapter. Nothing becomes visible unless it validates completely."""
        validate_name(name)
        adapter = host_copy(parse_peft_adapter(config_bytes, weights_bytes, self.model, self.max_rank, name,
                                               self.base), self.serving_dtype)
        final = self.root / name
        with self._write_lock:
            with self._lock:
                registered = name in self._disk
            if (registered or final.exists()) and not replace:
                raise AdapterExistsError(f"adapter {name!r} already exists (pass replace to overwrite it)")
            tmp = self._work_dir(_TMP, name)
            try:
                tmp.mkdir()
                _write_synced(tmp / CONFIG_FILE, config_bytes)
                _write_synced(tmp / WEIGHTS_FILE, weights_bytes)
                _fsync_dir(tmp)
                old = self._swap_in(tmp, final, name)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            entry = self._disk_entry(final)
            self._note_parsed(entry, adapter)
            with self._lock:
                self._disk[name] = entry
                # An upload is usually followed by a request for it; keep the parsed copy.
                self._insert(name, adapter)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("stored adapter %r (%d bytes, ranks %s)", name, entry.size_bytes, entry.ranks)
        return AdapterInfo(name, entry.created, entry.size_bytes, dict(adapter.ranks), adapter.target_modules,
                           adapter.kind, adapter.num_virtual)

    def _swap_in(self, tmp: Path, final: Path, name: str) -> Path | None:
        """Rename tmp to final; an existing final is moved aside first and returned for deletion."""
        old = None
        if final.exists():
            old = self._work_dir(_OLD, name)
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)
            raise
        _fsync_dir(self.root)
        return old

    def remove(self, name: str) -> None:
        """Delete the adapter from disk and from the host cache."""
        validate_name(name)
        with self._write_lock:
            with self._lock:
                self._entry(name)
            trash = self._work_dir(_TRASH, name)
            try:
                os.rename(self.root / name, trash)
                _fsync_dir(self.root)
            except FileNotFoundError:
                # Deleted behind the store's back; forgetting it is all that is left to do.
                trash = None
            with self._lock:
                del self._disk[name]
                self._drop(name)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        logger.info("removed adapter %r", name)

    def _work_dir(self, prefix: str, name: str) -> Path:
        return self.root / f"{prefix}{name}~{uuid.uuid4().hex}"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    """Make renames and creations inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
