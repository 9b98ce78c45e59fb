"""Per-request sampling settings, shaped like vLLM's so that users feel at home."""

from __future__ import annotations

from dataclasses import dataclass, field

# Below this temperature sampling is greedy (as in vLLM): dividing logits by a smaller number only
# sharpens the distribution onto the argmax, and overflows float32 on the way there.
GREEDY_TEMPERATURE = 1e-5
# Seeds and token ids are int64 wherever they become tensors or generator states.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class SamplingParamsError(ValueError):
    """An invalid setting; `param` names the field (the HTTP layer reports it as OpenAI does)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


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
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
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
            ("stop", all(self.stop), "stop strings must be non-empty"),
            ("stop_token_ids", all(0 <= t <= INT64_MAX for t in self.stop_token_ids),
             "stop_token_ids must be token ids in [0, 2**63 - 1]"),
        )
        for param, ok, message in checks:
            if not ok:
                raise SamplingParamsError(message, param)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
