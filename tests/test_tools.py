"""Tool calling in chat completions: `tools`, `tool_choice`, `parallel_tool_calls` and tool messages.

The output parser runs on fixed strings (Hermes/Qwen `<tool_call>` blocks and plain JSON calls),
whole and fed one character at a time as a stream would, which must agree. End to end, two real
servers start at once and are driven by the openai client: the embedded model with its own
template (which renders no tools) and the same weights with a Hermes-style template that does.
The model is tiny, so what is checked is the mechanics, never its judgement: a forced call
(named function or "required") always parses and its arguments validate against the function's
schema (jsonschema); "auto" parses a Hermes call that a regex makes the model write; the prompt
with tools and tool messages equals transformers' apply_chat_template(tools=...).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from slserve.api import tools as t
from slserve.api.errors import APIError
from slserve.model.loader import load_tokenizer, resolve_model
from tests.test_server import BASE, ServerProcess, assert_error, openai_client

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]
slow = pytest.mark.slow

HERMES = "hermes-smollm"
# Qwen2.5's layout, cut down: tools in the system turn, calls in <tool_call> tags, tool results
# as <tool_response> in a user turn.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}{% for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "required": ["a", "b"], "additionalProperties": False,
                                  "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters: no arguments
TOOLS = [WEATHER, ADD, CLOCK]
SCHEMAS = {tool["function"]["name"]: tool["function"].get("parameters", t._NO_PARAMETERS) for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# A finished exchange: the assistant called a tool and got its result.
HISTORY = [*ASK,
           {"role": "assistant", "content": None, "tool_calls": [{
               "id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]


# -- the parser on fixed strings ------------------------------------------------------------------


def _streamed(plan: t.ToolPlan, text: str) -> tuple[str | None, list[t.ToolCall] | None]:
    parser = plan.parser()
    content, deltas = [], []
    for ch in [*text, None]:
        piece, calls = parser.feed(ch) if ch is not None else parser.finish()
        content.append(piece)
        deltas += calls
    calls = t.merge_deltas(deltas)
    return ("".join(content) or None if calls else "".join(content)), calls or None


def _calls(calls: list[t.ToolCall] | None) -> list[tuple[str, dict]] | None:
    return None if calls is None else [(c.function.name, json.loads(c.function.arguments)) for c in calls]


CITY = ("get_weather", {"city": "Paris", "unit": "celsius"})
PARSE_CASES = {
    "hermes": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
               '</tool_call>', None, [CITY]),
    "hermes after content": ('Let me check. <tool_call>{"name": "get_weather", "arguments": '
                             '{"city": "Paris", "unit": "celsius"}}</tool_call>', "Let me check. ", [CITY]),
    "hermes, two, unclosed last": ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
                                   '<tool_call>{"name": "get_time", "arguments": {}}',
                                   None, [("add", {"a": 1, "b": 2}), ("get_time", {})]),
    "hermes, arguments as text": (
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>', None,
        [("add", {"a": 1, "b": 2})]),
    "plain json, parameters": ('  {"name": "get_time", "parameters": {}}', None, [("get_time", {})]),
    "plain json list": ('[{"name": "add", "arguments": {"a": 3, "b": 4}}, {"name": "get_time"}]', None,
                        [("add", {"a": 3, "b": 4}), ("get_time", {})]),
    "content": ("Paris is sunny today.", "Paris is sunny today.", None),
    "content ending like a tag": ("Use <tool_ca", "Use <tool_ca", None),
    "unknown function": ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
                         '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', None),
    "truncated call": ('<tool_call>{"name": "add", "arguments": {"a": 1',
                       '<tool_call>{"name": "add", "arguments": {"a": 1', None),
    "json that is no call": ('{"city": "Paris"}', '{"city": "Paris"}', None),
    "arguments not an object": ('{"name": "add", "arguments": [1, 2]}',
                                '{"name": "add", "arguments": [1, 2]}', None),
}


@pytest.mark.parametrize("case", PARSE_CASES)
def test_auto_parser_whole_and_streamed(case):
    text, content, calls = PARSE_CASES[case]
    plan = t.plan_tools(TOOLS, "auto", None, template_reads=True)
    for got_content, got_calls in (t.parse_output(plan, text), _streamed(plan, text)):
        assert got_content == content and _calls(got_calls) == calls


def test_streamed_content_is_sent_until_a_tag_starts():
    plan = t.plan_tools(TOOLS, "auto", None, template_reads=True)
    parser = plan.parser()
    assert parser.feed("Hello <tool") == ("Hello ", [])  # "<tool" may open a call: held
    assert parser.feed("box> ok") == ("<toolbox> ok", [])  # it did not
    assert parser.feed(' <tool_call>{"name": "get_time"}') == (" ", [])
    content, deltas = parser.finish()
    assert content == "" and parser.called
    (d,) = deltas
    assert d.index == 0 and d.id.startswith("call_") and d.type == "function"
    assert (d.function.name, d.function.arguments) == ("get_time", "{}")


def test_parallel_tool_calls_false_keeps_the_first_call():
    plan = t.plan_tools(TOOLS, "auto", False, template_reads=True)
    text = ('<tool_call>{"name": "get_time"}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}')
    assert _calls(t.parse_output(plan, text)[1]) == [("get_time", {})]


def test_named_and_required_plans_constrain_the_output():
    named = t.plan_tools(TOOLS, {"type": "function", "function": {"name": "add"}}, None, template_reads=False)
    assert named.constraint().json == ADD["function"]["parameters"]
    content, calls = t.parse_output(named, '{"a": 1, "b": 2}')
    assert content is None and _calls(calls) == [("add", {"a": 1, "b": 2})]
    required = t.plan_tools(TOOLS, "required", None, template_reads=False).constraint().json
    both = [{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_time", "arguments": {}}]
    jsonschema.validate(both, required)
    for wrong in ([], [{"name": "add", "arguments": {"a": 1}}], [{"name": "nope", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, required)
    single = t.plan_tools(TOOLS, "required", False, template_reads=False).constraint().json
    jsonschema.validate({"name": "get_time", "arguments": {}}, single)


@pytest.mark.parametrize("template_reads", [True, False])
def test_tool_messages_for_the_template(template_reads):
    """Calls in the history reach a template that reads them (arguments as objects) even when the
    request has no tools; one that does not gets them written into the content."""
    plan = t.plan_tools(None, None, None, template_reads=template_reads)
    messages = t.template_messages([{**m, "content": m["content"] or ""} for m in HISTORY], plan)
    call = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    if template_reads:
        assert messages[1]["tool_calls"] == [{"id": "call_1", "type": "function", "function": call}]
    else:
        assert "tool_calls" not in messages[1] and json.loads(messages[1]["content"]) == call
    assert messages[2] == HISTORY[2] and len(messages) == 3


def test_template_detection():
    assert not t.template_reads_tools(load_tokenizer(resolve_model(None)))
    assert t.template_reads_tools(type("Tok", (), {"chat_template": HERMES_TEMPLATE})())
    named = {"default": "x", "tool_use": "{{ tools }}"}
    assert t.template_reads_tools(type("Tok", (), {"chat_template": named})())


BAD_PLANS = {
    "unknown named function": (TOOLS, {"type": "function", "function": {"name": "no"}}, None, "tool_choice"),
    "tool_choice not a choice": (TOOLS, "sometimes", None, "tool_choice"),
    "tool_choice without a name": (TOOLS, {"type": "function"}, None, "tool_choice"),
    "required without tools": (None, "required", None, "tool_choice"),
    "parallel_tool_calls without tools": (None, None, True, "parallel_tool_calls"),
    "tool without function": ([{"type": "function"}], None, None, "tools"),
    "tool of another type": ([{"type": "retrieval", "function": {"name": "f"}}], None, None, "tools"),
    "bad function name": ([{"type": "function", "function": {"name": "get weather"}}], None, None, "tools"),
    "parameters not an object": ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], None,
                                 None, "tools"),
    "duplicate names": ([ADD, ADD], None, None, "tools"),
    "too many tools": ([{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)], None, None,
                       "tools"),
}


@pytest.mark.parametrize("case", BAD_PLANS)
def test_invalid_tools_are_400_naming_the_field(case):
    tools, choice, parallel, param = BAD_PLANS[case]
    with pytest.raises(APIError) as info:
        t.plan_tools(tools, choice, parallel, template_reads=True)
    assert info.value.status == 400 and info.value.param == param


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hermes_dir(tmp_path_factory):
    """The embedded model's files with a Hermes-style chat template (weights linked, not copied)."""
    src, out = resolve_model(None), tmp_path_factory.mktemp("models") / HERMES
    out.mkdir()
    for f in src.iterdir():
        if f.name == "model.safetensors":
            (out / f.name).symlink_to(f)
        elif f.name != "chat_template.jinja":
            shutil.copy(f, out / f.name)
    (out / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory, hermes_dir):
    """(plain: the embedded model's template, hermes: a template that renders tools), started at once."""
    root = tmp_path_factory.mktemp("tools")
    plain = ServerProcess(root / "adapters-plain", root / "plain.log")
    hermes = ServerProcess(root / "adapters-hermes", root / "hermes.log", "--model", str(hermes_dir))
    plain.start()
    hermes.start()
    try:
        plain.wait_ready()
        hermes.wait_ready()
        yield plain, hermes
    finally:
        plain.stop()
        hermes.stop()


