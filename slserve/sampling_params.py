"""Per-request sampling settings, shaped like vLLM's so that users feel at home."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# Below this temperature sampling is greedy (as in vLLM): dividing logits by a smaller number only
# sharpens the distribution onto the argmax, and overflows float32 on the way there.
GREEDY_TEMPERATURE = 1e-5
# Seeds and token ids are int64 wherever they become tensors or generator states.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# OpenAI's bounds for the presence and frequency penalties and for a logit_bias value.
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
# A logit_bias key: a token id in ASCII digits (int() would also take " 12", "+12" and other
# scripts' digits), short enough that int() never meets Python's digit limit.
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,19}")


class SamplingParamsError(ValueError):
    """An invalid setting; `param` names the field (the HTTP layer reports it as OpenAI does)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match, shaped like vLLM's: exactly one of a JSON schema (a dict, or
    its JSON text), any JSON object, a regular expression, one of several strings, or an EBNF
    grammar (xgrammar's dialect, GBNF-like). Compiled by slserve.structured."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None,
                 self.grammar is not None]
        if sum(given) != 1:
            raise SamplingParamsError("structured outputs need exactly one of json, json_object, regex, "
                                      f"choice and grammar; got {sum(given)}", "structured_outputs")
        choice = self.choice
        if choice is not None and not (choice and all(isinstance(c, str) and c for c in choice)):
            raise SamplingParamsError("choice must be a non-empty list of non-empty strings",
                                      "structured_outputs")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off; values at or above the vocabulary size are off too
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: the sampled token's logprob plus the top k
    prompt_logprobs: int | None = None  # the same for every prompt token (the first has none)
    include_stop_str_in_output: bool = False
    # OpenAI's penalties on the output so far: logit[t] -= count[t] * frequency + (count[t] > 0) * presence.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's (and transformers'): a token seen in the prompt or the output has its logit divided
    # by the penalty when positive, multiplied when negative. 1: off.
    repetition_penalty: float = 1.0
    # token id -> a value in [-100, 100] added to its logit (keys may be ints or digit strings).
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the most likely one's
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many output tokens
    # The output must match this (a token mask per step); the request stops when it is complete.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = _token_id_keys(self.logit_bias or {})
        checks = (
            ("max_tokens", self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            # chained comparisons are False for NaN, so NaN is refused as well
            ("temperature", 0.0 <= self.temperature <= 100.0,
             f"temperature must be in [0, 100], got {self.temperature}"),
            ("top_p", 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            ("top_k", self.top_k >= -1, f"top_k must be -1 (off) or a positive number, got {self.top_k}"),
            ("seed", self.seed is None or INT64_MIN <= self.seed <= INT64_MAX,
             f"seed must be in [-2**63, 2**63 - 1], got {self.seed}"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20,
             f"logprobs must be in [0, 20], got {self.logprobs}"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            ("stop", all(self.stop), "stop strings must be non-empty"),
            ("stop_token_ids", all(0 <= t <= INT64_MAX for t in self.stop_token_ids),
             "stop_token_ids must be token ids in [0, 2**63 - 1]"),
            ("presence_penalty", -MAX_PENALTY <= self.presence_penalty <= MAX_PENALTY,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            ("frequency_penalty", -MAX_PENALTY <= self.frequency_penalty <= MAX_PENALTY,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            ("repetition_penalty", 0.0 < self.repetition_penalty and math.isfinite(self.repetition_penalty),
             f"repetition_penalty must be a finite number above 0, got {self.repetition_penalty}"),
            ("logit_bias", all(-MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS for v in self.logit_bias.values()),
             "logit_bias values must be in [-100, 100]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"),
            # The grammar alone decides where a structured output may end.
            ("min_tokens", not (self.min_tokens and self.structured_outputs),
             "min_tokens cannot be combined with structured outputs: the grammar decides where the "
             "output ends"),
        )
        for param, ok, message in checks:
            if not ok:
                raise SamplingParamsError(message, param)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids that index the logits must lie in the vocabulary (stop_token_ids need not:
        an id outside it can simply never be sampled)."""
        if any(t >= vocab_size for t in self.logit_bias):
            message = f"logit_bias keys must be token ids in [0, {vocab_size}), the model's vocabulary"
            raise SamplingParamsError(message, "logit_bias")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _token_id_keys(bias: dict) -> dict[int, float]:
    """logit_bias with int keys. JSON object keys are strings, so "50256" and 50256 are the same."""
    out: dict[int, float] = {}
    for key, value in bias.items():
        if isinstance(key, str) and _TOKEN_ID_KEY.fullmatch(key):
            key = int(key)
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key <= INT64_MAX:
            raise SamplingParamsError("logit_bias keys must be token ids (non-negative integers), "
                                      f"got {str(key)[:40]!r}", "logit_bias")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise SamplingParamsError(f"logit_bias values must be numbers, got {str(value)[:40]!r}",
                                      "logit_bias")
        out[key] = float(value)
    return out
