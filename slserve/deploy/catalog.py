"""The shared adapter directory: every adapter the deployment stores, readable by every replica.

    root/~generation                a counter, replaced atomically after every change
    root/~lock                      writers hold it (flock) for their whole change
    root/<name> -> ~versions/<id>   a published adapter: a symlink, swapped atomically on replace
    root/~versions/<name>~<hex>/    adapter_config.json + adapter_model.safetensors, never modified
    root/<name>/                    a plain PEFT directory copied in by hand before start-up

Adapter names cannot contain '~', so the bookkeeping names never collide with an adapter. A
replica keeps its own copy of the adapters (its engine's AdapterStore owns its directory alone)
and brings it up to date when `generation()` differs from the one it last synced: `entries()`
maps every name to a version, and only changed versions are copied. A version directory is
deleted only after the generation that stopped naming it, so a replica that lost the race to copy
it simply syncs again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slserve.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError
from slserve.memory.adapter_store import (
    AdapterExistsError,
    AdapterNotFoundError,
    _fsync_dir,
    _write_synced,
    validate_name,
)

logger = logging.getLogger(__name__)

_GENERATION = "~generation"
_LOCK = "~lock"
_VERSIONS = "~versions"


class Catalog:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        (self.root / _VERSIONS).mkdir(parents=True, exist_ok=True)

    # -- reading (no lock: every change becomes visible through one rename) --------------------------

    def generation(self) -> int:
        try:
            return int((self.root / _GENERATION).read_text() or 0)
        except FileNotFoundError:
            return 0

    def entries(self) -> dict[str, str]:
        """name -> version of every adapter; a version stands for one content."""
        out: dict[str, str] = {}
        for entry in os.scandir(self.root):
            if "~" in entry.name:
                continue
            try:
                validate_name(entry.name)
            except AdapterError:
                continue
            if entry.is_symlink():
                out[entry.name] = os.readlink(entry.path)
            elif entry.is_dir():
                out[entry.name] = f"dir~{entry.stat().st_mtime_ns}"
        return out

    def path(self, name: str, version: str) -> Path:
        """The directory holding that version of the adapter."""
        return self.root / (name if version.startswith("dir~") else version)

    # -- writing ------------------------------------------------------------------------------------

    def publish(self, name: str, config: bytes, weights: bytes, replace: bool = False) -> str:
        """Store the adapter under `name` (already validated by a replica); returns its version.
        AdapterExistsError if the name is taken and replace is False."""
        validate_name(name)
        version = f"{_VERSIONS}/{name}~{uuid.uuid4().hex}"
        with self._locked():
            final = self.root / name
            if (final.is_symlink() or final.exists()) and not replace:
                raise AdapterExistsError(f"adapter {name!r} already exists (pass replace to overwrite it)")
            new = self.root / version
            new.mkdir()
            try:
                _write_synced(new / CONFIG_FILE, config)
                _write_synced(new / WEIGHTS_FILE, weights)
                _fsync_dir(new)
                old = self._detach(final)
                link = self.root / f"~link~{uuid.uuid4().hex}"
                os.symlink(version, link)
                os.replace(link, final)
            except BaseException:
                shutil.rmtree(new, ignore_errors=True)
                raise
            self._changed(old)
        logger.info("published adapter %r as %s", name, version)
        return version

    def remove(self, name: str) -> None:
        validate_name(name)
        with self._locked():
            final = self.root / name
            if not (final.is_symlink() or final.exists()):
                raise AdapterNotFoundError(f"adapter {name!r} not found")
            old = self._detach(final)
            final.unlink(missing_ok=True)
            self._changed(old)
        logger.info("removed adapter %r", name)

    def _detach(self, final: Path) -> Path | None:
        """The content `final` names now, to delete once the change is visible; a hand-copied
        directory is moved aside first (a symlink cannot replace a directory in one rename)."""
        if final.is_symlink():
            return self.root / os.readlink(final)
        if final.is_dir():
            aside = self.root / _VERSIONS / f"{final.name}~{uuid.uuid4().hex}"
            os.rename(final, aside)
            return aside
        return None

    def _changed(self, old: Path | None) -> None:
        """Make the change durable, bump the generation, then delete what no entry names."""
        _fsync_dir(self.root)
        tmp = self.root / f"{_GENERATION}~{uuid.uuid4().hex}"
        _write_synced(tmp, str(self.generation() + 1).encode())
        os.replace(tmp, self.root / _GENERATION)
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # A fresh open file per holder: flock then also excludes other threads of this process.
        with open(self.root / _LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