def _check_calls(choice, names: set[str]) -> list:
    calls = choice.message.tool_calls
    assert calls and choice.finish_reason == "tool_calls" and choice.message.content is None
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)
    return calls


def _stream_calls(client, **kwargs) -> tuple[list[dict], str, str]:
    """A streamed answer's tool calls rebuilt from their deltas, its content and finish reason."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name  # the first piece names the call
                calls[d.index] = {"name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None
            calls[d.index]["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], content, finish


@slow
@pytest.mark.parametrize("which", ["plain", "hermes"])
def test_named_function_gives_schema_valid_arguments(servers, which):
    """Whatever the template: the plain one gets the tools in a system message."""
    server, model = (servers[0], BASE) if which == "plain" else (servers[1], HERMES)
    client = openai_client(server.url)
    names = ("get_weather", "add", "get_time") if which == "plain" else ("add",)

    def ask(name: str, stream: bool = False):
        args = dict(model=model, messages=ASK, tools=TOOLS, max_tokens=40, temperature=0,
                    tool_choice={"type": "function", "function": {"name": name}})
        return _stream_calls(client, **args) if stream else client.chat.completions.create(**args)

    with ThreadPoolExecutor(len(names) + 1) as pool:  # one batch
        outs = pool.map(ask, names)
        streamed = pool.submit(ask, "add", True)  # its arguments stream as they are generated
        calls = {name: _check_calls(out.choices[0], {name})[0] for name, out in zip(names, outs, strict=True)}
        assert streamed.result() == ([{"name": "add", "arguments": calls["add"].function.arguments}], "",
                                     "tool_calls")


@slow
def test_required_gives_schema_valid_calls(servers):
    plain, hermes = servers
    # parallel (a JSON array of calls), sampled, with the tools described in a system message
    with ThreadPoolExecutor(1) as pool:
        sampled = pool.submit(openai_client(plain.url).chat.completions.create, model=BASE, messages=ASK,
                              tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0.8,
                              seed=3, n=2)
        # one call, after a finished exchange, with the tools in the template
        client = openai_client(hermes.url)
        args = dict(model=HERMES, messages=HISTORY, tools=[WEATHER, CLOCK], tool_choice="required",
                    parallel_tool_calls=False, max_tokens=40, temperature=0)
        (call,) = _check_calls(client.chat.completions.create(**args).choices[0], {"get_weather", "get_time"})
        streamed, content, finish = _stream_calls(client, **args)
        assert streamed == [{"name": call.function.name, "arguments": call.function.arguments}]
        assert finish == "tool_calls"
        for choice in sampled.result().choices:
            _check_calls(choice, set(SCHEMAS))


# A regex that makes the model write Hermes calls, so that "auto" has calls to parse.
ONE_CALL = r'<tool_call>\{"name": "add", "arguments": \{"a": 1, "b": 2\}\}</tool_call>'
TWO_CALLS = ONE_CALL + r'\n<tool_call>\{"name": "get_time"\}</tool_call>'


@slow
def test_auto_parses_the_templates_calls(servers):
    client = openai_client(servers[1].url)
    args = dict(model=HERMES, messages=ASK, tools=TOOLS, max_tokens=120,
                extra_body={"guided_regex": TWO_CALLS})
    with ThreadPoolExecutor(3) as pool:  # one batch
        out, streamed, single = pool.map(lambda f: f(), [
            lambda: client.chat.completions.create(**args),
            lambda: _stream_calls(client, **args),
            lambda: client.chat.completions.create(**args, parallel_tool_calls=False)])
    calls = _check_calls(out.choices[0], set(SCHEMAS))
    assert _calls(calls) == [("add", {"a": 1, "b": 2}), ("get_time", {})]
    assert streamed == ([{"name": c.function.name, "arguments": c.function.arguments} for c in calls], "",
                        "tool_calls")
    (one,) = _check_calls(single.choices[0], set(SCHEMAS))
    assert one.function.name == "add"
    # Plain text stays content; "none" never parses.
    text = client.chat.completions.create(model=HERMES, messages=ASK, tools=TOOLS, max_tokens=8,
                                          extra_body={"guided_regex": "It is sunny"}).choices[0]
    assert (text.message.content, text.message.tool_calls) == ("It is sunny", None)
    assert text.finish_reason == "stop"
    none = client.chat.completions.create(**{**args, "tool_choice": "none",
                                             "extra_body": {"guided_regex": ONE_CALL}})
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content.startswith("<tool_call>")


@slow
def test_prompt_with_tools_and_tool_messages_is_the_templates(servers, hermes_dir):
    from transformers import AutoTokenizer

    plain, hermes = servers
    reference = AutoTokenizer.from_pretrained(str(hermes_dir))
    # Templates read a call's arguments as an object (vLLM passes them so too).
    history = [*HISTORY[:1], {**HISTORY[1], "content": "", "tool_calls": [{
        **HISTORY[1]["tool_calls"][0], "function": {"name": "get_weather",
                                                    "arguments": {"city": "Paris", "unit": "celsius"}}}]},
               HISTORY[2]]
    text = reference.apply_chat_template(history, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "<tools>" in text and "<tool_response>" in text and '"arguments": {"city": "Paris"' in text
    expected = reference.encode(text, add_special_tokens=False)
    r = httpx.post(f"{hermes.url}/tokenize", json={"messages": HISTORY, "tools": TOOLS}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == expected
    out = openai_client(hermes.url).chat.completions.create(model=HERMES, messages=HISTORY, tools=TOOLS,
                                                            max_tokens=4)
    assert out.usage.prompt_tokens == len(expected)
    # A template without tools: the conversation is accepted ("none"), the tools are not rendered.
    out = openai_client(plain.url).chat.completions.create(model=BASE, messages=HISTORY, tools=TOOLS,
                                                           tool_choice="none", max_tokens=4)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")


@slow
def test_invalid_tool_requests_are_400_naming_the_field(servers):
    plain, hermes = servers
    client = openai_client(plain.url)
    named = {"type": "function", "function": {"name": "add"}}
    cases = [
        (dict(tools=TOOLS), "tools"),  # "auto" with a template that renders no tools
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tools=[{"type": "function", "function": {"description": "no name"}}], tool_choice="required"),
         "tools"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(parallel_tool_calls=False), "parallel_tool_calls"),
        (dict(tools=TOOLS, tool_choice=named, response_format={"type": "json_object"}), "tool_choice"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
              tool_choice="required"), "tools"),  # a schema xgrammar cannot compile
        (dict(messages=[*ASK, {"role": "tool", "content": "18 degrees"}], tools=TOOLS, tool_choice=named),
         "messages"),
        (dict(messages=[*ASK, {**HISTORY[1], "tool_calls": [{
            "id": "c", "type": "function", "function": {"name": "add", "arguments": "{oops"}}]}],
              tools=TOOLS, tool_choice=named), "messages"),
    ]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**{"model": BASE, "messages": ASK, "max_tokens": 4, **fields})
        assert info.value.body["param"] == param, (fields, info.value.body)
    # /tokenize renders tools only with a template that does.
    r = httpx.post(f"{plain.url}/tokenize", json={"messages": ASK, "tools": TOOLS}, timeout=30)
    assert_error(r, 400, param="tools")
    # Nothing was disturbed: the servers still answer.
    out = openai_client(hermes.url).chat.completions.create(model=HERMES, messages=ASK, max_tokens=2)
    assert out.choices[0].message.tool_calls is None


@slow
def test_unknown_chat_fields_are_ignored_with_a_logged_warning(servers):
    r = httpx.post(f"{servers[0].url}/v1/chat/completions", timeout=60,
                   json={"model": BASE, "messages": ASK, "max_tokens": 2, "surely_not_a_tool_field": 1})
    assert r.status_code == 200, r.text
    log = servers[0].log_tail(20000)
    assert "ignored unknown fields of a ChatCompletionRequest: 'surely_not_a_tool_field'" in log
