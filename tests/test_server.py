"""The HTTP server end to end: real `slserve serve` processes, the official openai client and httpx.

Greedy output through HTTP is compared with the offline API (`slserve.LLM`) in this process, for
the base model and for adapters made with the real peft library. Two servers run for the whole
module: `server` (no auth) and `guarded` (api and admin keys, --max-queue 1, --max-num-seqs 1,
--max-upload-mib 1); `server` is restarted once to show that uploads persist. A few tests drive
AsyncEngine and the app with a fake engine, which needs no model.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from functools import cache
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

import slserve
from slserve.async_engine import AsyncEngine, EngineNotReady, GenerateItem, QueueFull
from slserve.config import EngineConfig
from slserve.model.loader import resolve_model
from slserve.request import Request, Status
from slserve.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

BASE = "SmolLM2-135M-Instruct"
PROMPT = "Hello, my name is"
CHAT = [{"role": "user", "content": "Name a color."}]
API_KEY, ADMIN_KEY = "user-key", "admin-key"
SERVER_FLAGS = ("--dtype", "float32", "--pool-mib", "256", "--log-level", "warning")
STARTUP_TIMEOUT = 300
# One intra-op thread per process: the servers and this process share a small machine, where
# torch's OpenMP barriers stall for a whole scheduler slice whenever a worker thread is preempted
# (a 4-element softmax then takes milliseconds instead of microseconds).
THREADS = 1


# -- server processes ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m slserve.cli serve` in a subprocess; /health is polled from the moment it starts,
    so `health_codes` shows what a client saw while the model loaded."""

    def __init__(self, adapter_dir: Path, log_path: Path, *flags: str, threads: int = THREADS) -> None:
        self.adapter_dir = adapter_dir
        self.log_path = log_path
        self.flags = flags
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        self.health_codes: list[int] = []
        self._ready = threading.Event()

    def start(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.health_codes = []
        self._ready.clear()
        cmd = [sys.executable, "-m", "slserve.cli", "serve", "--port", str(self.port),
               "--adapter-dir", str(self.adapter_dir), *SERVER_FLAGS, *self.flags]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it until it exits
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        threading.Thread(target=self._poll_health, daemon=True).start()

    def _poll_health(self) -> None:
        with httpx.Client(timeout=5) as client:
            while self.proc is not None and self.proc.poll() is None:
                try:
                    code = client.get(f"{self.url}/health").status_code
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                self.health_codes.append(code)
                if code == 200:
                    self._ready.set()
                    return
                time.sleep(0.05)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._ready.wait(0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """Both servers start at once; adapters and the offline model are built while they load."""
    root = tmp_path_factory.mktemp("servers")
    plain = ServerProcess(root / "adapters-plain", root / "plain.log")
    guarded = ServerProcess(root / "adapters-guarded", root / "guarded.log", "--api-key", API_KEY,
                            "--admin-key", ADMIN_KEY, "--max-queue", "1", "--max-num-seqs", "1",
                            "--max-upload-mib", "1")
    plain.start()
    guarded.start()
    yield plain, guarded
    plain.stop()
    guarded.stop()


@pytest.fixture(scope="module")
def adapter_srcs(tmp_path_factory) -> dict[str, Path]:
    """PEFT adapters for the served model: ad1 and ad2 share a config (r=8 on q/v), small is r=2
    on q only (under the guarded server's 1 MiB upload limit)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft")
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)),
                                                 dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft_model.add_adapter("small", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    out = {}
    for seed, name in enumerate(("ad1", "ad2")):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in peft_model.named_parameters():
                if "lora_B" in key:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        peft_model.save_pretrained(str(root / name), selected_adapters=["default"])
        out[name] = root / name
    peft_model.save_pretrained(str(root / "small-parent"), selected_adapters=["small"])
    out["small"] = root / "small-parent" / "small"
    return out


@pytest.fixture(scope="module")
def offline(adapter_srcs, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    llm = slserve.LLM(dtype="float32", pool_bytes=256 << 20,
                      adapter_dir=str(tmp_path_factory.mktemp("offline-adapters")))
    for name in ("ad1", "ad2"):
        llm.add_adapter(name, adapter_srcs[name])

    @cache
    def generate(prompt: str, adapter: str | None, max_tokens: int, stop: tuple[str, ...] = ()):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=list(stop))
        return llm.generate(prompt, params, adapter)[0]

    generate.llm = llm
    yield generate
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(processes, adapter_srcs, offline) -> ServerProcess:
    plain = processes[0]
    plain.wait_ready()
    r = upload(plain.url, "ad1", adapter_srcs["ad1"])
    assert r.status_code == 201, r.text
    return plain


@pytest.fixture(scope="module")
def guarded(processes, server) -> ServerProcess:
    processes[1].wait_ready()
    return processes[1]


def openai_client(url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def upload(url: str, name: str, src: Path, replace: bool = False, key: str | None = None,
           weights: bytes | None = None) -> httpx.Response:
    files = {
        "config": ("adapter_config.json", (src / "adapter_config.json").read_bytes(), "application/json"),
        "weights": ("adapter_model.safetensors",
                    weights if weights is not None else (src / "adapter_model.safetensors").read_bytes(),
                    "application/octet-stream"),
    }
    headers = {"Authorization": f"Bearer {key}"} if key else None
    params = {"replace": "true"} if replace else None
    return httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files, params=params,
                      headers=headers, timeout=60)


def chat_prompt(offline, messages) -> str:
    return offline.llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


# -- AsyncEngine and the app with a fake engine (no model) -------------------------------------------


class FakeEngine:
    """Holds requests in WAITING forever; enough of Engine for the engine loop."""

    model_name = "fake"
    max_model_len = 64
    tokenizer = None
    last_step_error = None

    def __init__(self) -> None:
        self.requests: dict[str, Request] = {}
        self.aborted: list[str] = []
        self.counters = {"failed_steps": 0}

    def add_request(self, prompt, params, adapter=None, request_id=None) -> Request:
        req = Request(request_id, list(prompt), params, adapter)
        self.requests[request_id] = req
        return req

    def abort(self, request_id: str):
        req = self.requests.pop(request_id, None)
        if req is not None:
            req.status = Status.FINISHED
            self.aborted.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self):
        time.sleep(0.005)
        return []

    def stats(self) -> dict:
        return {"waiting": len(self.requests)}

    def close(self) -> None:
        pass


def test_async_engine_not_ready_then_ready_and_queue_bound():
    gate = threading.Event()
    fake = FakeEngine()

    def build(_config):
        gate.wait(30)
        return fake

    async def scenario():
        ae = AsyncEngine(EngineConfig(max_queue=2), engine_factory=build)
        ae.start()
        try:
            assert not ae.ready
            with pytest.raises(EngineNotReady):
                await ae.submit([GenerateItem("a", [1], SamplingParams())])
            gate.set()
            assert await ae.wait_ready()
            item = lambda rid: GenerateItem(rid, [1, 2], SamplingParams())  # noqa: E731
            first = await ae.submit([item("r1"), item("r2")])  # two waiting: the queue is full
            with pytest.raises(QueueFull):
                await ae.submit([item("r3")])
            first.close()  # abort frees the queue
            for _ in range(200):
                if fake.aborted == ["r1", "r2"]:
                    break
                await asyncio.sleep(0.01)
            assert fake.aborted == ["r1", "r2"]
            assert await ae.stats() == {"waiting": 0}
            second = await ae.submit([item("r3")])
            second.close()
        finally:
            ae.shutdown()

    asyncio.run(scenario())


def test_app_reports_503_until_the_engine_is_built():
    from fastapi.testclient import TestClient

    from slserve.api.server import create_app

    gate = threading.Event()

    def build(_config):
        gate.wait(30)
        return FakeEngine()

    ae = AsyncEngine(EngineConfig(), engine_factory=build)
    with TestClient(create_app(ae)) as client:
        r = client.get("/health")
        assert_error(r, 503, "not_ready")
        assert_error(client.post("/v1/completions", json={"model": "fake", "prompt": "x"}), 503)
        gate.set()
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.01)
        assert client.get("/health").json() == {"status": "ok", "failed_steps": 0}


# -- OpenAI routes against the offline API -----------------------------------------------------------


def test_health_was_503_while_loading(server):
    assert server.health_codes[-1] == 200
    assert 503 in server.health_codes, server.health_codes
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "failed_steps": 0}


@pytest.mark.parametrize("model", [BASE, "ad1"])
@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_offline(server, offline, model, stream):
    client = openai_client(server.url)
    adapter = None if model == BASE else model
    want = offline(PROMPT, adapter, 8)
    if stream:
        chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                                stream=True))
        assert all(c.object == "text_completion" and c.model == model for c in chunks)
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    else:
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
        assert r.usage.completion_tokens == len(want.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert text == want.text
    assert finish == want.finish_reason


def test_adapter_logprobs_equal_offline(server, offline):
    """The adapter is applied: its logprobs differ from the base model's and match the offline API."""
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=0)
    llm = offline.llm
    base, ad1 = (llm.generate(PROMPT, params, a)[0] for a in (None, "ad1"))
    client = openai_client(server.url)
    for model, want in ((BASE, base), ("ad1", ad1)):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0)
        got = r.choices[0].logprobs.token_logprobs
        assert got == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)
    shift = max(abs(a.logprob - b.logprob) for a, b in zip(base.logprobs, ad1.logprobs, strict=True))
    assert shift > 1e-3


