"""Hostile values from issue 15 (defects 2, 3, 4, 8): extreme integers and temperatures, lone
surrogates, and NaN left in the pool by an overflowing adapter. Each must end as a 400 (or 404)
in OpenAI's error format naming the parameter, or be served correctly; never a 500, never a dead
engine, never another request's garbage.

The HTTP cases drive the real app (`create_app`) with a real engine through Starlette's
TestClient, which runs the app's lifespan; bodies with lone surrogates are sent as raw JSON
(`\\ud800` escapes), as a hostile client would.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from slserve import LLM, SamplingParams
from slserve.config import EngineConfig
from slserve.request import Request
from slserve.sampling import Sampler, _scaled_logits
from slserve.sampling_params import GREEDY_TEMPERATURE

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PROMPT = "The history of the printing press begins in the fifteenth century, when movable type"
INT64_MAX = 2**63 - 1


# -- the sampler (defects 2 and 4) ------------------------------------------------------------------


def _requests(*params: SamplingParams) -> list[Request]:
    return [Request(f"r{i}", [1], p, None) for i, p in enumerate(params)]


def _logits(rows: int, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 5


@pytest.mark.parametrize("top_k", [1000, 1001, 2**31, 2**63, INT64_MAX])
def test_top_k_at_or_above_vocab_is_off(top_k):
    """Defect 2: top_k = 2**63 overflowed int64 in the sampler and killed the engine thread."""
    logits = _logits(4)
    off = Sampler(0)(logits, _requests(*[SamplingParams(temperature=1.0, seed=s) for s in range(4)]))
    huge = Sampler(0)(logits, _requests(*[SamplingParams(temperature=1.0, top_k=top_k, seed=s)
                                          for s in range(4)]))
    assert huge == off


def test_top_k_below_vocab_still_filters():
    logits = _logits(1)
    allowed = set(logits[0].topk(3).indices.tolist())
    params = [SamplingParams(temperature=100.0, top_k=3, seed=s) for s in range(64)]
    tokens, _ = Sampler(0)(logits.expand(64, -1).contiguous(), _requests(*params))
    assert set(tokens) <= allowed and len(set(tokens)) > 1


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-30, 1e-6, 0.0])
def test_tiny_temperature_is_greedy(temperature):
    """Defect 4: temperature 1e-300 gave NaN probabilities and token 0."""
    logits = _logits(8, seed=1)
    params = [SamplingParams(temperature=temperature, top_k=k, top_p=p, seed=s)
              for s, (k, p) in enumerate([(-1, 1.0), (5, 1.0), (-1, 0.5), (5, 0.9)] * 2)]
    assert all(p.greedy for p in params)
    tokens, _ = Sampler(0)(logits, _requests(*params))
    assert tokens == logits.argmax(-1).tolist()


EXTREME_ROWS = [
    [3e38, -3e38, 0.0, 1.0],  # differences overflow float32
    [float("inf"), 1.0, float("-inf"), 0.0],
    [float("-inf"), float("-inf"), 2.0, float("-inf")],
    [float("nan"), 1.0, 2.0, 0.0],
    [-3e38, -3e38, -3e38, -3e38],
    [float("inf"), float("inf"), 0.0, 0.0],
]


@pytest.mark.parametrize("temperature", [GREEDY_TEMPERATURE, 1e-3, 1.0, 100.0])
def test_probabilities_never_nan_for_extreme_logits(temperature):
    logits = torch.tensor(EXTREME_ROWS)
    temps = torch.full((len(EXTREME_ROWS),), temperature)
    probs = _scaled_logits(logits, temps).softmax(-1)
    assert not probs.isnan().any()
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(EXTREME_ROWS)))
    # The most likely token keeps the largest probability (NaN counts as lowest).
    clean = logits.nan_to_num(nan=float("-inf"))
    assert (probs.gather(1, clean.argmax(-1, keepdim=True)).squeeze(1) == probs.max(-1).values).all()
    tokens, _ = Sampler(0)(logits, _requests(*[SamplingParams(temperature=temperature, seed=i)
                                               for i in range(len(EXTREME_ROWS))]))
    picked = probs[torch.arange(len(tokens)), torch.tensor(tokens)]
    assert (picked > 0).all()


def test_smallest_sampling_temperature_picks_the_argmax():
    logits = _logits(16, seed=2) * 1e6  # gaps far above temperature: the distribution is one-hot
    params = [SamplingParams(temperature=GREEDY_TEMPERATURE, seed=s) for s in range(16)]
    assert not params[0].greedy
    tokens, _ = Sampler(0)(logits, _requests(*params))
    assert tokens == logits.argmax(-1).tolist()


# -- stale NaN in the pool (defect 3, end to end) --------------------------------------------------


def _poison_free_pages(llm: LLM) -> int:
    """Fill every free page of the pool with NaN, as an adapter whose K/V overflowed would leave
    them after its request finished. Returns the number of pages poisoned."""
    pool, storage = llm.engine.pool, llm.engine.runner.storage
    n = 0
    for start, count in pool.free_runs():
        storage[start : start + count] = float("nan")
        n += count
    return n


def test_stale_nan_pages_do_not_reach_later_requests(tmp_path):
    """Greedy output of a prompt whose last page is partly filled, in an engine whose every free
    page holds NaN, equals the output of a fresh engine (whose greedy output equals HF
    transformers', tests/test_engine.py::test_greedy_matches_transformers). Before the fix the
    prefill attention read the stale NaN through the -inf mask and decoded garbage."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    fresh = LLM(dtype="float32", pool_bytes=32 << 20, adapter_dir=str(tmp_path / "a"))
    ids = fresh.tokenizer.encode(PROMPT)
    prompts = [ids, ids[:5], ids[:17]]
    assert all(len(p) % fresh.engine.config.page_tokens for p in prompts)
    expected = [o.token_ids for o in fresh.generate(prompts, params)]
    del fresh

    poisoned = LLM(dtype="float32", pool_bytes=32 << 20, adapter_dir=str(tmp_path / "b"))
    assert _poison_free_pages(poisoned) == poisoned.engine.pool.num_pages
    assert [o.token_ids for o in poisoned.generate(prompts, params)] == expected
    # Pages freed by those requests are reused by the next ones, tails and all.
    _poison_free_pages(poisoned)
    assert [o.token_ids for o in poisoned.generate(prompts[::-1], params)] == expected[::-1]


# -- the HTTP layer (defects 2, 4, 8) --------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from slserve.api.server import create_app
    from slserve.async_engine import AsyncEngine

    config = EngineConfig(dtype="float32", pool_bytes=64 << 20,
                          adapter_dir=str(tmp_path_factory.mktemp("adapters")))
    with TestClient(create_app(AsyncEngine(config))) as c:
        deadline = time.monotonic() + 300
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the engine did not start"
            time.sleep(0.1)
        yield c


def _raw(client, path: str, body: str):
    """POST a JSON body given as text, so that it can carry \\ud800 escapes."""
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


def assert_openai_error(r, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] == param, body
    return body["error"]


def _completion(client, **fields):
    return client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **fields})


