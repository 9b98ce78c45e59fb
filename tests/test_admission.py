"""Admission (scheduler.py). Adapter-affine: requests whose adapter the running batch already
reads go first, no request is overtaken more than the bound, and the tokens are those PEFT gives
whatever order requests are admitted in. Cold adapters: read and parsed off the engine thread."""

from __future__ import annotations

import pytest

from slserve import LLM, SamplingParams
from slserve.memory.adapter_pages import DeviceAdapterCache
from slserve.memory.kv_cache import KVBlocks, kv_page_elems
from slserve.memory.pool import PagePool
from slserve.model.loader import resolve_model
from slserve.request import Request
from slserve.scheduler.scheduler import Scheduler
from tests.peft_util import make_peft_adapter, peft_generate
from tests.test_scheduler_properties import ALL, MODEL, PAGE_TOKENS, make_adapter


def admission_order(bound: int) -> list[str]:
    """One long request on adapter "a" runs; behind it wait one "b" request and five short "a"
    requests. One sequence slot is free per step: which waiting request takes it, step by step."""
    pool = PagePool(200, kv_page_elems(MODEL, PAGE_TOKENS), itemsize=4)
    adapters = {n: make_adapter(n, 1, ALL, seed) for seed, n in enumerate("ab")}
    cache = DeviceAdapterCache(pool, MODEL, adapters.__getitem__)
    sched = Scheduler(KVBlocks(pool, PAGE_TOKENS), cache, max_num_seqs=2, max_num_batched_tokens=64,
                      affinity_bound=bound)
    sched.add(Request("long", [1] * 4, SamplingParams(max_tokens=50), "a"))
    for rid, name in [("b0", "b"), *((f"a{i}", "a") for i in range(5))]:
        sched.add(Request(rid, [1] * 4, SamplingParams(max_tokens=1), name))
    order = []
    while sched.waiting:
        out = sched.schedule()
        sched.advance(out.scheduled)
        for req, _ in out.scheduled:
            if req.request_id != "long":
                order.append(req.request_id)
                sched.finish(req)  # one step each: its slot is free again next step
    cache.close()
    return order


def test_first_come_first_served_without_affinity():
    assert admission_order(0) == ["b0", "a0", "a1", "a2", "a3", "a4"]


@pytest.mark.parametrize("bound", [1, 3, 10])
def test_affinity_goes_first_within_the_bound(bound):
    order = admission_order(bound)
    passed = min(bound, 5)  # "b0" waits behind at most `bound` later requests
    assert order == [f"a{i}" for i in range(passed)] + ["b0"] + [f"a{i}" for i in range(passed, 5)]


@pytest.fixture(scope="module")
def three_adapters(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("affinity")
    base = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype="float32")
    paths = {name: make_peft_adapter(base, root / name, r=r, targets=["q_proj", "v_proj", "down_proj"],
                                     seed=seed, std=0.05)
             for seed, (name, r) in enumerate([("a", 4), ("b", 8), ("c", 16)])}
    return base, paths


def test_affinity_reads_fewer_adapters_per_step_and_keeps_tokens(three_adapters, tmp_path):
    base, paths = three_adapters
    prompts = [f"Fact {i}: the capital of France is" for i in range(9)]
    names = ["a", "b", "c"] * 3  # interleaved: first come first served mixes all three per step
    params = SamplingParams(temperature=0, max_tokens=6)
    results = {}
    for bound in (0, 8):
        llm = LLM(dtype="float32", adapter_dir=str(tmp_path / f"store{bound}"), max_num_seqs=3,
                  affinity_bound=bound)
        for name, path in paths.items():
            llm.add_adapter(name, path)
        engine = llm.engine
        reqs = [engine.add_request(p, params, n) for p, n in zip(prompts, names, strict=True)]
        while engine.has_unfinished():
            engine.step()
        stats = llm.stats()
        results[bound] = ([(r.prompt_token_ids, r.token_ids[len(r.prompt_token_ids):]) for r in reqs],
                          stats["step_adapters"] / stats["steps"])
        engine.close()
    tokens_fcfs, per_step_fcfs = results[0]
    tokens_affine, per_step_affine = results[8]
    for name, (ids, got_fcfs), (_, got_affine) in zip(names, tokens_fcfs, tokens_affine, strict=True):
        want = peft_generate(base, paths[name], ids, 6)
        assert got_fcfs == want and got_affine == want
    # First come first served: every step holds all three adapters. Affine: one at a time.
    assert per_step_fcfs == pytest.approx(3.0, abs=0.35)
    assert per_step_affine <= 1.5


def test_cold_adapter_is_parsed_off_the_engine_thread(three_adapters, tmp_path):
    """A request whose adapter is still on disk waits while its files are read and parsed on the
    loader thread; the running batch steps on meanwhile. A damaged file still fails its request."""
    import shutil
    import threading

    _, paths = three_adapters
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    shutil.copytree(paths["a"], store_dir / "a")
    shutil.copytree(paths["a"], store_dir / "broken")
    (store_dir / "broken" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    llm = LLM(dtype="float32", adapter_dir=str(store_dir))
    engine = llm.engine
    parsed_on = {}
    get = engine.store.get

    def recording_get(name):
        parsed_on.setdefault(name, threading.get_ident())
        return get(name)

    engine.store.get = engine.adapter_cache.get_host = recording_get
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    running = engine.add_request("Once upon a time", long)
    engine.step()
    cold = engine.add_request("The capital of France is", SamplingParams(temperature=0, max_tokens=4), "a")
    broken = engine.add_request("Hello", SamplingParams(temperature=0, max_tokens=4), "broken")
    steps_waiting = 0
    while engine.has_unfinished():
        engine.step()
        if cold.num_computed == 0:
            steps_waiting += 1
    engine.close()
    assert parsed_on["a"] != threading.get_ident() and parsed_on["broken"] != threading.get_ident()
    assert steps_waiting >= 1  # it waited for its parse while the batch ran
    assert cold.finish_reason == "length" and running.finish_reason == "length"
    assert broken.finish_reason == "error" and broken.error_status == 400 and "broken" in broken.error