@pytest.mark.parametrize("model", [BASE, "ad1"])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_offline(server, offline, model, stream):
    client = openai_client(server.url)
    want = offline(chat_prompt(offline, CHAT), None if model == BASE else model, 8)
    if stream:
        chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=8,
                                                     temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
        assert r.usage.completion_tokens == len(want.token_ids)
    assert text == want.text
    assert finish == want.finish_reason


def test_prompt_forms_and_max_completion_tokens(server, offline):
    client = openai_client(server.url)
    want = offline(PROMPT, None, 4)
    ids = offline.llm.tokenizer.encode(PROMPT)
    for prompt in (ids, [PROMPT]):
        r = client.completions.create(model=BASE, prompt=prompt, max_tokens=4, temperature=0)
        assert r.choices[0].text == want.text
    r = client.chat.completions.create(model=BASE, messages=CHAT, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_sse_wire_format_and_usage(server):
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])

    chat = {"model": BASE, "messages": CHAT, "max_tokens": 3, "temperature": 0, "stream": True}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60)
    chunks = [json.loads(e[len("data: "):]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c and c["object"] == "chat.completion.chunk" for c in chunks)

    client = openai_client(server.url)
    chunks = list(client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=3, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_logprobs(server):
    client = openai_client(server.url)
    r = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(t) >= 2 for t in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(lp.token_logprobs[i] == max(lp.top_logprobs[i].values()) for i in range(4))

    r = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert content[0].top_logprobs[0].token == content[0].token
    assert content[0].bytes == list(content[0].token.encode())


def test_n_seed_stop_and_ignore_eos(server, offline):
    client = openai_client(server.url)
    r = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1] and r.usage.completion_tokens == 12
    again = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7, n=2)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible

    want = offline(PROMPT, None, 8, (",",))
    r = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=8, temperature=0, stop=[","])
    assert r.choices[0].finish_reason == "stop" == want.finish_reason and r.choices[0].text == want.text

    r = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=5, temperature=0.7, top_p=0.9, seed=1,
                                  extra_body={"top_k": 5, "ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_several_prompts_and_n(server, offline):
    client = openai_client(server.url)
    r = client.completions.create(model=BASE, prompt=[PROMPT, "The capital of France is"], max_tokens=4,
                                  temperature=0, n=2)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] == by_index[1] == offline(PROMPT, None, 4).text
    assert by_index[2] == by_index[3] == offline("The capital of France is", None, 4).text
    prompt_tokens = sum(len(offline.llm.tokenizer.encode(x)) for x in (PROMPT, "The capital of France is"))
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.completion_tokens == 16