def test_huge_top_k_is_served_and_equals_no_top_k(client):
    """Defect 2 through HTTP: the request works, equals sampling without top_k, and the engine
    is still alive for the next request."""
    for top_k in (2**63, INT64_MAX, 10**30):
        r = _completion(client, top_k=top_k, temperature=1.0, seed=7)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == _completion(client, temperature=1.0, seed=7).json()[
            "choices"][0]["text"]
    assert _completion(client).status_code == 200


def test_tiny_temperature_equals_greedy_over_http(client):
    greedy = _completion(client, temperature=0).json()["choices"][0]["text"]
    for t in (1e-300, 5e-324, 1e-6):
        assert _completion(client, temperature=t).json()["choices"][0]["text"] == greedy


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": INT64_MAX, "n": 2}, "seed"),  # seed + 1 overflows
        ({"seed": -(10**40)}, "seed"),
        ({"logprobs": 2**63}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"max_tokens": 2**63}, "max_tokens"),
        ({"max_tokens": -(2**63)}, "max_tokens"),
        ({"n": 2**63}, "n"),
        ({"top_k": -(2**63)}, "top_k"),
        ({"stop_token_ids": [2**64]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"prompt": [2**63]}, "prompt"),
        ({"prompt": [-(2**63) - 1]}, "prompt"),
        ({"prompt": [[5, 2**64]]}, "prompt"),
    ],
)
def test_out_of_range_integers_are_400(client, fields, param):
    assert_openai_error(_completion(client, **fields), 400, param)


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", ["1e999", "-1e999", "NaN", "Infinity"])
def test_nonfinite_floats_are_400(client, field, value):
    """Python's JSON parser turns these into inf and NaN."""
    assert_openai_error(_raw(client, "/v1/completions", f'{{"prompt": "x", "{field}": {value}}}'), 400, field)


