"""Turn logits into tokens: penalties, logit bias, temperature, top-k/top-p, seeded sampling,
and the logprobs OpenAI's API reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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

    def adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """The target distribution's logits after penalties and bias (before temperature)."""
        p = self.params
        logits = logits[: self.vocab_size].float()
        if self.counts is not None:
            logits = logits - p.presence_penalty * (self.counts > 0).float() - p.frequency_penalty * self.counts
        if self.bias is not None:
            logits = logits.clone()
            logits.index_add_(0, self.bias[0], self.bias[1])
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
            sorted_probs = sorted_probs.masked_fill(before >= p.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            probs = probs / probs.sum()
        return probs

    def choose(self, logits: torch.Tensor) -> TokenChoice:
        p = self.params
        adjusted = self.adjusted(logits)
        if p.greedy:
            token = int(torch.argmax(adjusted))
        else:
            token = int(torch.multinomial(self.probabilities(adjusted), 1, generator=self.generator))
        choice = TokenChoice(token)
        if p.logprobs:
            logprobs = torch.log_softmax(adjusted, dim=-1)
            choice.logprob = float(logprobs[token])
            if p.top_logprobs:
                values, ids = torch.topk(logprobs, p.top_logprobs)
                choice.top = list(zip(ids.tolist(), values.tolist()))
        self.observe(token)
        return choice
