"""Tool calling for chat completions: `tools` and `tool_choice` checked, the conversation's tool
messages prepared for the chat template, the output constraint of a forced call, and the parsers
that turn generated text into OpenAI tool calls, whole or as stream deltas.

    tool_choice "none"      no tool calls; the tools still reach a template that reads them
                "auto"      the template's tools section; the output parsed (Hermes/Qwen
                            `<tool_call>{...}</tool_call>`, or plain JSON), plain content otherwise;
                            a template that ignores tools is a 400 naming `tools`
                "required"  the output constrained (xgrammar) to calls of the listed tools
                {"type": "function", "function": {"name": f}}   constrained to f's arguments
A forced call works with any template: one that ignores tools gets them described in a system
message instead.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from slserve.api.errors import APIError
from slserve.sampling_params import StructuredOutputsParams

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CALL_OPEN, _CALL_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_TEMPLATE_TOOLS = re.compile(r"\btools\b")
# What an empty `parameters` means (OpenAI): a function that takes no arguments.
_NO_PARAMETERS = {"type": "object", "properties": {}}


# -- request and response shapes -----------------------------------------------------------------


class _Shape(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDefinition(_Shape):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the schema is always enforced for a forced call, never for "auto"

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("must be 1 to 64 characters of a-z, A-Z, 0-9, underscores and dashes")
        return name


class ChatTool(_Shape):
    type: Literal["function"]
    function: FunctionDefinition


class _FunctionName(_Shape):
    name: str


class NamedToolChoice(_Shape):
    type: Literal["function"]
    function: _FunctionName


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCall(BaseModel):
    id: str = Field(default_factory=_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: the first piece of call `index` carries its id, type and
    name, every piece some of its arguments (the client concatenates them)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


_TOOLS = TypeAdapter(list[ChatTool])
_CHOICE = TypeAdapter(Literal["none", "auto", "required"] | NamedToolChoice)
_CALLS = TypeAdapter(list[ToolCall])


def _invalid(param: str, where: str, e: ValidationError) -> APIError:
    """A 400 naming `param`, whose message names the part at fault."""
    err = e.errors()[0]
    path = ".".join(str(x) for x in (where, *err["loc"]))
    return APIError(400, f"{path}: {err['msg']}", param)


# -- the request's plan ---------------------------------------------------------------------------


def template_reads_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a `tools` argument (its source names it)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: transformers picks "tool_use" when given tools
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and bool(_TEMPLATE_TOOLS.search(template))


@dataclass
class ToolPlan:
    """What a request's tools do: which reach the template, what constrains the output, and how
    the output becomes tool calls (mode "none": it does not)."""

    tools: list[ChatTool] = field(default_factory=list)
    mode: Literal["none", "auto", "required", "named"] = "none"
    name: str | None = None  # the named function
    parallel: bool = True
    in_template: bool = False  # the template renders tools and tool calls itself

    @property
    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}

    def template_tools(self) -> list[dict[str, Any]] | None:
        if not (self.in_template and self.tools):
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def constraint(self) -> StructuredOutputsParams | None:
        """The JSON schema a forced call's output must match."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.function.name == self.name)
            return StructuredOutputsParams(json=tool.function.parameters or _NO_PARAMETERS)
        if self.mode == "required":
            calls = [{"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                      "properties": {"name": {"const": t.function.name},
                                     "arguments": t.function.parameters or _NO_PARAMETERS}}
                     for t in self.tools]
            call = calls[0] if len(calls) == 1 else {"anyOf": calls}
            return StructuredOutputsParams(json={"type": "array", "minItems": 1, "items": call}
                                           if self.parallel else call)
        return None

    def system_note(self) -> str | None:
        """For a template that ignores tools and a forced call: the tools, described in words."""
        if self.in_template or self.mode not in ("named", "required"):
            return None
        listed = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False)
                           for t in self.tools)
        if self.mode == "named":
            ask = f"Call the function {self.name}: answer with its arguments as one JSON object."
        elif self.parallel:
            ask = 'Answer with the calls as a JSON array of {"name": ..., "arguments": {...}} objects.'
        else:
            ask = 'Answer with one call as a JSON object {"name": ..., "arguments": {...}}.'
        return f"You can call these functions (JSON schemas of their arguments):\n{listed}\n{ask}"

    def parser(self) -> ToolCallParser:
        return _PARSERS[self.mode](self)


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
               parallel_tool_calls: bool | None, template_reads: bool) -> ToolPlan:
    """Check `tools`, `tool_choice` and `parallel_tool_calls` (a 400 naming the one at fault) and
    decide what they do with a template that reads tools or not."""
    try:
        parsed = _TOOLS.validate_python(tools or [])
    except ValidationError as e:
        raise _invalid("tools", "tools", e) from None
    if len(parsed) > MAX_TOOLS:
        raise APIError(400, f"tools holds {len(parsed)} tools; at most {MAX_TOOLS} are allowed", "tools")
    names = [t.function.name for t in parsed]
    if (dup := next((n for n in names if names.count(n) > 1), None)) is not None:
        raise APIError(400, f"tools: the function name {dup!r} is given twice", "tools")
    try:
        choice = _CHOICE.validate_python("auto" if tool_choice is None and parsed else tool_choice or "none")
    except ValidationError:
        raise APIError(400, 'tool_choice must be "none", "auto", "required" or '
                       '{"type": "function", "function": {"name": ...}}', "tool_choice") from None
    if not parsed:
        if parallel_tool_calls is not None:
            raise APIError(400, "parallel_tool_calls is only allowed when tools are given",
                           "parallel_tool_calls")
        if choice not in ("none", "auto"):  # with no tools both mean "no tool calls"
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        return ToolPlan(in_template=template_reads)
    plan = ToolPlan(tools=parsed, parallel=parallel_tool_calls is not False, in_template=template_reads)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not "
                           f"among the tools ({', '.join(names)})", "tool_choice")
        plan.mode, plan.name = "named", choice.function.name
    else:
        plan.mode = choice
    if plan.mode == "auto" and not template_reads:
        raise APIError(400, "tools with tool_choice \"auto\" need a chat template that renders tools, and "
                       "this model's does not; name a function in tool_choice, or use \"required\"", "tools")
    return plan