def test_in_range_extreme_integers_work(client):
    for fields in ({"seed": INT64_MAX}, {"seed": -(2**63)}, {"seed": INT64_MAX - 1, "n": 2},
                   {"stop_token_ids": [INT64_MAX]}, {"max_tokens": 1}, {"logprobs": 20}):
        r = _completion(client, **fields)
        assert r.status_code == 200, (fields, r.text)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 2, "seed": -(2**63), "top_k": 2**63,
                                                 "logprobs": True, "top_logprobs": 20})
    assert r.status_code == 200, r.text


def test_chat_out_of_range_integers_are_400(client):
    messages = [{"role": "user", "content": "Hi"}]
    cases = [({"seed": 2**64}, "seed"), ({"top_logprobs": 2**63, "logprobs": True}, "top_logprobs"),
             ({"max_completion_tokens": -1}, "max_tokens"), ({"n": 0}, "n")]
    for fields, param in cases:
        r = client.post("/v1/chat/completions", json={"messages": messages, **fields})
        assert_openai_error(r, 400, param)


SURROGATE = "a\\ud800b"  # JSON text: a lone high surrogate between two letters
COMPLETION_SURROGATES = {
    "prompt": f'{{"prompt": "{SURROGATE}"}}',
    "prompt_list": f'{{"prompt": ["ok", "{SURROGATE}"]}}',
    "model": f'{{"prompt": "x", "model": "{SURROGATE}"}}',
    "stop": f'{{"prompt": "x", "stop": "{SURROGATE}"}}',
    "stop_list": f'{{"prompt": "x", "stop": ["ok", "{SURROGATE}"]}}',
    "user": f'{{"prompt": "x", "user": "{SURROGATE}"}}',
    "low_surrogate": '{"prompt": "a\\udc80b"}',
}
CHAT_SURROGATES = {
    "content": f'{{"messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}',
    "content_part": (f'{{"messages": [{{"role": "user", '
                     f'"content": [{{"type": "text", "text": "{SURROGATE}"}}]}}]}}'),
    "role": f'{{"messages": [{{"role": "{SURROGATE}", "content": "x"}}]}}',
    "message_name": f'{{"messages": [{{"role": "user", "content": "x", "name": "{SURROGATE}"}}]}}',
    "model": f'{{"messages": [{{"role": "user", "content": "x"}}], "model": "{SURROGATE}"}}',
}


@pytest.mark.parametrize("case", list(COMPLETION_SURROGATES))
def test_lone_surrogate_in_completion_is_400(client, case):
    """Defect 8: a lone surrogate reached the tokenizer or an error message as a 500."""
    param = case.split("_")[0] if case != "low_surrogate" else "prompt"
    assert_openai_error(_raw(client, "/v1/completions", COMPLETION_SURROGATES[case]), 400, param)