def test_idle_server_does_not_spin(server):
    stat = Path(f"/proc/{server.proc.pid}/stat")
    if not stat.exists():
        pytest.skip("needs /proc")

    def cpu_seconds() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu_seconds()
    time.sleep(2.0)
    assert cpu_seconds() - before < 0.2


def test_models(server):
    models = {m.id: m for m in openai_client(server.url).models.list().data}
    assert models[BASE].owned_by == "slserve" and models[BASE].object == "model"
    ad = models["ad1"]
    assert ad.parent == BASE and ad.root and ad.owned_by == "slserve"


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("temperature", -1), ("top_p", 0), ("max_tokens", 0), ("n", 0),
                                              ("logprobs", 99), ("top_k", -5)])
def test_invalid_values_are_400(server, field, value):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": BASE, "prompt": PROMPT, field: value})
    assert_error(r, 400, param=field)


def test_prompt_too_long_is_400(server, offline):
    long_prompt = [1] * offline.llm.engine.max_model_len
    body = {"model": BASE, "prompt": long_prompt, "max_tokens": 4}
    r = httpx.post(f"{server.url}/v1/completions", json=body)
    assert_error(r, 400, param="prompt")
    r = httpx.post(f"{server.url}/v1/chat/completions",
                   json={"model": BASE, "messages": CHAT, "max_tokens": 10**6})
    assert_error(r, 400, param="max_tokens")