def template_messages(messages: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    """The conversation as the template reads it: assistant tool calls with their arguments as
    objects (what templates index into); for a template that ignores tools, those calls written
    into the content and the tools described in a system message when a call is forced."""
    out = []
    for i, message in enumerate(messages):
        message = dict(message)
        if message["role"] == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise APIError(400, f"messages.{i}: a tool message needs its tool_call_id", "messages")
        if message.get("tool_calls") is not None:
            try:
                calls = _CALLS.validate_python(message["tool_calls"])
            except ValidationError as e:
                raise _invalid("messages", f"messages.{i}.tool_calls", e) from None
            rendered = []
            for j, call in enumerate(calls):
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except ValueError:
                    raise APIError(400, f"messages.{i}.tool_calls.{j}.function.arguments is not valid JSON",
                                   "messages") from None
                rendered.append({"id": call.id, "type": "function",
                                 "function": {"name": call.function.name, "arguments": arguments}})
            if plan.in_template:
                message["tool_calls"] = rendered
            else:
                del message["tool_calls"]
                lines = [json.dumps(c["function"], ensure_ascii=False) for c in rendered]
                message["content"] = "\n".join(filter(None, [message.get("content"), *lines]))
        out.append(message)
    note = plan.system_note()
    if note is not None:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{note}"}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


# -- output -> tool calls ---------------------------------------------------------------------------


class ToolCallParser:
    """Turns one choice's generated text into content and tool calls. `feed` takes each new piece
    of text and returns what can be sent now (content, tool call deltas); `finish` the rest. A
    non-streaming response feeds its whole text once, so both paths give the same answer."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.called = False  # some tool call was emitted

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        return text, []

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        return "", []

    def _calls(self, calls: list[tuple[str, str]]) -> list[DeltaToolCall]:
        self.called = self.called or bool(calls)
        return [DeltaToolCall(index=i, id=_call_id(), type="function",
                              function=DeltaFunctionCall(name=name, arguments=arguments))
                for i, (name, arguments) in enumerate(calls)]


class _NamedParser(ToolCallParser):
    """The output is the named function's arguments, streamed as they come."""

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        if not self.called:
            return "", self._calls([(self.plan.name, text)])
        return "", [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))] if text else []

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        return ("", []) if self.called else self.feed("")


