"""slserve on Ray Serve end to end: one local Ray cluster (127.0.0.1, no dashboard) for the whole
module, the application of `slserve.deploy.ray_app` with two engine replicas, and the official
openai client against its ingress.

Greedy output is compared with the offline API (`slserve.LLM`) in this process, for the base
model and for adapters made with the real peft library. `ad1` is copied into the shared adapter
directory by hand before start-up; `ad2` is uploaded through the ingress during the tests. The
replicas themselves are reached directly through their deployment handle's broadcast, which
shows what each one serves; the last test kills one replica's process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from slserve.config import EngineConfig
from tests import test_server
from tests.test_server import BASE, PROMPT, THREADS, _free_port, metric, openai_client, scrape, upload

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from slserve.deploy import RayConfig, ray_app  # noqa: E402
from slserve.deploy.app import ENGINE_DEPLOYMENT  # noqa: E402
from slserve.deploy.asgi import HTTPRequest  # noqa: E402
from slserve.deploy.ingress import REPLICA_HEADER  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

# The peft-made adapters (ad1, ad2) and the offline reference of the single-process server's tests.
adapter_srcs = test_server.adapter_srcs
offline = test_server.offline

ROOT = Path(__file__).resolve().parents[1]
APP = "slserve-test"
MAX_TOKENS = 12
STARTUP_TIMEOUT = 600


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, adapter_srcs):
    """The deployment: ad1 sits in the shared adapter directory before the replicas start."""
    root = tmp_path_factory.mktemp("ray")
    shared = root / "shared-adapters"
    shared.mkdir()
    shutil.copytree(adapter_srcs["ad1"], shared / "ad1")
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(THREADS)}
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    ray.init(address="local", num_cpus=3, include_dashboard=False, object_store_memory=80 << 20,
             runtime_env={"env_vars": env}, log_to_driver=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = EngineConfig(dtype="float32", pool_bytes=128 << 20, host_cache_bytes=64 << 20,
                              threads=THREADS, adapter_dir=str(shared), drain_timeout=5)
        ray_config = RayConfig(replicas=2, replica_cpus=1, ingress_cpus=0.5,
                               local_adapter_root=str(root / "local"), app_name=APP)
        serve.run(ray_app(config, ray_config), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def expected(offline, prompt: str, adapter: str | None) -> str:
    return offline(prompt, adapter, MAX_TOKENS).text


def complete(url: str, model: str, prompt: str = PROMPT, **kwargs) -> tuple[str, str]:
    """(text, replica) of a greedy completion through the ingress."""
    completions = openai_client(url).completions.with_raw_response
    raw = completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **kwargs)
    return raw.parse().choices[0].text, raw.headers[REPLICA_HEADER]


def engines():
    return serve.get_deployment_handle(ENGINE_DEPLOYMENT, APP)


def on_every_replica(method: str, path: str, payload: dict | None = None) -> dict[str, tuple[int, bytes]]:
    """replica -> (status, body) of one request sent to each replica directly."""
    body = json.dumps(payload).encode() if payload is not None else b""
    headers = [(b"content-type", b"application/json")] if payload is not None else []
    answers = engines().broadcast("request", HTTPRequest(method, path, headers=headers, body=body)).results(
        timeout_s=120)
    return {replica: (status, content) for replica, status, content in answers}


def completion_text(body: bytes) -> str:
    return json.loads(body)["choices"][0]["text"]


def replica_infos() -> list[dict]:
    """Of the live replicas: a replica that just died answers with an error, skipped here."""
    answers = engines().broadcast("info").results(timeout_s=60, return_exceptions=True)
    return [a for a in answers if not isinstance(a, BaseException)]


# -- tests ----------------------------------------------------------------------------------------


def test_base_and_adapter_equal_offline(cluster, offline):
    for model, adapter in ((BASE, None), ("ad1", "ad1")):
        text, _ = complete(cluster, model)
        assert text == expected(offline, PROMPT, adapter), model
    # Chat, streamed: the replica's app formats it, the ingress passes the events through.
    messages = [{"role": "user", "content": "Name a color."}]
    prompt = offline.llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    stream = openai_client(cluster).chat.completions.create(model="ad1", messages=messages, temperature=0,
                                                            max_tokens=MAX_TOKENS, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected(offline, prompt, "ad1")


def test_errors_are_the_apps(cluster):
    r = httpx.post(f"{cluster}/v1/completions", json={"model": "no-such-adapter", "prompt": "x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = httpx.post(f"{cluster}/v1/completions", content=b"{not json", timeout=60)
    assert r.status_code == 422 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


def test_a_client_that_leaves_mid_stream_aborts_its_request(cluster):
    """The ingress cancels the replica's generator; the replica's app sees the disconnect."""
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{cluster}/v1/completions", json=body, timeout=60) as r:
        replica = r.headers[REPLICA_HEADER]
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 30
    while metric(scrape(cluster), "slserve_num_requests_running", replica=replica) > 0:
        assert time.monotonic() < deadline, "the request kept running after the client left"
        time.sleep(0.2)
    assert metric(scrape(cluster), "slserve_generation_tokens_total", replica=replica) < 1000


def test_same_adapter_same_replica(cluster):
    _, first = complete(cluster, "ad1")
    time.sleep(1.0)  # the replica's hold on ad1 reaches the router (pushed every 0.1 s)
    before = scrape(cluster)
    replicas = [complete(cluster, "ad1")[1] for _ in range(6)]
    assert replicas == [first] * 6
    after = scrape(cluster)
    name = "slserve_replica_requests_total"
    assert metric(after, name, replica=first) - metric(before, name, replica=first) >= 6


@pytest.fixture(scope="module")
def uploaded(cluster, adapter_srcs) -> str:
    """ad2, uploaded through the ingress."""
    r = upload(cluster, "ad2", adapter_srcs["ad2"])
    assert r.status_code == 201, r.text
    return "ad2"


def test_upload_replace_delete_reach_every_replica(cluster, uploaded, offline, adapter_srcs):
    assert complete(cluster, "ad2")[0] == expected(offline, PROMPT, "ad2")
    request = {"model": "ad2", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    answers = on_every_replica("POST", "/v1/completions", request)
    assert len(answers) == 2
    for replica, (status, body) in answers.items():
        assert status == 200, (replica, body)
        assert completion_text(body) == expected(offline, PROMPT, "ad2")
    # Another name: taken (409), replaced by ad1's weights on both replicas, deleted from both.
    assert upload(cluster, "other", adapter_srcs["ad2"]).status_code == 201
    assert upload(cluster, "other", adapter_srcs["ad1"]).status_code == 409
    assert upload(cluster, "other", adapter_srcs["ad1"], replace=True).status_code == 201
    request["model"] = "other"
    for replica, (status, body) in on_every_replica("POST", "/v1/completions", request).items():
        assert status == 200 and completion_text(body) == expected(offline, PROMPT, "ad1"), replica
    assert httpx.delete(f"{cluster}/v1/adapters/other", timeout=60).status_code == 200
    for replica, (status, _) in on_every_replica("GET", "/v1/adapters/other").items():
        assert status == 404, replica


def test_a_killed_replica(cluster, uploaded, offline):
    _, victim = complete(cluster, "ad1")
    time.sleep(1.0)
    pid = next(i["pid"] for i in replica_infos() if i["replica"] == victim)
    # A long request for ad1 runs on the victim when it dies.
    outcome: dict[str, BaseException] = {}

    def long_request() -> None:
        try:
            openai_client(cluster).completions.create(model="ad1", prompt=PROMPT, max_tokens=2000,
                                                      temperature=0, extra_body={"ignore_eos": True})
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 60
    while metric(scrape(cluster), "slserve_num_requests_running", replica=victim) < 1:
        assert time.monotonic() < deadline, "the long request never ran"
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    thread.join(120)
    err = outcome.get("error")
    assert isinstance(err, openai.APIStatusError) and err.status_code == 503, err
    assert err.body["code"] == "replica_died" and victim in err.body["message"]

    # The service goes on answering, from the other replica, with the same output.
    for model, adapter in ((BASE, None), ("ad1", "ad1"), ("ad2", "ad2")):
        text, replica = complete(cluster, model)
        assert text == expected(offline, PROMPT, adapter) and replica != victim

    # Ray Serve starts a replacement, which serves every stored adapter.
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        infos = replica_infos()
        if len(infos) == 2 and all(i["pid"] != pid for i in infos):
            break
        assert time.monotonic() < deadline, infos
        time.sleep(2)
    request = {"model": "ad2", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    for replica, (status, body) in on_every_replica("POST", "/v1/completions", request).items():
        assert status == 200 and completion_text(body) == expected(offline, PROMPT, "ad2"), replica
