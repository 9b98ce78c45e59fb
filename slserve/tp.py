"""Tensor-parallel workers: ranks 1..N-1 as processes that slserve starts, watches and stops.

    rank 0 (the engine's process)              rank r (a worker process)
    scheduler, pages, adapter residency        ModelRunner(shard r)
    ModelRunner(shard 0)                       loop: plan <- pipe; runner.execute(plan)
    each step: plan -> every pipe, then execute its own; the forward's collectives (gloo on CPU,
    NCCL on CUDA) keep the ranks in step, and logits come back to rank 0 alone.

A plan goes to each worker as one pickled message; an adapter load in it carries only that rank's
slices of the weights (runner.rank_weights), so uploads, deletes and replaces reach every rank
through the plans. A watchdog thread ends the group when a worker exits or a step outlasts
`tp_timeout`: it kills every worker (which also breaks rank 0 out of a collective it waits in)
and reports through `on_failure`. Workers die with their parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from slserve.config import EngineConfig, ModelConfig
from slserve.parallel import Shard
from slserve.plan import AdapterLoad, StepPlan

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class WorkerFailure(RuntimeError):
    """A tensor-parallel worker died or hung: the group cannot go on."""


def init_distributed(shard: Shard, init_method: str, device: torch.device, timeout: float) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=shard.rank, world_size=shard.size,
                            timeout=datetime.timedelta(seconds=timeout))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pipe's EOF still ends the worker
        pass


def _worker_main(rank: int, size: int, init_method: str, config: EngineConfig, model_path: str,
                 cfg: ModelConfig, num_pages: int, conn: mp.connection.Connection) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the group stops
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s tp{rank} %(name)s: %(message)s")
    from slserve.runner import ModelRunner, runner_device

    torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // size))
    shard = Shard(rank, size)
    conn.send("joining")  # imports done: the rendezvous below takes milliseconds, not start-up time
    init_distributed(shard, init_method, runner_device(config, shard), config.tp_timeout)
    runner = ModelRunner(config, Path(model_path), cfg, shard, num_pages)
    conn.send("ready")
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:  # rank 0 is gone
            break
        plan = pickle.loads(message)
        if plan is None:
            break
        runner.execute(plan)
    runner.close()
    dist.destroy_process_group()


class TPWorkers:
    """Start ranks 1..N-1, join rank 0 to their process group, and relay plans to them."""

    def __init__(self, config: EngineConfig, model_path: Path, cfg: ModelConfig, num_pages: int,
                 device: torch.device):
        self.size = config.tp
        self.timeout = config.tp_timeout
        self.cfg = cfg
        self.failure: str | None = None
        self.on_failure: Callable[[WorkerFailure], None] | None = None
        self._closing = False
        self._step_started: float | None = None
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.procs: list[mp.Process] = []
        self.conns: list[mp.connection.Connection] = []
        for rank in range(1, self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"slserve-tp{rank}", daemon=True,
                               args=(rank, self.size, init_method, config, str(model_path), cfg,
                                     num_pages, child))
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        try:
            # Spawning a worker and importing torch there can take longer than a step may, on a busy
            # machine: the rendezvous (bounded by tp_timeout) waits until every worker is there.
            self._expect("joining", "starting")
            init_distributed(Shard(0, self.size), init_method, device, self.timeout)
        except BaseException:
            self.close()
            raise
        self._watchdog = threading.Thread(target=self._watch, name="slserve-tp-watchdog", daemon=True)
        self._watchdog.start()

    def wait_ready(self) -> None:
        """Block until every worker has loaded its shard (or one fails)."""
        self._expect("ready", "loading")

    def _expect(self, message: str, doing: str) -> None:
        """Wait, without a time limit, for `message` from every worker; a worker that exits first
        fails the group."""
        for rank, conn in enumerate(self.conns, start=1):
            while not conn.poll(0.2):
                self.check()
                if not self.procs[rank - 1].is_alive():
                    raise WorkerFailure(f"tensor-parallel worker rank {rank} exited while {doing} "
                                        f"(exit code {self.procs[rank - 1].exitcode})")
            got = conn.recv()
            if got != message:
                raise WorkerFailure(f"tensor-parallel worker rank {rank} sent {got!r}, expected {message!r}")

    def check(self) -> None:
        if self.failure is not None:
            raise WorkerFailure(self.failure)

    def send(self, plan: StepPlan) -> None:
        """Hand the step's plan to every worker; rank 0 then executes it itself."""
        self.check()
        self._step_started = time.monotonic()
        loads = any(isinstance(c, AdapterLoad) for c in plan.adapter_commands)
        shared = None if loads else pickle.dumps(plan)  # loads carry each rank its own slices
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(shared if shared is not None else pickle.dumps(self._for_rank(plan, rank)))
            except OSError as exc:
                self._fail(f"tensor-parallel worker rank {rank} is unreachable ({exc})")
                raise WorkerFailure(self.failure) from exc

    def step_done(self) -> None:
        self._step_started = None

    def _for_rank(self, plan: StepPlan, rank: int) -> StepPlan:
        from slserve.runner import rank_weights

        ranges = Shard(rank, self.size).module_ranges(self.cfg)
        commands = [
            dataclasses.replace(c, adapter=None, weights=rank_weights(c.adapter, ranges, copy=True))
            if isinstance(c, AdapterLoad) else c
            for c in plan.adapter_commands
        ]
        return dataclasses.replace(plan, adapter_commands=commands)

    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs, start=1)}
        while not self._closing and self.failure is None:
            ready = mp.connection.wait(list(sentinels), timeout=0.5)
            if self._closing:
                return
            if ready:
                rank = sentinels[ready[0]]
                code = self.procs[rank - 1].exitcode
                self._fail(f"tensor-parallel worker rank {rank} exited (exit code {code})")
                return
            started = self._step_started
            if started is not None and time.monotonic() - started > self.timeout:
                self._fail(f"a tensor-parallel step did not finish within {self.timeout:g} s "
                           "(a worker hangs)")
                return

    def _fail(self, message: str) -> None:
        if self.failure is not None:
            return
        self.failure = message
        logger.critical("%s; stopping every worker", message)
        self._kill()
        if self.on_failure is not None:
            try:
                self.on_failure(WorkerFailure(message))
            except Exception:
                logger.exception("on_failure failed")

    def _kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()

    def close(self) -> None:
        """Stop every worker: a polite stop message, then a kill after a few seconds."""
        self._closing = True
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(None))
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill()
        for proc in self.procs:
            proc.join(1)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a broken group after a failure
                pass