@pytest.mark.parametrize("case", list(CHAT_SURROGATES))
def test_lone_surrogate_in_chat_is_400(client, case):
    param = "model" if case == "model" else "messages"
    assert_openai_error(_raw(client, "/v1/chat/completions", CHAT_SURROGATES[case]), 400, param)


def test_surrogate_pairs_are_text_not_errors(client):
    """A surrogate pair in JSON is one character (here U+1F600), not a lone surrogate."""
    r = _raw(client, "/v1/completions", '{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}')
    assert r.status_code == 200, r.text


def test_unknown_model_name_is_404(client):
    error = assert_openai_error(_completion(client, model="no-such-adapter"), 404, "model")
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/load_lora_adapter", f'{{"lora_name": "{SURROGATE}", "lora_path": "/tmp/x"}}', "lora_name"),
        ("/v1/load_lora_adapter", f'{{"lora_name": "ok", "lora_path": "/tmp/{SURROGATE}"}}', "lora_path"),
        ("/v1/unload_lora_adapter", f'{{"lora_name": "{SURROGATE}"}}', "lora_name"),
    ],
)
def test_lone_surrogate_in_adapter_routes_is_400(client, path, body, param):
    assert_openai_error(_raw(client, path, body), 400, param)


def test_bad_adapter_names_in_upload_and_paths_are_4xx(client):
    # A multipart field cannot carry a lone surrogate in UTF-8; CESU-8 bytes are the closest thing.
    files = {"config": ("c.json", b"{}"), "weights": ("w.safetensors", b"")}
    for name in (b"a\xed\xa0\x80b", b"\xff\xfe", "a\u00e9".encode()):
        r = client.post("/v1/adapters", data={"name": name}, files=files)
        assert r.status_code == 400, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    for path in ("/v1/adapters/a%ED%A0%80b", "/v1/adapters/%FF"):
        assert_openai_error(client.get(path), 404, "name")
        r = client.delete(path)
        assert r.status_code in (400, 404) and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # The engine still serves.
    assert _completion(client).status_code == 200



# -- adapters that overflow once applied (defect 3, at upload) -------------------------------------


@pytest.fixture(scope="module")
def peft_adapter_files(tmp_path_factory) -> tuple[bytes, dict]:
    """A real peft adapter on the served model, with a large but realistic lora_alpha (256 at
    r = 8: scale 32) on every module: (config bytes, tensors)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from slserve.model.loader import resolve_model
    from tests.peft_util import ALL_TARGETS, make_peft_adapter

    base = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32)
    path = make_peft_adapter(base, tmp_path_factory.mktemp("peft"), r=8, targets=ALL_TARGETS, seed=3,
                             alpha=256)
    return (path / "adapter_config.json").read_bytes(), load_file(path / "adapter_model.safetensors")


def _upload(client, name: str, config: bytes, tensors: dict):
    from safetensors.torch import save

    files = {"config": ("adapter_config.json", config),
             "weights": ("adapter_model.safetensors", save(tensors))}
    return client.post("/v1/adapters", data={"name": name}, files=files)


def test_overflowing_adapters_are_refused_and_normal_ones_served(client, peft_adapter_files):
    config, tensors = peft_adapter_files
    assert _upload(client, "normal", config, tensors).status_code == 201
    assert _completion(client, model="normal", temperature=0).status_code == 200

    huge_alpha = json.dumps({**json.loads(config), "lora_alpha": 1e30}).encode()
    key = next(k for k in tensors if "layers.3.self_attn.v_proj.lora_B" in k)
    huge_weights = {**tensors, key: torch.full_like(tensors[key], 3e38)}
    for name, cfg, weights in [("alpha", huge_alpha, tensors), ("weights", config, huge_weights)]:
        error = assert_openai_error(_upload(client, name, cfg, weights), 400, None)
        assert error["code"] == "invalid_adapter" and "beyond the bound" in error["message"], error
        assert_openai_error(_completion(client, model=name), 404, "model")
