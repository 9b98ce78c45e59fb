"""A request's explicit state as it moves through the scheduler and the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch

from slserve.outputs import TokenLogprob
from slserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from slserve.memory.adapter_pages import AdapterVersion, DeviceAdapter
    from slserve.memory.prefix_cache import CachedPage


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    adapter_rank: int | None = None  # a lower nested rank of a LoRA adapter (`name:rK`), else None

    # Prompt followed by every generated token; after a preemption the whole list is recomputed.
    token_ids: list[int] = field(init=False)
    num_computed: int = 0  # sequence slots whose K/V sit in the cache (virtual slots included)
    # Its pages from slot num_shared on; the first len(cached_pages) of them are the prefix cache's
    # entries, referenced (read-only, shared), the rest are its own.
    block_table: list[int] = field(default_factory=list)
    cached_pages: list[CachedPage] = field(default_factory=list)
    # Slots its adapter puts before the prompt (virtual tokens, prefix K/V) and the adapter's pages
    # that hold the first num_shared of them, read-only (scheduler/adapter_slots.py). A request with
    # virtual slots does not use the prefix cache.
    num_virtual: int = 0
    shared_pages: list[int] = field(default_factory=list)
    num_shared: int = 0
    prefix_copy: tuple[int, int] | None = None  # (adapter page, slots) still to copy into its first page
    device_adapter: DeviceAdapter | None = None  # pinned while running
    # The adapter weights of its first admission, kept for readmission after a preemption even if
    # the adapter is deleted or replaced meanwhile.
    adapter_version: AdapterVersion | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None
    error_status: int | None = None  # the HTTP status an error maps to (404, 400, 500)
    generator: torch.Generator | None = None
    # Structured outputs: the xgrammar GrammarMatcher, advanced with each accepted token.
    matcher: Any = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # see prompt_logprobs.py
    prompt_logprobs_sent: bool = False  # in a StepOutput already
    num_preemptions: int = 0
    overtaken: int = 0  # later requests admitted ahead of it (scheduler: affinity_bound)
    first_token_time: float | None = None

    # Incremental detokenization.
    text: str = ""
    emitted_text_len: int = 0
    prefix_offset: int = 0
    read_offset: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.prefix_offset = max(len(self.prompt_token_ids) - 5, 0)
        self.read_offset = len(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Slots of its sequence in the cache once every token is computed: virtual ones first."""
        return self.num_virtual + len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
