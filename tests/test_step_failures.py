"""A failure fails only what it must (issue 15, defects 1 and 9, and the step-failure promise).

- A request the scheduler cannot serve (adapter deleted while it waits; prompt and adapter never
  fit in the pool) ends with a clear error and the status it maps to; the engine goes on.
- A request admitted before its adapter is deleted or replaced keeps its weights, also when it is
  preempted and readmitted: greedy tokens equal transformers + peft with the original adapter.
- An exception in the forward or the sampler fails that step's requests only (500); the rest and
  new requests finish with the reference tokens and the pool ends idle.
- If the engine's state cannot be trusted (the scheduler raises, or the pool's books do not
  balance after a failed step) the engine stops: AsyncEngine fails every stream and calls
  on_fatal, and a real server process exits non-zero within seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch

from slserve.api.server import _finish_error
from slserve.async_engine import AsyncEngine, EngineNotReady, GenerateItem
from slserve.config import EngineConfig
from slserve.engine import Engine
from slserve.memory.pool import PoolCorrupted
from slserve.model.loader import resolve_model
from slserve.request import Request, Status
from slserve.sampling_params import SamplingParams
from tests.peft_util import ALL_TARGETS, make_peft_adapter, peft_generate

# float32 SmolLM2: 30 layers x 2 x 16 tokens x 3 KV heads x 64 dims x 4 bytes; a rank-8 adapter on
# all seven modules takes 14 such pages.
PAGE_BYTES = 30 * 2 * 16 * 3 * 64 * 4
ADAPTER_PAGES = 14
GREEDY = dict(temperature=0)
TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "changed how books were made and read across Europe. ")


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, Path]:
    """Two rank-8 adapters on all modules: `old` and `new`, which decode differently."""
    root = tmp_path_factory.mktemp("peft")
    return {name: make_peft_adapter(base, root / name, 8, ALL_TARGETS, seed=seed, std=0.05)
            for name, seed in (("old", 11), ("new", 12))}


def _engine(tmp_path: Path, pages: int, **kw) -> Engine:
    return Engine(EngineConfig(dtype="float32", pool_bytes=pages * PAGE_BYTES,
                               adapter_dir=str(tmp_path / "store"), **kw))


def _run(engine: Engine, reqs: list[Request], limit: int = 500) -> list:
    outs = []
    for _ in range(limit):
        if all(r.finished for r in reqs):
            return outs
        outs += engine.step()
    raise AssertionError("requests did not finish")


def _assert_idle(engine: Engine) -> None:
    engine.check_pool()
    pool = engine.pool.stats()
    assert pool["pages_kv"] == 0
    assert not engine.adapter_cache.stale
    engine.reset_prefix_cache()
    engine.adapter_cache.evict_idle(engine.pool.num_pages)
    assert engine.pool.num_free == engine.pool.num_pages


_REFERENCES: dict[tuple, list[int]] = {}


def _reference(base, adapter: Path | None, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from transformers + peft, computed once per (adapter, prompt, length)."""
    key = (adapter, tuple(ids), n)
    if key not in _REFERENCES:
        _REFERENCES[key] = peft_generate(base, adapter, ids, n)
    return _REFERENCES[key]


def _final(outs, req: Request):
    finals = [o for o in outs if o.request_id == req.request_id and o.finished]
    assert len(finals) == 1
    return finals[0]


# -- defect 1: requests the scheduler fails -----------------------------------------------------