def test_malformed_bodies_are_422(server):
    url = f"{server.url}/v1/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 422)
    assert_error(httpx.post(url, json={"model": BASE}), 422, param="prompt")
    assert_error(httpx.post(f"{server.url}/v1/chat/completions", json={"model": BASE}), 422, param="messages")
    assert_error(httpx.post(url, json={"model": BASE, "prompt": PROMPT, "max_tokens": "many"}), 422,
                 param="max_tokens")


def test_unknown_model_and_route_are_404(server):
    client = openai_client(server.url)
    for call in (lambda: client.completions.create(model="nope", prompt=PROMPT, max_tokens=2),
                 lambda: client.chat.completions.create(model="nope", messages=CHAT, max_tokens=2)):
        with pytest.raises(Exception) as info:
            call()
        assert info.value.status_code == 404 and info.value.code == "model_not_found"
    assert_error(httpx.get(f"{server.url}/v1/adapters/nope"), 404)
    assert_error(httpx.get(f"{server.url}/v1/nothing-here"), 404)


# -- adapter routes ----------------------------------------------------------------------------------


def test_adapter_objects(server):
    r = httpx.get(f"{server.url}/v1/adapters/ad1")
    assert r.status_code == 200, r.text
    card = r.json()
    assert card["id"] == "ad1" and card["object"] == "adapter" and card["parent"] == BASE
    assert card["ranks"] == {"q_proj": 8, "v_proj": 8}
    assert sorted(card["target_modules"]) == ["q_proj", "v_proj"]
    assert card["size_bytes"] > 0 and card["created"] > 0 and card["resident"] in ("disk", "host", "device")
    listed = httpx.get(f"{server.url}/v1/adapters").json()
    assert listed["object"] == "list" and "ad1" in [a["id"] for a in listed["data"]]


def test_upload_conflict_replace_delete(server, adapter_srcs, offline):
    client = openai_client(server.url)
    url = server.url
    assert upload(url, "swap", adapter_srcs["ad1"]).status_code == 201
    first = client.completions.create(model="swap", prompt=PROMPT, max_tokens=8, temperature=0)
    assert first.choices[0].text == offline(PROMPT, "ad1", 8).text
    assert_error(upload(url, "swap", adapter_srcs["ad2"]), 409)
    r = upload(url, "swap", adapter_srcs["ad2"], replace=True)
    assert r.status_code == 201, r.text
    second = client.completions.create(model="swap", prompt=PROMPT, max_tokens=8, temperature=0)
    assert second.choices[0].text == offline(PROMPT, "ad2", 8).text
    r = httpx.delete(f"{url}/v1/adapters/swap")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert_error(httpx.get(f"{url}/v1/adapters/swap"), 404)
    assert_error(httpx.delete(f"{url}/v1/adapters/swap"), 404)
    r = httpx.post(f"{url}/v1/completions", json={"model": "swap", "prompt": PROMPT, "max_tokens": 2})
    assert_error(r, 404, "model_not_found")


