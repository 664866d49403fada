"""Turn logits into tokens: penalties, logit bias, temperature, top-k/top-p, seeded sampling,
and the logprobs OpenAI's API reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .grammar import Grammar

GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    speculative: str | None = None  # off | ngram | scout | auto; None: the server's default
    grammar: "Grammar | None" = None  # what the output must match (each sequence gets its own matcher)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass
class TokenChoice:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


class SequenceSampler:
    """Sampling state of one sequence: its random generator and the counts of its output tokens
    (OpenAI's penalties apply to the tokens generated so far)."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.vocab_size = vocab_size
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.counts: torch.Tensor | None = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size)
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long)
            self.bias = ids, torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)

    def observe(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1

    def adjusted(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """The target distribution's logits after penalties, bias and the grammar's ``allowed``
        mask (before temperature): logprobs report this distribution, the one sampled from."""
        p = self.params
        logits = logits[: self.vocab_size].float()
        if self.counts is not None:
            logits = logits - p.presence_penalty * (self.counts > 0).float() - p.frequency_penalty * self.counts
        if self.bias is not None:
            logits = logits.clone()
            logits.index_add_(0, self.bias[0], self.bias[1])
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        return logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Sampling distribution after temperature, top-k and top-p (for non-greedy params)."""
        p = self.params
        scaled = logits / p.temperature
        if p.top_k and p.top_k < scaled.numel():
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            drop = before >= p.top_p
            drop[0] = False  # the likeliest token always stays: a top_p that is 0 in float32 (5e-324) masked all
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            probs = probs / probs.sum()
        return probs

    def choose(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> TokenChoice:
        p = self.params
        adjusted = self.adjusted(logits, allowed)
        if p.greedy:
            token = int(torch.argmax(adjusted))
        else:
            token = int(torch.multinomial(self.probabilities(adjusted), 1, generator=self.generator))
        return self._chosen(token, adjusted)

    def verify(self, logits: torch.Tensor, draft: int, q: torch.Tensor | None = None,
               allowed: torch.Tensor | None = None) -> tuple[TokenChoice, bool]:
        """Judge a drafted token against the target's ``logits`` at its position: (the token to
        emit, whether it is the draft). Greedy: accepted when it is the target's argmax, else the
        argmax is emitted. Sampling: accepted with probability min(1, p(x)/q(x)), else a token is
        drawn from the normalised max(0, p − q) — so emitted tokens follow the target's
        distribution p exactly, whatever the drafter proposes. ``q`` is the drafter's distribution
        (None: a deterministic drafter, q = one-hot on the draft). Under a grammar, p is the masked
        distribution: a draft the grammar forbids has p = 0 and is always rejected."""
        adjusted = self.adjusted(logits, allowed)
        if self.params.greedy:
            token = int(torch.argmax(adjusted))
            return self._chosen(token, adjusted), token == draft
        p = self.probabilities(adjusted)
        q_draft = 1.0 if q is None else float(q[draft])
        u = float(torch.rand((), generator=self.generator))
        if q_draft > 0 and u < float(p[draft]) / q_draft:
            return self._chosen(draft, adjusted), True
        if q is None:
            residual = p.clone()
            residual[draft] = 0.0
        else:
            residual = (p - q[: p.numel()]).clamp_min(0.0)
        total = float(residual.sum())
        residual = residual / total if total > 0 else p
        token = int(torch.multinomial(residual, 1, generator=self.generator))
        return self._chosen(token, adjusted), False

    def _chosen(self, token: int, adjusted: torch.Tensor) -> TokenChoice:
        """The choice of ``token``, with the logprobs asked for (always the target's)."""
        p = self.params
        choice = TokenChoice(token)
        if p.logprobs:
            logprobs = torch.log_softmax(adjusted, dim=-1)
            choice.logprob = float(logprobs[token])
            if p.top_logprobs:
                values, ids = torch.topk(logprobs, p.top_logprobs)
                # Tokens a grammar forbids have logprob -inf: not alternatives, and not JSON numbers.
                choice.top = [(i, v) for i, v in zip(ids.tolist(), values.tolist()) if v != float("-inf")]
        self.observe(token)
        return choice