def test_adapter_deleted_while_waiting_fails_only_that_request(base, adapters, tmp_path):
    engine = _engine(tmp_path, 64, max_num_seqs=1)
    engine.add_adapter("x", adapters["old"])
    ids = engine.tokenizer.encode("The quick brown fox")
    first = engine.add_request(ids, SamplingParams(max_tokens=6, **GREEDY))
    waiting = engine.add_request(ids, SamplingParams(max_tokens=6, **GREEDY), adapter="x")
    outs = engine.step()
    assert first.status is Status.RUNNING and waiting.status is Status.WAITING
    engine.remove_adapter("x")
    outs += _run(engine, [first, waiting])
    out = _final(outs, waiting)
    assert out.finish_reason == "error" and out.error_status == 404
    assert out.error == "adapter 'x' was deleted before the request was admitted"
    assert first.output_token_ids == _reference(base, None, ids, 6)
    err = _finish_error(out)
    assert (err.status, err.code) == (404, "model_not_found")
    # The engine still serves.
    again = engine.add_request(ids, SamplingParams(max_tokens=6, **GREEDY))
    _run(engine, [again])
    assert again.output_token_ids == first.output_token_ids
    _assert_idle(engine)


@pytest.mark.parametrize("budget", [1024, 32], ids=["at-admission", "while-prefilling"])
def test_prompt_that_never_fits_next_to_its_adapter(base, adapters, tmp_path, budget):
    # 20 pages: a 200-token prompt (13 pages) is within max_model_len (320 tokens) but not beside
    # the adapter's 14 pages. With a 32-token budget the first chunk fits, and the request fails
    # once it runs alone and cannot grow.
    engine = _engine(tmp_path, 20, max_num_batched_tokens=budget)
    engine.add_adapter("x", adapters["old"])
    long_ids = engine.tokenizer.encode(TEXT * 8)[:200]
    assert len(long_ids) + 4 <= engine.max_model_len
    big = engine.add_request(long_ids, SamplingParams(max_tokens=4, **GREEDY), adapter="x")
    outs = _run(engine, [big])
    out = _final(outs, big)
    assert out.finish_reason == "error" and out.error_status == 400
    assert "the prompt and its adapter 'x' do not fit in the KV pool" in out.error
    assert f"{engine.pool.num_pages} in the pool" in out.error
    assert _finish_error(out).status == 400
    ids = engine.tokenizer.encode("Hello, my name is")
    ok = engine.add_request(ids, SamplingParams(max_tokens=5, **GREEDY), adapter="x")
    _run(engine, [ok])
    assert ok.finish_reason == "length"
    assert ok.output_token_ids == _reference(base, adapters["old"], ids, 5)
    _assert_idle(engine)


def test_async_engine_survives_a_failed_request(adapters, tmp_path):
    async def main():
        engine = AsyncEngine(EngineConfig(dtype="float32", pool_bytes=20 * PAGE_BYTES,
                                          adapter_dir=str(tmp_path / "store")))
        engine.start()
        assert await engine.wait_ready()
        try:
            await engine.add_adapter_path("x", str(adapters["old"]))
            long_ids = engine.engine.tokenizer.encode(TEXT * 8)[:200]
            bad = [out async for out in engine.generate(long_ids, SamplingParams(max_tokens=4), "x", "bad")]
            good = [out async for out in engine.generate("Hi", SamplingParams(max_tokens=3), None, "good")]
            return bad, good, engine.ready
        finally:
            engine.shutdown()

    bad, good, ready = asyncio.run(main())
    assert bad[-1].finished and bad[-1].error_status == 400
    assert good[-1].finish_reason == "length" and ready


# -- defect 9: adapters deleted or replaced under running requests --------------------------------