def test_bad_uploads_change_nothing(server, adapter_srcs):
    url = server.url
    before = httpx.get(f"{url}/v1/adapters").json()
    src = adapter_srcs["ad1"]
    err = assert_error(upload(url, "broken", src, weights=b"\x00" * 1000), 400)
    assert "broken" in err["message"]
    err = assert_error(upload(url, "ad1", src, replace=True, weights=b"junk"), 400)  # a failed replace
    assert_error(upload(url, "../evil", src), 400)
    assert_error(upload(url, "x" * 65, src), 400)
    r = httpx.post(f"{url}/v1/adapters", data={"name": "nofiles"})
    assert_error(r, 422)
    r = httpx.post(f"{url}/v1/adapters", json={"name": "x"})
    assert_error(r, 422)
    assert httpx.get(f"{url}/v1/adapters").json() == before
    assert not (server.adapter_dir / "broken").exists()
    r = openai_client(url).completions.create(model="ad1", prompt=PROMPT, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_vllm_adapter_routes(server, adapter_srcs, offline):
    url = server.url
    load = f"{url}/v1/load_lora_adapter"
    r = httpx.post(load, json={"lora_name": "vl", "lora_path": str(adapter_srcs["ad2"])})
    assert r.status_code == 200, r.text
    r = openai_client(url).completions.create(model="vl", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].text == offline(PROMPT, "ad2", 8).text
    assert_error(httpx.post(load, json={"lora_name": "vl", "lora_path": str(adapter_srcs["ad1"])}), 409)
    assert_error(httpx.post(load, json={"lora_name": "vl2", "lora_path": "/nonexistent"}), 400)
    inplace = {"lora_name": "vl", "lora_path": str(adapter_srcs["ad1"]), "load_inplace": True}
    r = httpx.post(load, json=inplace)
    assert r.status_code == 200, r.text
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "vl"}).status_code == 200
    assert_error(httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "vl"}), 404)


def test_delete_while_running_lets_the_request_finish(server, adapter_srcs, offline):
    url = server.url
    assert upload(url, "doomed", adapter_srcs["ad2"]).status_code == 201
    want = offline(PROMPT, "ad2", 16)
    stream = openai_client(url).completions.create(model="doomed", prompt=PROMPT, max_tokens=16,
                                                   temperature=0, stream=True)
    chunks = iter(stream)
    texts = [next(chunks).choices[0].text]  # it runs, so its adapter is pinned on the device
    assert httpx.delete(f"{url}/v1/adapters/doomed").status_code == 200
    rest = list(chunks)
    texts += [c.choices[0].text for c in rest]
    assert "".join(texts) == want.text and rest[-1].choices[0].finish_reason == want.finish_reason
    r = httpx.post(f"{url}/v1/completions", json={"model": "doomed", "prompt": PROMPT, "max_tokens": 2})
    assert_error(r, 404, "model_not_found")


# -- ops ---------------------------------------------------------------------------------------------


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_disconnect_mid_stream_frees_pages(server):
    url = server.url
    assert _wait_for(lambda: metric(scrape(url), "slserve_num_requests_running") == 0)
    idle = scrape(url)
    idle_kv = metric(idle, "slserve_pool_pages", owner="kv")
    idle_free = metric(idle, "slserve_pool_pages", owner="free")
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 64, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 2:
                busy = scrape(url)
                break  # leaving the iteration early makes httpx close the connection
    assert metric(busy, "slserve_num_requests_running") == 1
    assert metric(busy, "slserve_pool_pages", owner="kv") > idle_kv
    # The connection is closed without reading the rest: the request is aborted, its pages freed.
    assert _wait_for(lambda: metric(scrape(url), "slserve_pool_pages", owner="kv") == idle_kv)
    after = scrape(url)
    assert metric(after, "slserve_pool_pages", owner="free") == idle_free
    assert metric(after, "slserve_num_requests_running") == 0
    tokens = "slserve_generation_tokens_total"
    assert metric(after, tokens) - metric(idle, tokens) < 64


