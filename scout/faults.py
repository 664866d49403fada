"""``shard-scout --inject-faults SPEC``: a Scout that misbehaves on purpose, for operators to test
their swarm's defences (golden tickets, quarantine, bans). Never for real service.

SPEC is comma-separated ``name=value``:
  corrupt=F    replace a fraction F of forward outputs with noise of the same size
  noise=S      add Gaussian noise of S times each output's standard deviation to every output
  skip=1       return the input unchanged (a lazy Scout skipping its blocks)
  delay_ms=D   answer every request D milliseconds late
  hang=1       accept connections and requests but never answer (the Oracle must time out)
  draft=random a draft Scout proposing random tokens
  refuse_relays=1  refuse the hidden states other Scouts relay to it (as if a firewall stood between
               them): chains into this Scout break, and the Oracle must fall back to its hub path
"""

from __future__ import annotations

import random

import torch

KNOWN = {"corrupt", "noise", "skip", "delay_ms", "draft", "hang", "refuse_relays"}


class FaultInjector:
    def __init__(self, spec: str = "", seed: int | None = None):
        self.settings: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = item.partition("=")
            if name not in KNOWN or not value:
                raise ValueError(f"unknown fault {item!r}; known: {', '.join(sorted(KNOWN))} (as name=value)")
            self.settings[name] = value
        self.corrupt = float(self.settings.get("corrupt", 0))
        self.noise = float(self.settings.get("noise", 0))
        self.skip = self.settings.get("skip") == "1"
        self.delay_s = float(self.settings.get("delay_ms", 0)) / 1000
        self.hang = self.settings.get("hang") == "1"
        self.random_drafts = self.settings.get("draft") == "random"
        self.refuse_relays = self.settings.get("refuse_relays") == "1"
        self._random = random.Random(seed)
        self.injected = 0

    def __bool__(self) -> bool:
        return bool(self.settings)

    def forward(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.skip:
            self.injected += 1
            return hidden.to(out.dtype)
        if self.corrupt and self._random.random() < self.corrupt:
            self.injected += 1
            return torch.randn_like(out.float()).mul(out.float().std()).to(out.dtype)
        if self.noise:
            self.injected += 1
            return (out.float() + torch.randn_like(out.float()) * out.float().std() * self.noise).to(out.dtype)
        return out

    def draft(self, tokens: list[int], vocab_size: int) -> list[int]:
        if not self.random_drafts:
            return tokens
        self.injected += 1
        return [self._random.randrange(vocab_size) for _ in tokens]
