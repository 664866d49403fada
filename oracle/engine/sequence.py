"""One generated sequence (one choice of one request) and what it produced."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from shard_common.tokenizer import Tokenizer

from .detokenizer import TextAssembler
from .sampler import SamplingParams, SequenceSampler, TokenChoice
from .speculative import SpeculationState

_ids = itertools.count()


def new_session_id() -> str:
    """Session ids as every Scout sees them (golden tickets take theirs from here too)."""
    return f"seq-{next(_ids)}"


@dataclass
class TokenEvent:
    """What one step produced for one sequence."""

    choice: TokenChoice
    text: str
    finish_reason: str | None = None


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: Tokenizer
    context_length: int
    session: str = field(default_factory=new_session_id)
    # Another sequence whose cache, once its prompt is in, this one copies instead of prefilling.
    share_prefill_with: "Sequence | None" = None
    # An embedding: read the prompt, pool its final hidden states ("mean" or "last"), generate nothing.
    pooling: str | None = None

    def __post_init__(self) -> None:
        self.tokens: list[int] = list(self.prompt_ids)
        self.cached = 0
        self.output: list[TokenChoice] = []
        self.sampler = SequenceSampler(self.params, self.tokenizer.vocab_size)
        self.assembler = TextAssembler(self.tokenizer, self.params.stop)
        self.finish_reason: str | None = None
        self.spec = SpeculationState()
        self.grammar = self.params.grammar.matcher() if self.params.grammar is not None else None
        self.embedding: torch.Tensor | None = None  # the pooled, L2-normalized vector once finished
        self._pooled: torch.Tensor | None = None  # running sum (mean) or last row (last) over prefill chunks

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def pending(self) -> int:
        """Tokens not yet in the KV cache (the prompt's rest, or the last sampled token)."""
        return len(self.tokens) - self.cached

    @property
    def text(self) -> str:
        return self.assembler.text

    def is_stop_token(self, token: int) -> bool:
        return token in self.tokenizer.stop_ids and not self.params.ignore_eos

    def append(self, choice: TokenChoice) -> TokenEvent:
        token = choice.token
        self.output.append(choice)
        if self.grammar is not None:
            self.grammar.consume(token)
        if self.is_stop_token(token):
            self.finish_reason = "stop"
            return TokenEvent(choice, self.assembler.flush(), "stop")
        self.tokens.append(token)
        text = self.assembler.push(token)
        if self.assembler.stopped:
            self.finish_reason = "stop"
        elif self.grammar is not None and self.grammar.done:
            # The constrained output is complete: only an end-of-sequence token could follow.
            self.finish_reason = "stop"
            text += self.assembler.flush()
        elif len(self.output) >= self.params.max_tokens or len(self.tokens) >= self.context_length:
            self.finish_reason = "length"
            text += self.assembler.flush()
        return TokenEvent(choice, text, self.finish_reason)

    def pool(self, rows: torch.Tensor) -> None:
        """Take the final hidden states of the prompt chunk just read; finish after the last one."""
        if self.pooling == "last":
            self._pooled = rows[-1]
        else:
            total = rows.sum(dim=0)
            self._pooled = total if self._pooled is None else self._pooled + total
        if self.pending == 0:
            vector = self._pooled / len(self.prompt_ids) if self.pooling == "mean" else self._pooled
            self.embedding = torch.nn.functional.normalize(vector, dim=0)
            self.finish_reason = "stop"

    def abort(self, reason: str) -> None:
        self.finish_reason = reason
