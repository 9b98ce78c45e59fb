"""`slserve serve --tp 2` end to end: the openai client against a real server whose model runs on
two processes, and what happens to every process when the server stops or a worker dies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from slserve import LLM, SamplingParams
from tests.peft_util import ALL_TARGETS, make_peft_adapter
from tests.test_server import ServerProcess, upload
from tests.tiny_llama import write_tiny_llama


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tp-server")
    model_dir = write_tiny_llama(root)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    adapter = make_peft_adapter(base, root / "lora", 16, ALL_TARGETS, seed=3, std=0.05)
    return root, model_dir, adapter


def _server(root: Path, model_dir: Path, name: str, *flags: str) -> ServerProcess:
    server = ServerProcess(root / f"adapters-{name}", root / f"{name}.log", "--model", str(model_dir),
                           "--tp", "2", "--dtype", "float32", *flags)
    server.start()
    server.wait_ready()
    return server


def test_tp2_server_answers_the_openai_client(setup):
    root, model_dir, adapter = setup
    server = _server(root, model_dir, "serve")
    try:
        workers = _children(server.proc.pid)
        assert len(workers) >= 1, "the server runs its tensor-parallel worker"
        assert upload(server.url, "ad", adapter).status_code == 201
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
        model = client.models.list().data[0].id
        prompt = "The quick brown fox"
        got = {a: client.completions.create(model=a or model, prompt=prompt, max_tokens=8,
                                            temperature=0).choices[0].text
               for a in (None, "ad")}
        messages = [{"role": "user", "content": "Hi there"}]
        chat = client.chat.completions.create(model="ad", messages=messages, max_tokens=8,
                                              temperature=0).choices[0].message.content
        stream = client.chat.completions.create(model="ad", messages=messages, max_tokens=8,
                                                temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == chat
    finally:
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(60)
    assert code == 0, server.log_tail()
    assert _wait_gone(workers, 10) == [], "a worker outlived the server"

    # The same requests in process at TP=1 (itself checked against transformers in test_tp.py).
    llm = LLM(model=str(model_dir), dtype="float32", pool_bytes=64 << 20, adapter_dir=str(root / "offline"))
    llm.add_adapter("ad", adapter)
    params = SamplingParams(temperature=0, max_tokens=8)
    for a, text in got.items():
        assert llm.generate([prompt], params, adapters=[a])[0].text == text
    messages = [{"role": "user", "content": "Hi there"}]
    chat_prompt = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert llm.generate([chat_prompt], params, adapters=["ad"])[0].text == chat
    assert got[None] != got["ad"]


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_lost_worker_ends_every_process(setup, how):
    """A worker killed, or stopped mid-request (a hang: caught by --tp-timeout), brings the server
    down with a non-zero exit within seconds, and no process is left behind."""
    root, model_dir, _ = setup
    server = _server(root, model_dir, how, "--tp-timeout", "3")
    workers = _children(server.proc.pid)
    try:
        assert workers
        worker = max(workers)
        if how == "kill":
            os.kill(worker, signal.SIGKILL)
        else:
            os.kill(worker, signal.SIGSTOP)
            with pytest.raises(httpx.HTTPError):
                r = httpx.post(f"{server.url}/v1/completions", timeout=30,
                               json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 64})
                r.raise_for_status()
        t0 = time.monotonic()
        code = server.proc.wait(30)
        assert code != 0
        assert time.monotonic() - t0 < 15
        assert "tensor-parallel" in server.log_tail()
        assert _wait_gone(workers, 10) == [], "a worker outlived the server"
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if server.proc.poll() is None:
            server.proc.kill()
