"""Grammar-constrained decoding: which tokens may come next, so that what is generated is valid by
construction (a JSON schema, a tool call, a Lark grammar, a regex).

llguidance does the work: it builds its token trie from the tokenizer's own ``tokenizer.json``
and computes a next-token mask in tens of microseconds with no Python loop over the vocabulary
(chosen over xgrammar, which is faster per token but pulls in triton, ~1 GB; the mask is
computed on a helper thread while the forward pass runs, so its cost hides behind it). A
``Grammar`` is compiled once per distinct source and cached; every sequence gets its own
``GrammarMatcher``, a copy of the compiled grammar's fresh matcher.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import numpy as np
import torch

from shard_common.tokenizer import Tokenizer

# Compact JSON: a small model given free whitespace can loop on newlines forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The grammar (or schema) cannot be compiled; the message is the library's reason."""


@dataclass(frozen=True)
class Constraint:
    """What the output must match: ``kind`` json_schema (``source`` is the schema as JSON text),
    lark (llguidance's Lark dialect, which may embed ``%json {...}``) or regex. ``lenient``
    ignores JSON-schema keywords the library does not implement instead of failing."""

    kind: str
    source: str
    lenient: bool = False

    @classmethod
    def json_schema(cls, schema: dict, lenient: bool = False) -> "Constraint":
        # Key order is meaning here: properties are generated in the order the schema lists them.
        return cls("json_schema", json.dumps(schema), lenient)


def _grammar_text(c: Constraint) -> str:
    if c.kind == "json_schema":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(c.source, defaults=JSON_OPTIONS,
                                                                 overrides={"lenient": True} if c.lenient else None)
        except ValueError as e:
            raise GrammarError(str(e)) from None
    if c.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(c.source)
    if c.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(c.source)
    raise GrammarError(f"unknown grammar kind {c.kind!r}")


class Grammar:
    """A compiled constraint: hands out matchers in their start state."""

    def __init__(self, prototype: llguidance.LLMatcher, vocab_size: int, stop_ids: frozenset[int]):
        self._prototype = prototype
        self._lock = threading.Lock()  # deep_copy of one matcher from several threads at once is not promised safe
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids

    def matcher(self) -> "GrammarMatcher":
        with self._lock:
            return GrammarMatcher(self._prototype.deep_copy(), self.vocab_size, self.stop_ids)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and caches the results by source. Blocking (a complex
    schema can take a second): servers call ``compile`` off the event loop."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 128):
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._cache: OrderedDict[Constraint, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self._lltokenizer: llguidance.LLTokenizer | None = None

    def _ll(self) -> llguidance.LLTokenizer:
        # Built on first use (~0.2 s for a 49k vocabulary): servers that never constrain never pay.
        with self._lock:
            if self._lltokenizer is None:
                t = self.tokenizer
                self._lltokenizer = llguidance.LLTokenizer(t.hf.to_str(), n_vocab=t.vocab_size, eos_token=sorted(t.stop_ids))
            return self._lltokenizer

    def compile(self, constraint: Constraint) -> Grammar:
        with self._lock:
            cached = self._cache.get(constraint)
            if cached is not None:
                self._cache.move_to_end(constraint)
                return cached
        ll = self._ll()
        text = _grammar_text(constraint)
        error = llguidance.LLMatcher.validate_grammar(text, ll)
        if error:
            raise GrammarError(error)
        matcher = llguidance.LLMatcher(ll, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        grammar = Grammar(matcher, self.tokenizer.vocab_size, frozenset(self.tokenizer.stop_ids))
        with self._lock:
            self._cache[constraint] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar


class GrammarMatcher:
    """One sequence's position in its grammar. It consumes exactly the tokens the sequence emits;
    masks for drafted positions are computed by walking the draft and rolling back."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, stop_ids: frozenset[int]):
        self._m = matcher
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self.consumed = 0  # tokens consumed so far: equals the sequence's output length
        self._words = (vocab_size + 31) // 32

    @property
    def done(self) -> bool:
        """Nothing more can follow: the constrained output is complete."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error()

    def _unpack(self, words: np.ndarray) -> torch.Tensor:
        # Bit i of little-endian word w is token 32w + i: unpack the bytes least significant bit first.
        allowed = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")[:, : self.vocab_size].view(np.bool_)
        # A matcher in an error state allows nothing; let it end the sequence rather than sample from nothing.
        empty = ~allowed.any(axis=-1)
        if empty.any():
            allowed[empty, min(self.stop_ids)] = True
        return torch.from_numpy(allowed)

    def masks(self, draft: list[int]) -> torch.Tensor:
        """Allowed tokens at the next position and after each drafted token: a bool tensor
        (len(draft) + 1, vocab). The matcher is left where it was. Rows past the first drafted
        token the grammar forbids stay empty: verification rejects that token and reads no further.

        NumPy only, no torch op: this runs on a helper thread, and a torch op there would start a
        second OpenMP team beside the engine's, which on a small machine slows every later step."""
        words = np.zeros((len(draft) + 1, self._words), dtype=np.int32)
        # Consuming a forbidden token would leave the matcher in an error state for good: walk only the valid prefix.
        walk = self._m.validate_tokens(draft) if draft else 0
        for i in range(walk + 1):
            self._m.unsafe_compute_mask_ptr(words[i].ctypes.data, words.shape[1] * 4)
            if i < walk:
                self._m.consume_token(draft[i])
        if walk:
            self._m.rollback(walk)
        return self._unpack(words)

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens`` the grammar allows from here (drafts are cut to that)."""
        return self._m.validate_tokens(tokens)

    def consume(self, token: int) -> None:
        if not self._m.is_stopped():
            self._m.consume_token(token)
        self.consumed += 1
