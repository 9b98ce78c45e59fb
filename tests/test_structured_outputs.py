"""Structured outputs: OpenAI's `response_format` (json_object, json_schema) and vLLM's
guided_json / guided_regex / guided_choice / guided_grammar, compiled by xgrammar into token
masks that the batched sampler applies to the constrained rows only.

The references are independent of slserve: `jsonschema` validates every JSON output against its
schema, Python's `re` checks regex outputs, xgrammar's own `apply_token_bitmask_inplace` checks
the mask unpacking, and transformers (float32, greedy) gives what the unconstrained requests of a
mixed batch must still produce. Everything else goes through the real openai client against a
real server with peft-made adapters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pytest
import torch

from slserve.model.loader import load_tokenizer, resolve_model
from slserve.request import Request
from slserve.sampling import Sampler
from slserve.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams
from slserve.structured import GrammarError, Grammars, fill_masks
from tests.peft_util import make_peft_adapter
from tests.test_server import BASE, THREADS, ServerProcess, assert_error, openai_client, upload

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]
slow = pytest.mark.slow

S = StructuredOutputsParams


def _int(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _str(n: int) -> dict:
    return {"type": "string", "maxLength": n}


def _obj(required: bool = True, **props) -> dict:
    return {"type": "object", "properties": props, **({"required": list(props)} if required else {})}


# Twenty shapes: flat and nested objects, arrays of scalars, enums and objects, numbers and
# integers with inclusive and exclusive bounds, required and optional fields, nullables, anyOf,
# const, patterns, $ref and a top-level enum. Strings and arrays are bounded so that a greedy small
# model, which happily repeats itself, still reaches the end within max_tokens.
SCHEMAS: dict[str, dict] = {
    "person": _obj(name=_str(24), age=_int(0, 120)),
    "color_enum": _obj(color={"enum": ["red", "green", "blue"]}),
    "bounded_number": _obj(temperature={"type": "number", "minimum": -50, "maximum": 60}),
    "boolean_flag": _obj(answer={"type": "boolean"}, confidence=_int(1, 5)),
    "nested_address": _obj(name=_str(20), address=_obj(city=_str(20),
                                                       zip={"type": "string", "pattern": "^[0-9]{5}$"})),
    "string_list": _obj(fruits={"type": "array", "items": _str(12), "minItems": 1, "maxItems": 3}),
    "int_array": {"type": "array", "items": _int(1, 9), "minItems": 2, "maxItems": 4},
    "enum_array": _obj(days={"type": "array", "items": {"enum": ["mon", "tue", "wed"]},
                             "minItems": 1, "maxItems": 3}),
    "array_of_objects": _obj(items={"type": "array", "minItems": 1, "maxItems": 2,
                                    "items": _obj(sku=_str(8), qty=_int(1, 99))}),
    "deeply_nested": _obj(a=_obj(b=_obj(c=_int(0, 10)))),
    "mixed_types": _obj(title=_str(30), pages=_int(1, 2000),
                        price={"type": "number", "minimum": 0, "maximum": 100}, in_stock={"type": "boolean"}),
    "optional_fields": {**_obj(required=False, id=_int(1, 1000), note=_str(16)), "required": ["id"],
                        "additionalProperties": False},
    "nullable": _obj(middle_name={"type": ["string", "null"], "maxLength": 10}),
    "any_of": _obj(value={"anyOf": [_int(0, 9), {"enum": ["none"]}]}),
    "const_and_enum": _obj(version={"const": 2}, level={"enum": [1, 2, 3]}),
    "date_pattern": _obj(date={"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}),
    "matrix": _obj(rows={"type": "array", "minItems": 2, "maxItems": 2,
                         "items": {"type": "array", "items": _int(0, 9), "minItems": 2, "maxItems": 2}}),
    "top_level_enum": {"enum": ["yes", "no", "maybe"]},
    "ref_definitions": {"$defs": {"point": _obj(x=_int(-9, 9), y=_int(-9, 9))},
                        **_obj(start={"$ref": "#/$defs/point"}, end={"$ref": "#/$defs/point"})},
    "exclusive_bounds": _obj(ratio={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                             count={"type": "integer", "exclusiveMinimum": 0, "maximum": 5}),
}
MAX_TOKENS = 160  # the longest output above takes ~50 tokens with the embedded model


def messages(name: str) -> list[dict]:
    return [{"role": "user", "content": f"Reply with a JSON value for: {name.replace('_', ' ')}."}]


def assert_valid(text: str, finish_reason: str, schema: dict) -> None:
    assert finish_reason == "stop", (finish_reason, text)
    jsonschema.validate(json.loads(text), schema)


# -- without a server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grammars():
    tokenizer = load_tokenizer(resolve_model(None))
    return Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def test_mask_unpacking_matches_xgrammar(grammars):
    import xgrammar as xgr

    matchers = [grammars.matcher(S(json=SCHEMAS["person"])), grammars.matcher(S(regex=r"[0-9]+")),
                grammars.matcher(S(choice=("yes", "no")))]
    assert matchers[0].accept_string('{"name": "A')  # mid-way through a string: most tokens allowed
    allowed = fill_masks(matchers, grammars.vocab_size)
    bitmask = xgr.allocate_token_bitmask(len(matchers), grammars.vocab_size)
    for row, m in enumerate(matchers):
        m.fill_next_token_bitmask(bitmask, row)
    reference = torch.zeros(len(matchers), grammars.vocab_size)
    xgr.apply_token_bitmask_inplace(reference, bitmask)
    assert torch.equal(allowed, reference == 0)
    assert 0 < int(allowed[2].sum()) < 10 < int(allowed[0].sum())


def test_grammar_compiled_once_per_spec(grammars):
    before = grammars.compiled
    for _ in range(3):
        grammars.matcher(S(json={"type": "object", "properties": {"k": {"type": "integer"}}}))
        grammars.matcher(S(json='{"type": "object", "properties": {"k": {"type": "integer"}}}'))
        grammars.matcher(S(regex="a|b"))
    assert grammars.compiled - before == 2  # a dict and its JSON text are the same spec


@pytest.mark.parametrize("spec,words", [
    (S(json={"type": "objectx"}), "Unsupported type"),
    (S(json="{not json"), "JSON"),
    (S(regex="(ab"), "parenthesis"),
    (S(grammar="root ::= missing"), 'Rule "missing" is not defined'),
    (S(grammar="root ::= root"), "matches no output"),
])
def test_specs_that_cannot_compile_name_the_problem(grammars, spec, words):
    with pytest.raises(GrammarError) as info:
        grammars.compile(spec)
    assert words in str(info.value) and not str(info.value).startswith("[")


def test_params_refuse_ambiguous_or_empty_specs():
    for kwargs in ({}, {"regex": "a", "grammar": "root ::= \"a\""}, {"choice": []}, {"choice": ["a", ""]}):
        with pytest.raises(SamplingParamsError):
            S(**kwargs)
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(min_tokens=2, structured_outputs=S(regex="a+"))
    assert info.value.param == "min_tokens"


def test_sampler_masks_only_constrained_rows(grammars):
    vocab = grammars.vocab_size
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    free = [Request(f"f{i}", [1, 2, 3], SamplingParams(temperature=0)) for i in range(2)]
    tokenizer = load_tokenizer(resolve_model(None))
    digits = Request("d", [1, 2, 3], SamplingParams(temperature=0.7, seed=3))
    digits.matcher = grammars.matcher(S(regex="[0-9]{3}"))
    choice = Request("c", [1, 2, 3], SamplingParams(temperature=0))
    choice.matcher = grammars.matcher(S(choice=("red", "green")))
    sampler = Sampler(seed=0)
    tokens, _ = sampler(logits, [free[0], digits, free[1], choice])
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    assert re.fullmatch("[0-9]+", tokenizer.decode([tokens[1]]))
    first = tokenizer.decode([tokens[3]])
    assert "red".startswith(first) or "green".startswith(first)
    # Without constrained rows the sampler reads the logits as they are (no copy, no mask).
    assert sampler._process(logits, free) is logits


def test_seeded_constrained_request_is_reproducible_whatever_the_batch(grammars):
    """The same seeded, constrained request sampled over several steps (the same logits row each
    step) alone and inside batches of other seeded, unseeded, constrained and free requests draws
    the same tokens."""
    vocab = grammars.vocab_size

    def run(others: int) -> list[int]:
        req = Request("me", [1, 2], SamplingParams(temperature=1.3, seed=42))
        req.matcher = grammars.matcher(S(regex="[a-z]{2,12}"))
        batch = [Request(f"o{i}", [3], SamplingParams(temperature=0.9, seed=i if i % 2 else None))
                 for i in range(others)]
        for other in batch[::3]:
            other.matcher = grammars.matcher(S(regex="[0-9]{8,9}"))  # not complete within 4 steps
        mine, theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(others)
        sampler = Sampler(seed=others)
        tokens = []
        for _ in range(4):
            rows = [*batch[: others // 2], req, *batch[others // 2:]]
            logits = torch.randn(len(rows), vocab, generator=theirs)
            logits[others // 2] = torch.randn(vocab, generator=mine)
            out, _ = sampler(logits, rows)
            for row, token in zip(rows, out, strict=True):
                assert row.matcher is None or row.matcher.accept_token(token)
            tokens.append(out[others // 2])
        return tokens

    alone = run(0)
    assert run(5) == alone and run(12) == alone


# -- through the openai client against a real server ---------------------------------------------


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(resolve_model(None))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield SimpleNamespace(model=model, tokenizer=AutoTokenizer.from_pretrained(path))
    torch.set_num_threads(threads)


@contextmanager
def server_with_adapters(root: Path, make_adapters: Callable[[], dict[str, Path]]) -> Iterator[ServerProcess]:
    """A real server (float32) with the adapters `make_adapters` writes (while the server loads)
    uploaded under their names."""
    proc = ServerProcess(root / "adapters", root / "server.log")
    proc.start()
    try:
        adapters = make_adapters()
        proc.wait_ready()
        for name, path in adapters.items():
            r = upload(proc.url, name, path)
            assert r.status_code == 201, r.text
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, hf):
    """Two peft-made LoRA adapters."""
    root = tmp_path_factory.mktemp("structured")
    with server_with_adapters(root, lambda: {
        "lora-q": make_peft_adapter(hf.model, root / "q", r=2, targets=["q_proj"], seed=0),
        "lora-vo": make_peft_adapter(hf.model, root / "vo", r=8, targets=["v_proj", "o_proj"], seed=1,
                                     std=0.05),
    }) as proc:
        yield proc


@torch.no_grad()
def hf_greedy(hf, ids: list[int], max_tokens: int) -> str:
    out = hf.model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
    return hf.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


@slow
def test_twenty_schemas_one_at_a_time(server):
    client = openai_client(server.url)
    for name, schema in SCHEMAS.items():
        out = client.chat.completions.create(
            model=BASE, messages=messages(name), temperature=0, max_tokens=MAX_TOKENS,
            response_format={"type": "json_schema",
                             "json_schema": {"name": name, "schema": schema, "strict": True}})
        choice = out.choices[0]
        assert_valid(choice.message.content, choice.finish_reason, schema)


@slow
def test_twenty_schemas_in_a_mixed_batch_with_adapters(server, hf):
    """All twenty at once through /v1/completions (vLLM's guided_json), spread over the base model
    and two adapters, some sampled, next to unconstrained requests, which must still produce
    exactly what transformers produces for them."""
    client = openai_client(server.url)
    models = [BASE, "lora-q", "lora-vo"]
    free_prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]

    def constrained(k: int, name: str):
        prompt = hf.tokenizer.apply_chat_template(messages(name), tokenize=False, add_generation_prompt=True)
        out = client.completions.create(
            model=models[k % 3], prompt=prompt, max_tokens=MAX_TOKENS, temperature=0 if k % 2 else 0.8,
            seed=k, extra_body={"guided_json": SCHEMAS[name]})
        return out.choices[0]

    def free(prompt: str):
        return client.completions.create(model=BASE, prompt=prompt, max_tokens=8, temperature=0).choices[0]

    with ThreadPoolExecutor(len(SCHEMAS) + len(free_prompts)) as pool:
        guided = [pool.submit(constrained, k, name) for k, name in enumerate(SCHEMAS)]
        unguided = [pool.submit(free, prompt) for prompt in free_prompts]
        for future, schema in zip(guided, SCHEMAS.values(), strict=True):
            choice = future.result()
            assert_valid(choice.text, choice.finish_reason, schema)
        for future, prompt in zip(unguided, free_prompts, strict=True):
            assert future.result().text == hf_greedy(hf, hf.tokenizer.encode(prompt), 8)


@slow
def test_json_object_regex_choice_and_grammar(server):
    client = openai_client(server.url)
    chat = [{"role": "user", "content": "Describe a cat as a JSON object."}]
    out = client.chat.completions.create(model="lora-q", messages=chat, temperature=0, max_tokens=MAX_TOKENS,
                                         response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)

    phone = r"\(\d{3}\) \d{3}-\d{4}"
    out = client.completions.create(model=BASE, prompt="Call me at", max_tokens=30, temperature=0.9, seed=7,
                                    extra_body={"guided_regex": phone})
    assert out.choices[0].finish_reason == "stop" and re.fullmatch(phone, out.choices[0].text), out.choices[0]

    choices = ["sunny", "rainy", "snowy with a \"blizzard\""]
    out = client.chat.completions.create(model="lora-vo", messages=[{"role": "user", "content": "Weather?"}],
                                         n=3, temperature=1.0, seed=1, extra_body={"guided_choice": choices})
    assert all(c.message.content in choices and c.finish_reason == "stop" for c in out.choices)

    grammar = 'root ::= "The answer is " digit digit "."\ndigit ::= [0-9]'
    out = client.completions.create(model=BASE, prompt="Q: 6 x 7? A:", max_tokens=20, temperature=0,
                                    extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"The answer is [0-9]{2}\.", out.choices[0].text), out.choices[0]


@slow
def test_vllm_structured_outputs_extra(server):
    client = openai_client(server.url)
    schema = SCHEMAS["ref_definitions"]
    out = client.completions.create(model="lora-q", prompt="A line from (1, 2) to (3, 4) in JSON:",
                                    max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body={"structured_outputs": {"json": schema}})
    assert_valid(out.choices[0].text, out.choices[0].finish_reason, schema)
    year = "(19|20)[0-9]{2}"
    out = client.chat.completions.create(model=BASE, messages=messages("a year"), max_tokens=10,
                                         temperature=0, extra_body={"structured_outputs": {"regex": year}})
    assert re.fullmatch(year, out.choices[0].message.content), out.choices[0]
    # Its options this server lacks are refused as unknown fields, never dropped.
    r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": BASE, "prompt": "x", "structured_outputs": {"regex": "a", "disable_any_whitespace": True}})
    assert r.status_code == 422 and "disable_any_whitespace" in r.text, r.text


@slow
def test_streamed_structured_output_concatenates_to_valid_json(server):
    client = openai_client(server.url)
    schema = SCHEMAS["array_of_objects"]
    stream = client.chat.completions.create(
        model="lora-vo", messages=messages("order"), temperature=0, max_tokens=MAX_TOKENS, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "order", "schema": schema}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert_valid(text, chunks[-1].choices[0].finish_reason, schema)


BAD_SPECS = [
    ({"guided_json": {"type": "objectx"}}, "guided_json", "Unsupported type"),
    ({"guided_json": "{nope"}, "guided_json", "not valid JSON"),
    ({"guided_json": "[1, 2]"}, "guided_json", "JSON object"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "parenthesis"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar", "undefined_rule"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
     "response_format", "JSON schema"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one of"),
    ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens", "min_tokens"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"json": "[1]"}}, "structured_outputs.json", "JSON object"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs", 'Rule "x" is not defined'),
]


@slow
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_specs_that_cannot_compile_are_400_naming_them(server, route):
    base = ({"model": BASE, "prompt": "x"} if route == "completions"
            else {"model": BASE, "messages": [{"role": "user", "content": "x"}]})
    url = f"{server.url}/v1/{'chat/' if route == 'chat' else ''}completions"
    for fields, param, words in BAD_SPECS:
        err = assert_error(httpx.post(url, json={**base, **fields, "max_tokens": 4}, timeout=60), 400,
                           param=param)
        assert words in err["message"], err
    # A wrong type stays pydantic's 422; the server goes on serving.
    r = httpx.post(url, json={**base, "response_format": {"type": "xml"}}, timeout=60)
    assert r.status_code == 422, r.text
    r = httpx.post(url, json={**base, "guided_choice": ["ok"], "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text


@slow
def test_bad_schema_through_the_openai_client(server):
    client = openai_client(server.url)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="lora-q", messages=messages("x"),
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert info.value.body["param"] == "response_format"
    assert "nope" in info.value.body["message"]
