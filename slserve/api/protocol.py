"""The OpenAI schema (and vLLM's adapter routes) as pydantic models, plus the request -> engine
settings conversion.

Types are checked by pydantic (a wrong type is a 422); values are checked here and in
`SamplingParams`, so that an out-of-range value is a 400 naming its parameter, as OpenAI does.
Strings are checked once, for every request body, before any field is read: a lone UTF-16
surrogate ("\\ud800", which JSON can carry) cannot be encoded as UTF-8, so the tokenizer, a file
path or the error message that echoes it would fail later as a 500.
Every parameter of OpenAI's and vLLM's completions and chat schemas is either honoured or, when
this server does not implement it, refused with a 400 naming it unless its value means "off"
(`NOT_IMPLEMENTED`); fields nobody knows are ignored with a logged warning, as vLLM does. Fields
marked "extra" are not in OpenAI's schema but in vLLM's.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_serializer, model_validator

from slserve.api import tools as t
from slserve.api.errors import APIError
from slserve.sampling_params import (
    INT64_MAX,
    INT64_MIN,
    SamplingParams,
    SamplingParamsError,
    StructuredOutputsParams,
)

logger = logging.getLogger(__name__)

MAX_N = 128
MAX_LOGPROBS = 20
_SURROGATE = re.compile("[\ud800-\udfff]")
# Unknown field names in the warning: enough to see what a client sends, bounded for hostile ones.
_WARN_NAMES, _WARN_NAME_CHARS = 20, 64

# Known parameters this server does not implement: name -> the values that mean "off" and are
# accepted (null always is). Any other value is a 400 naming the parameter.
_VLLM_NOT_IMPLEMENTED: dict[str, tuple] = {
    "use_beam_search": (False,),
    "length_penalty": (1.0,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "truncate_prompt_tokens": (),
    "allowed_token_ids": (),
    "bad_words": ([],),
    "guided_decoding_backend": ("xgrammar", "auto"),  # the one backend here
    "guided_whitespace_pattern": (),
    "structural_tag": (),
    "priority": (0,),
    "logits_processors": (),
    "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,),
    "cache_salt": (),
    "kv_transfer_params": (),
    "vllm_xargs": (),
    "mm_processor_kwargs": (),
}
_COMPLETION_NOT_IMPLEMENTED = {
    **_VLLM_NOT_IMPLEMENTED,
    "suffix": ("",),
    "prompt_embeds": (),
}
_CHAT_NOT_IMPLEMENTED = {
    **_VLLM_NOT_IMPLEMENTED,
    # OpenAI's
    "audio": (),
    "function_call": ("none",),
    "functions": ([],),
    "modalities": (["text"],),
    "moderation": (),
    "prediction": (),
    "prompt_cache_options": (),
    "reasoning_effort": (),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "verbosity": (),
    "web_search_options": (),
    # vLLM's chat extras
    "echo": (False,),
    "documents": (),
    "chat_template": (),
    "chat_template_kwargs": ({},),
    "include_reasoning": (True,),
    "media_io_kwargs": (),
}


def _find_lone_surrogate(value: Any, path: str) -> str | None:
    """The path (e.g. "messages.0.content") of the first string in a JSON value, key or item, that
    holds a UTF-16 surrogate; None if there is none."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and _SURROGATE.search(k):
                return path or "body"
            if (found := _find_lone_surrogate(v, where)) is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            # Token-id prompts are long lists of ints: skip those without a call each.
            if isinstance(v, str | dict | list) and (found := _find_lone_surrogate(v, f"{path}.{i}")):
                return found
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Body(_Request):
    """A whole request body: its raw JSON is checked for lone surrogates before validation. The
    check raises APIError (not ValueError), which pydantic passes through unchanged, so the client
    gets a 400 naming the field instead of a 422."""

    # Known fields this server does not implement (see _VLLM_NOT_IMPLEMENTED).
    NOT_IMPLEMENTED: ClassVar[dict[str, tuple]] = {}

    @model_validator(mode="before")
    @classmethod
    def _screen(cls, data: Any) -> Any:
        where = _find_lone_surrogate(data, "")
        if where is not None:
            raise APIError(400, f"{where} contains a lone UTF-16 surrogate, which is not valid Unicode text",
                           where.split(".", 1)[0] if where != "body" else None)
        if isinstance(data, dict):
            for name, off in cls.NOT_IMPLEMENTED.items():
                value = data.get(name)
                if value is not None and not any(value == v for v in off):
                    accepted = f" or send {' or '.join(json.dumps(v) for v in off)}" if off else ""
                    raise APIError(400, f"{name} is not supported by this server: leave it out{accepted}",
                                   name)
            unknown = [k for k in data if k not in cls.model_fields and k not in cls.NOT_IMPLEMENTED]
            if unknown:
                more = len(unknown) - _WARN_NAMES
                logger.warning("ignored unknown fields of a %s: %s%s", cls.__name__,
                               ", ".join(repr(k[:_WARN_NAME_CHARS]) for k in unknown[:_WARN_NAMES]),
                               f" and {more} more" if more > 0 else "")
        return data


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's; refused when true
    continuous_usage_stats: bool = False  # vLLM's; refused when true