def test_metrics_families_move(server):
    url = server.url
    before = scrape(url)
    r = openai_client(url).completions.create(model="ad1", prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    after = scrape(url)
    route = {"route": "/v1/completions", "method": "POST", "status": "200"}
    moved = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)  # noqa: E731
    assert moved("slserve_http_requests_total", **route) == 1
    assert moved("slserve_time_to_first_token_seconds_count") == 1
    assert moved("slserve_e2e_request_latency_seconds_count") == 1
    assert moved("slserve_inter_token_latency_seconds_count") == 3
    assert moved("slserve_generation_tokens_total") == 4
    assert moved("slserve_prompt_tokens_total") == r.usage.prompt_tokens
    steps = moved("slserve_engine_steps_total")
    assert steps >= 4 and moved("slserve_step_adapters_total") == steps  # ad1 alone, every step
    per_step = moved("slserve_step_adapter_bytes_total") / steps
    assert per_step > 0 and per_step == int(per_step)
    assert metric(after, "slserve_adapters", tier="device") >= 1
    assert metric(after, "slserve_pool_pages", owner="adapter") > 0
    assert metric(after, "slserve_adapters", tier="disk") >= 1
    for name, labels in [("slserve_num_requests_waiting", {}), ("slserve_adapters", {"tier": "host"}),
                         ("slserve_adapter_loads_total", {"tier": "device"}),
                         ("slserve_adapter_evictions_total", {"tier": "device"}),
                         ("slserve_pool_pages", {"owner": "free"})]:
        assert (name, tuple(sorted(labels.items()))) in after, name
    assert metric(after, "slserve_adapter_loads_total", tier="device") >= 1
    assert_error(httpx.get(f"{url}/v1/adapters/nope"), 404)
    again = scrape(url)
    assert metric(again, "slserve_http_requests_total", route="/v1/adapters/{name}", method="GET",
                  status="404") >= 1


def test_uploads_survive_a_restart(server, offline):
    server.stop()
    server.start()
    server.wait_ready()
    r = httpx.get(f"{server.url}/v1/adapters/ad1")
    assert r.status_code == 200 and r.json()["resident"] == "disk"
    r = openai_client(server.url).completions.create(model="ad1", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].text == offline(PROMPT, "ad1", 8).text


# -- auth, limits, back-pressure -----------------------------------------------------------------------


def test_auth(guarded, adapter_srcs):
    url = guarded.url
    assert httpx.get(f"{url}/health").status_code == 200  # ops routes are open
    assert httpx.get(f"{url}/metrics").status_code == 200
    assert_error(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key")
    assert_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(Exception) as info:
        openai_client(url, "wrong").models.list()
    assert info.value.status_code == 401
    ids = [m.id for m in openai_client(url, API_KEY).models.list().data]
    assert ids == [BASE]
    r = openai_client(url, API_KEY).completions.create(model=BASE, prompt=PROMPT, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2

    assert_error(upload(url, "small", adapter_srcs["small"]), 401)
    assert_error(upload(url, "small", adapter_srcs["small"], key=API_KEY), 403)
    as_user = {"Authorization": f"Bearer {API_KEY}"}
    assert_error(httpx.delete(f"{url}/v1/adapters/small", headers=as_user), 403)
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "small"}, headers=as_user)
    assert_error(r, 403)
    r = upload(url, "small", adapter_srcs["small"], key=ADMIN_KEY)
    assert r.status_code == 201, r.text
    assert r.json()["ranks"] == {"q_proj": 2}
    user = openai_client(url, API_KEY)
    r = user.completions.create(model="small", prompt=PROMPT, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
    r = httpx.delete(f"{url}/v1/adapters/small", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200


def test_upload_too_large_is_413(guarded, adapter_srcs):
    url = guarded.url
    src = adapter_srcs["ad1"]  # ~1.8 MB, the limit is 1 MiB
    assert_error(upload(url, "big", src, key=ADMIN_KEY), 413)

    # Without a Content-Length the server counts while reading.
    boundary = "slserveboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="config"; filename="c.json"\r\n\r\n'.encode(),
        (src / "adapter_config.json").read_bytes(),
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'.encode(),
        (src / "adapter_model.safetensors").read_bytes(),
        f"\r\n--{boundary}--\r\n".encode(),
    ]

    def chunked():
        for part in parts:
            for i in range(0, len(part), 1 << 16):
                yield part[i : i + 1 << 16]

    r = httpx.post(f"{url}/v1/adapters", content=chunked(), timeout=60, headers={
        "Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_error(r, 413)
    assert "big" not in [a["id"] for a in httpx.get(
        f"{url}/v1/adapters", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]]


def test_queue_full_is_429(guarded):
    """--max-num-seqs 1 --max-queue 1: one request runs, one waits, the rest are refused."""

    async def fire() -> list[httpx.Response]:
        body = {"model": BASE, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        async with httpx.AsyncClient(base_url=guarded.url, timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(6)))

    responses = asyncio.run(fire())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes, codes
    assert set(codes) <= {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert_error(refused, 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in responses if r.status_code == 200)
