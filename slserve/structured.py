"""Structured outputs: JSON schemas, regexes, choices and EBNF grammars compiled by xgrammar
into one matcher per request, whose token mask the sampler applies to that request's row.

    StructuredOutputsParams --Grammars.compile (cached)--> CompiledGrammar
        --Grammars.matcher--> GrammarMatcher on the Request
    each step: fill_masks (constrained rows only) -> Sampler masks them -> OutputProcessor
        advances the matcher with the sampled token; the request stops once the grammar is done

A grammar is compiled once per distinct spec (a bounded LRU; compiling takes milliseconds to
seconds for large schemas). JSON is generated without free whitespace (`any_whitespace=False`):
a small model left to choose spaces and newlines between tokens tends to emit them forever.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import torch

from slserve.sampling_params import StructuredOutputsParams

# xgrammar's errors start with "[hh:mm:ss] /path/file.cc:123: " (and sometimes "Check failed: ...
# is false: "); the rest is the message worth showing a client.
_XGR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: (Check failed: .*? is false: )?")
_BITS = 32  # xgrammar's bitmask: one int32 word per 32 tokens, bit j of word w for token 32w + j


class GrammarError(ValueError):
    """A spec xgrammar cannot compile; the message names the problem."""


def _describe(so: StructuredOutputsParams) -> tuple[str, str]:
    """(kind, text): the cache key and what the compiler reads."""
    if so.json is not None:
        text = so.json if isinstance(so.json, str) else json.dumps(so.json)
        return "json", text
    if so.json_object:
        return "json", '{"type": "object"}'
    if so.regex is not None:
        return "regex", so.regex
    if so.choice is not None:
        # EBNF string literals take JSON's escapes (quotes, backslashes, newlines).
        return "grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in so.choice)
    return "grammar", so.grammar or ""


class Grammars:
    """The compiler for one tokenizer, and its cache of compiled grammars. Thread-safe: the HTTP
    server compiles on its worker threads (a bad spec is a 400 before the request is queued),
    the engine thread then finds the grammar in the cache."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], cache_size: int = 256):
        import xgrammar as xgr  # imported on first use: servers without structured requests never load it

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses)

    def compile(self, so: StructuredOutputsParams):
        """The CompiledGrammar for `so`, from the cache when it was compiled before."""
        key = _describe(so)
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
        grammar = self._compile(*key)
        with self._lock:
            self.compiled += 1
            self._cache[key] = grammar
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, kind: str, text: str):
        compile_fn = {
            "json": lambda: self._compiler.compile_json_schema(text, any_whitespace=False),
            "regex": lambda: self._compiler.compile_regex(text),
            "grammar": lambda: self._compiler.compile_grammar(text),
        }[kind]
        what = "JSON schema" if kind == "json" else kind
        try:
            grammar = compile_fn()
        except (RuntimeError, ValueError, TypeError) as e:
            message = _XGR_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else "")
            raise GrammarError(f"cannot compile the {what}: {message or type(e).__name__}") from None
        # A grammar whose language is empty (`root ::= root`) compiles, but would leave its request
        # no token to sample.
        if not bool(fill_masks([self._xgr.GrammarMatcher(grammar)], self.vocab_size).any()):
            raise GrammarError(f"the {what} matches no output at all")
        return grammar

    def matcher(self, so: StructuredOutputsParams):
        """A fresh matcher at the start of `so`'s grammar."""
        return self._xgr.GrammarMatcher(self.compile(so))


def fill_masks(matchers: list[Any], vocab_size: int) -> torch.Tensor:
    """[len(matchers), vocab_size] bool: the tokens each matcher allows next."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)  # [R, ceil(vocab / 32)] int32
    for row, m in enumerate(matchers):
        m.fill_next_token_bitmask(bitmask, row)
    shifts = torch.arange(_BITS, dtype=torch.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [R, words, 32]; arithmetic shift, so sign bits read right
    return bits.reshape(len(matchers), -1)[:, :vocab_size].bool()