@pytest.mark.parametrize("change", ["delete", "replace"])
def test_preempted_request_keeps_its_adapter_version(base, adapters, tmp_path, change):
    # 4-token pages, 64 of them; the adapter takes 53. Two base requests (12-token prompts, 12 new
    # tokens: 6 pages each at the end) and one adapter request (8 + 12 tokens) are admitted
    # together (3 + 3 + 53 + 2 pages), then outgrow the pool: the adapter request, admitted last,
    # is preempted and comes back only after a base request finished, long after its adapter was
    # deleted or replaced.
    page_bytes = PAGE_BYTES // 4
    engine = Engine(EngineConfig(dtype="float32", pool_bytes=64 * page_bytes, page_tokens=4,
                                 adapter_dir=str(tmp_path / "store")))
    engine.add_adapter("x", adapters["old"])
    tok = engine.tokenizer
    long_ids = tok.encode(TEXT)
    filler_params = SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY)
    fillers = [engine.add_request(long_ids[i : i + 12], filler_params) for i in (0, 3)]
    ids = tok.encode("My favourite recipe for bread")
    params = SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY)
    req = engine.add_request(ids, params, adapter="x")
    engine.step()
    assert req.status is Status.RUNNING and req.num_preemptions == 0
    if change == "delete":
        engine.remove_adapter("x")
    else:
        engine.add_adapter("x", adapters["new"], replace=True)
    _run(engine, [*fillers, req])
    assert req.num_preemptions > 0, "the scenario must preempt the adapter request"
    expected = _reference(base, adapters["old"], ids, 12)
    assert req.finish_reason == "length" and req.output_token_ids == expected
    if change == "replace":
        # New requests get the new weights, which really decode differently.
        fresh = engine.add_request(ids, params, adapter="x")
        _run(engine, [fresh])
        assert fresh.output_token_ids == _reference(base, adapters["new"], ids, 12) != expected
    _assert_idle(engine)


# -- step failures ----------------------------------------------------------------------------------


class _RaiseOnCall:
    """Wraps a callable and raises on its n-th call (fault injection around the real thing)."""

    def __init__(self, fn, n: int, exc: Exception, before=None):
        self.fn, self.n, self.exc, self.before, self.calls = fn, n, exc, before, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            if self.before is not None:
                self.before()
            raise self.exc
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("where", ["runner.model", "sampler"])
def test_step_failure_fails_only_that_steps_requests(base, adapters, tmp_path, where):
    # First come first served, so that the first step holds the first two requests.
    engine = _engine(tmp_path, 64, max_num_seqs=2, affinity_bound=0)
    engine.add_adapter("x", adapters["old"])
    tok = engine.tokenizer
    prompts = ["The quick brown fox", "In a distant galaxy", "def fibonacci(n):", "Bread starts with"]
    work = [(tok.encode(p), a) for p, a in zip(prompts, ["x", None, "x", None], strict=True)]
    reqs = [engine.add_request(ids, SamplingParams(max_tokens=4, **GREEDY), adapter=a) for ids, a in work]
    owner, _, attr = where.rpartition(".")
    obj = engine.runner if owner else engine
    setattr(obj, attr, _RaiseOnCall(getattr(obj, attr), 3, RuntimeError("injected fault")))
    outs = _run(engine, reqs)
    failed = [r for r in reqs if r.finish_reason == "error"]
    assert failed == reqs[:2], "exactly the two requests of the failing step"
    for r in failed:
        out = _final(outs, r)
        assert out.error_status == 500 and "RuntimeError: injected fault" in out.error
        assert _finish_error(out).status == 500
    for (ids, a), r in zip(work[2:], reqs[2:], strict=True):
        assert r.output_token_ids == _reference(base, adapters["old"] if a else None, ids, 4)
    assert engine.counters["failed_steps"] == 1
    assert engine.last_step_error == "RuntimeError: injected fault"
    late = engine.add_request(work[0][0], SamplingParams(max_tokens=4, **GREEDY), adapter="x")
    _run(engine, [late])
    assert late.output_token_ids == _reference(base, adapters["old"], work[0][0], 4)
    _assert_idle(engine)


def test_corrupt_pool_after_failed_step_is_fatal(tmp_path):
    engine = _engine(tmp_path, 32)
    req = engine.add_request("Hello there", SamplingParams(max_tokens=4))

    def corrupt():
        engine.pool._free[0] = False  # a page the books lose: used, held by nobody

    engine.runner.model = _RaiseOnCall(engine.runner.model, 1, RuntimeError("injected fault"), before=corrupt)
    with pytest.raises(PoolCorrupted, match="1 pages used but held by nobody"):
        engine.step()
    assert req.finish_reason == "error"