class _BufferedParser(ToolCallParser):
    """Holds the output until the end, then parses it whole: calls, or the text as content."""

    def __init__(self, plan: ToolPlan) -> None:
        super().__init__(plan)
        self.held = ""

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        self.held += text
        return "", []

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        calls = _json_calls(self.held, self.plan.names)
        if calls is None:
            return self.held, []
        return "", self._calls(calls if self.plan.parallel else calls[:1])


class _AutoParser(_BufferedParser):
    """The model decides. Hermes/Qwen calls (`<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>`, any number) after optional content, or an output that is a JSON call (or a list
    of them) as a whole; anything that does not parse, or calls a function not among the tools,
    is content. Content streams until a `<tool_call>` (or a leading `{` or `[`) starts: a tail
    that could be the start of the tag is held back until the next piece decides."""

    def __init__(self, plan: ToolPlan) -> None:
        super().__init__(plan)
        self.state: Literal["start", "content", "calls"] = "start"

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        self.held += text
        if self.state == "start":
            head = self.held.lstrip()
            if not head:
                return "", []
            self.state = "calls" if head[0] in "{[" else "content"
        if self.state == "calls":
            return "", []
        at = self.held.find(_CALL_OPEN)
        if at >= 0:
            self.state = "calls"
            content, self.held = self.held[:at], self.held[at:]
            return content, []
        keep = next((n for n in range(min(len(_CALL_OPEN) - 1, len(self.held)), 0, -1)
                     if _CALL_OPEN.startswith(self.held[-n:])), 0)
        content, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return content, []

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        if self.state != "calls":
            return self.held, []
        if not self.held.startswith(_CALL_OPEN):
            return super().finish()
        calls = []
        for body in _HERMES_CALL.findall(self.held):
            found = _json_calls(body, self.plan.names)
            if found is None or len(found) != 1:
                return self.held, []
            calls += found
        return "", self._calls(calls if self.plan.parallel else calls[:1])


def _json_calls(text: str, names: set[str]) -> list[tuple[str, str]] | None:
    """(name, arguments JSON) per call in a JSON call or list of calls, each an object with `name`
    and `arguments` (or `parameters`, Llama 3's key) as an object or its JSON text; None unless
    every call parses and names one of `names`."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append((item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls or None


_PARSERS: dict[str, type[ToolCallParser]] = {
    "none": ToolCallParser,
    "auto": _AutoParser,
    "required": _BufferedParser,
    "named": _NamedParser,
}


def merge_deltas(deltas: list[DeltaToolCall]) -> list[ToolCall]:
    """The whole calls of a choice's deltas (a non-streaming response)."""
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        call = calls.get(d.index)
        if call is None:
            calls[d.index] = ToolCall(id=d.id, function=FunctionCall(name=d.function.name or "",
                                                                     arguments=d.function.arguments or ""))
        else:
            call.function.arguments += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)]


def parse_output(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall] | None]:
    """A whole choice's (content, tool calls): content None when there are calls and no text
    beside them, calls None when there are none."""
    parser = plan.parser()
    content, deltas = parser.feed(text)
    rest, more = parser.finish()
    calls = merge_deltas(deltas + more)
    if not calls:
        return content + rest, None
    return content + rest or None, calls


def finish_reason(reason: str | None, called: bool) -> str | None:
    """"tool_calls" for a choice that ended normally with tool calls (a truncated one stays "length")."""
    return "tool_calls" if called and reason == "stop" else reason