class JSONSchemaFormat(_Request):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is always enforced here


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsField(_Request):
    """vLLM's `structured_outputs` extra: exactly one of these. Its other options (whitespace,
    fallback, structural tags) are refused as unknown fields (422)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_schema: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


# The request fields that constrain the output; at most one per request.
_STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                      "guided_grammar")


def _json_schema(value: str | dict[str, Any], param: str) -> dict[str, Any]:
    """A JSON schema given as an object or as its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise APIError(400, f"{param} is not valid JSON: {e}", param) from None
    if not isinstance(value, dict):
        raise APIError(400, f"{param} must be a JSON schema (a JSON object)", param)
    return value


class _SamplingRequest(_Body):
    """Fields that completions and chat share."""

    model: str | None = None  # an adapter name, or the base model (also when left out)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extra
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the caller's records; no effect here
    min_p: float | None = None  # extra
    repetition_penalty: float | None = None  # extra
    min_tokens: int = 0  # extra
    ignore_eos: bool = False  # extra
    stop_token_ids: list[int] | None = None  # extra
    include_stop_str_in_output: bool = False  # extra
    request_id: str | None = None  # extra: the response's id becomes "<kind>-<request_id>"
    prompt_logprobs: int | None = None  # extra: per prompt token, the top k and the token itself
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None  # extra: a JSON schema, or its JSON text
    guided_regex: str | None = None  # extra
    guided_choice: list[str] | None = None  # extra
    guided_grammar: str | None = None  # extra: EBNF (xgrammar's dialect)
    structured_outputs: StructuredOutputsField | None = None  # extra: vLLM's newer form of the above

    def check_common(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise APIError(400, f"n must be between 1 and {MAX_N}, got {self.n}", "n")
        if self.stream and self.prompt_logprobs is not None:  # as vLLM
            raise APIError(400, "prompt_logprobs is not available when stream is true", "prompt_logprobs")
        if self.stream_options is not None:
            if not self.stream:
                raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
            for name in ("include_obfuscation", "continuous_usage_stats"):
                if getattr(self.stream_options, name):
                    raise APIError(400, f"stream_options.{name} is not supported by this server",
                                   f"stream_options.{name}")

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def response_id(self, kind: str) -> str:
        return f"{kind}-{self.request_id if self.request_id is not None else uuid.uuid4().hex}"

    def output_constraint(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """What the output must match, and the request field that asked for it (None, None: free)."""
        given = [name for name in _STRUCTURED_FIELDS if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        if not given:
            return None, None
        name = given[0]
        if len(given) > 1:
            raise APIError(400, f"only one of {', '.join(given)} may be given", given[1])
        try:
            return self._structured(name), name
        except SamplingParamsError as e:
            raise APIError(400, f"{name}: {e}", name) from None

    def _structured(self, name: str) -> StructuredOutputsParams:
        if name == "response_format":
            fmt = self.response_format
            if fmt.type == "json_object":
                return StructuredOutputsParams(json_object=True)
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise APIError(400, "response_format of type json_schema needs json_schema.schema", name)
            return StructuredOutputsParams(json=fmt.json_schema.json_schema)
        if name == "structured_outputs":
            so = self.structured_outputs
            schema = so.json_schema
            if schema is not None:
                schema = _json_schema(schema, "structured_outputs.json")
            return StructuredOutputsParams(
                json=schema,
                json_object=bool(so.json_object), regex=so.regex, grammar=so.grammar,
                choice=None if so.choice is None else tuple(so.choice))
        if name == "guided_json":
            return StructuredOutputsParams(json=_json_schema(self.guided_json, name))
        if name == "guided_choice":
            return StructuredOutputsParams(choice=tuple(self.guided_choice))
        if name == "guided_regex":
            return StructuredOutputsParams(regex=self.guided_regex)
        return StructuredOutputsParams(grammar=self.guided_grammar)

    def engine_prompt_logprobs(self) -> int | None:
        """How many top logprobs the engine keeps per prompt token (None: no prompt logprobs)."""
        return self.prompt_logprobs

    @property
    def num_candidates(self) -> int:
        """Engine requests per prompt (best_of may ask for more than the n returned)."""
        return self.n

    def sampling_params(self, max_tokens: int, logprobs: int | None, vocab_size: int,
                        structured: StructuredOutputsParams | None = None) -> list[SamplingParams]:
        """One SamplingParams per choice; seeded choices get seed + i so that they differ."""
        top_k = -1 if self.top_k in (None, 0) else self.top_k
        if self.seed is not None and not INT64_MIN <= self.seed <= INT64_MAX - (self.num_candidates - 1):
            message = f"seed must be in [-2**63, 2**63 - n] (choice i uses seed + i), got {self.seed}"
            raise APIError(400, message, "seed")
        try:
            params = [
                SamplingParams(
                    max_tokens=max_tokens,
                    temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=1.0 if self.top_p is None else self.top_p,
                    top_k=top_k,
                    seed=None if self.seed is None else self.seed + i,
                    stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                    stop_token_ids=list(self.stop_token_ids or []),
                    ignore_eos=self.ignore_eos,
                    logprobs=logprobs,
                    prompt_logprobs=self.engine_prompt_logprobs(),
                    include_stop_str_in_output=self.include_stop_str_in_output,
                    presence_penalty=self.presence_penalty or 0.0,
                    frequency_penalty=self.frequency_penalty or 0.0,
                    repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                    logit_bias=self.logit_bias or {},
                    min_p=self.min_p or 0.0,
                    min_tokens=self.min_tokens,
                    structured_outputs=structured,
                )
                for i in range(self.num_candidates)
            ]
            params[0].check_vocab(vocab_size)
        except SamplingParamsError as e:
            raise APIError(400, str(e), e.param) from None
        return params


class CompletionRequest(_SamplingRequest):
    NOT_IMPLEMENTED = _COMPLETION_NOT_IMPLEMENTED
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    best_of: int | None = None
    echo: bool = False  # the prompt before the completion, with its logprobs when logprobs is set
    add_special_tokens: bool = True  # extra: BOS and the like when tokenizing a text prompt

    def engine_prompt_logprobs(self) -> int | None:
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None

    @property
    def num_candidates(self) -> int:
        return self.best_of if self.best_of is not None else self.n

    @property
    def engine_logprobs(self) -> int | None:
        """best_of ranks its candidates by their tokens' logprobs, so it needs them even when the
        response shows none."""
        if self.num_candidates > self.n:
            return self.logprobs or 0
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "the prompt is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def check(self) -> None:
        self.check_common()
        if self.max_tokens == 0:  # vLLM's way to score a prompt
            if not self.echo:
                raise APIError(400, "max_tokens must be at least 1 (0 only with echo, to score the prompt)",
                               "max_tokens")
            if self.min_tokens:
                raise APIError(400, f"min_tokens must be in [0, max_tokens=0], got {self.min_tokens}",
                               "min_tokens")
        if self.best_of is not None:
            if not self.n <= self.best_of <= MAX_N:
                raise APIError(400, f"best_of must be between n ({self.n}) and {MAX_N}, got {self.best_of}",
                               "best_of")
            if self.best_of > self.n and self.stream:  # the best are known only at the end
                raise APIError(400, "best_of greater than n is not available when stream is true", "best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}", "logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}", "prompt_logprobs")


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... reach the template as given
    role: str
    content: str | list[ContentPart] | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template reads it: text parts joined into one string."""
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise APIError(400, "only text content parts are supported", "messages")
            content = "".join(part.text or "" for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class _ChatTemplateOptions(_Body):
    """How messages become a prompt (vLLM's chat extras), shared by chat completions and /tokenize."""

    messages: list[ChatMessage]
    tools: list[dict[str, Any]] | None = None  # OpenAI's function tools (checked in api/tools.py)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last (assistant) message stays open for the model to go on
    add_special_tokens: bool = False  # on top of those the template writes

    def check_template_options(self) -> None:
        if not self.messages:
            raise APIError(400, "messages must not be empty", "messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                           "continue_final_message")

    def tool_plan(self, template_reads_tools: bool) -> t.ToolPlan:
        return t.plan_tools(self.tools, getattr(self, "tool_choice", None),
                            getattr(self, "parallel_tool_calls", None), template_reads_tools)

    def template_messages(self, plan: t.ToolPlan) -> list[dict[str, Any]]:
        return t.template_messages([m.for_template() for m in self.messages], plan)


class ChatCompletionRequest(_SamplingRequest, _ChatTemplateOptions):
    NOT_IMPLEMENTED = _CHAT_NOT_IMPLEMENTED
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tool_choice: str | dict[str, Any] | None = None  # see api/tools.py
    parallel_tool_calls: bool | None = None  # false: at most one tool call per choice
    # Accepted with no effect here: ids and hints for OpenAI's own records and caches.
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    metadata: dict[str, str] | None = None

    def check(self) -> None:
        self.check_common()
        self.check_template_options()
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}", "top_logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}", "prompt_logprobs")

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_constraint(self, plan: t.ToolPlan) -> tuple[StructuredOutputsParams | None, str | None]:
        """`output_constraint`, or the schema of a forced tool call (param "tools": the schema is
        the tools' parameters); never both."""
        so, param = self.output_constraint()
        forced = plan.constraint()
        if forced is None:
            return so, param
        if so is not None:
            raise APIError(400, f"a tool_choice that forces a call cannot be combined with {param}",
                           "tool_choice")
        return forced, "tools"


class TokenizeCompletionRequest(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_ChatTemplateOptions):
    NOT_IMPLEMENTED = {k: _CHAT_NOT_IMPLEMENTED[k] for k in
                       ("documents", "chat_template", "chat_template_kwargs", "mm_processor_kwargs")}
    model: str | None = None
    return_token_strs: bool = False


def _tokenize_kind(data: Any) -> str:
    return "chat" if isinstance(data, dict) and "messages" in data else "completion"


# vLLM's /tokenize body: a prompt, or messages for the chat template.
TokenizeRequest = Annotated[
    Annotated[TokenizeChatRequest, Tag("chat")] | Annotated[TokenizeCompletionRequest, Tag("completion")],
    Discriminator(_tokenize_kind),
]


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(_Body):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's name for replace


class UnloadLoRAAdapterRequest(_Body):
    lora_name: str
    lora_int_id: int | None = None


# -- responses -----------------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob: one entry of a prompt token's dict (token id -> this)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token None (the first) or {token id: PromptLogprob}, holding
# the token itself and the top k.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[t.ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[t.DeltaToolCall] | None = None

    @model_serializer
    def _set_fields(self) -> dict[str, Any]:
        # OpenAI leaves absent keys out of a delta: {"content": "x"}, and {} in the last chunk.
        out: dict[str, Any] = {k: v for k, v in (("role", self.role), ("content", self.content))
                               if v is not None}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        return out


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slserve"
    root: str
    parent: str | None = None
    max_model_len: int | None = None
    # Adapters only, once parsed: the PEFT kind, rank per target module, target modules, and the
    # virtual tokens a prompt-learning adapter puts before each prompt (declared in its config).
    kind: str | None = None
    ranks: dict[str, int] | None = None
    target_modules: list[str] | None = None
    virtual_tokens: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class AdapterCard(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    created: int
    owned_by: str = "slserve"
    parent: str
    size_bytes: int
    kind: str | None  # the PEFT kind (LORA, ADALORA, VERA); None until the adapter was first parsed
    ranks: dict[str, int] | None  # per target module; None until the adapter was first parsed
    target_modules: list[str] | None
    virtual_tokens: int | None = None  # prompt tuning, P-tuning, prefix tuning
    resident: Literal["disk", "host", "device"]


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]