def test_async_engine_dies_on_scheduler_error(tmp_path, monkeypatch):
    from slserve.scheduler.scheduler import Scheduler

    real = Scheduler.schedule
    calls = {"n": 0}

    def schedule(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyError("books")
        return real(self)

    monkeypatch.setattr(Scheduler, "schedule", schedule)
    fatal: list[BaseException] = []

    async def main():
        engine = AsyncEngine(EngineConfig(dtype="float32", pool_bytes=32 * PAGE_BYTES,
                                          adapter_dir=str(tmp_path / "store")))
        engine.on_fatal = fatal.append
        engine.start()
        assert await engine.wait_ready()
        got = []
        with pytest.raises(EngineNotReady, match="KeyError"):
            stream = await engine.submit([GenerateItem("a", "Hello", SamplingParams(max_tokens=50))])
            async for _, out in stream:
                got.append(out)
        try:
            assert not engine.ready and isinstance(engine.fatal, KeyError)
            assert "unrecoverable" in engine.not_ready_reason()
            with pytest.raises(EngineNotReady):
                await engine.submit([GenerateItem("b", "Hello", SamplingParams())])
        finally:
            engine.shutdown()
        return got

    got = asyncio.run(main())
    assert len(got) == 2 and not got[-1].finished
    assert len(fatal) == 1 and isinstance(fatal[0], KeyError)


# -- the process exits when the engine dies ---------------------------------------------------------

WRAPPER = """
import sys
from slserve.api.server import run_server
from slserve.config import EngineConfig
from slserve.scheduler.scheduler import Scheduler

real = Scheduler.schedule


def schedule(self):
    # The fault: the scheduler's books break as soon as a request with max_tokens=13 arrives.
    if any(r.params.max_tokens == 13 for r in self.waiting):
        raise RuntimeError("injected scheduler fault")
    return real(self)


Scheduler.schedule = schedule
run_server(EngineConfig(dtype="float32", pool_bytes={pool}, adapter_dir=sys.argv[2], threads=1),
           port=int(sys.argv[1]), log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_process_exits_when_engine_dies(adapters, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(adapters["old"], store / "x")
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(WRAPPER.format(pool=20 * PAGE_BYTES)))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, str(script), str(port), str(store)],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        with httpx.Client(timeout=30) as client:
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            # A request that can never fit: 400 in OpenAI's error format, and the server goes on.
            long_ids = [1] * 200
            r = client.post(f"{url}/v1/completions", json={"model": "x", "prompt": long_ids, "max_tokens": 4})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and "do not fit in the KV pool" in err["message"]
            health = client.get(f"{url}/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            # The fault: the stream ends with an error event, then the process exits non-zero.
            t0 = time.monotonic()
            with client.stream("POST", f"{url}/v1/completions",
                               json={"prompt": "Hello", "max_tokens": 13, "stream": True}) as r:
                status, lines = r.status_code, list(r.iter_lines())
            # The request ends in OpenAI's error format: a 503 if the engine died before the first
            # event was sent (the usual case here), else a final SSE error event.
            if status == 503:
                error = json.loads(lines[0])["error"]
            else:
                events = [line[6:] for line in lines if line.startswith("data: ")]
                assert status == 200 and events[-1] == "[DONE]", lines
                error = json.loads(events[-2])["error"]
            assert error["code"] == "not_ready" and "injected scheduler fault" in error["message"], lines
            try:
                health = client.get(f"{url}/health", timeout=2)
                assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
            except httpx.TransportError:
                pass  # already gone
            rc = proc.wait(timeout=10)
            elapsed = time.monotonic() - t0
        assert rc != 0, log.read_text()
        assert elapsed < 10
        assert "injected scheduler fault" in log.read_text()
    finally:
        (Path("/tmp") / "core_server.log").write_bytes(log.read_bytes())
        if proc.poll() is None:
            proc.kill()
            proc.wait()
