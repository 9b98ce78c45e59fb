"""What the engine hands back: per-step deltas (for streaming) and finished outputs (offline)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely (token_id, logprob), most likely first
    rank: int | None = None  # the token's place in the distribution (1: most likely), when known


@dataclass
class StepOutput:
    """What one engine step produced for one request. Text deltas concatenate to the full text."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" while finished, else None
    num_prompt_tokens: int
    num_generated_tokens: int
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    # With params.prompt_logprobs, on the request's first output: one per prompt token, None first.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    # With finish_reason "error": 404 adapter gone, 400 can never fit, 500 the step failed.
    error_status: int | None = None


@dataclass
class RequestOutput:
    """A finished request, as `LLM.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    adapter: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
