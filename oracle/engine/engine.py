"""One batched step of generation: embed → the blocks (a Pipeline) → head → sample.

Synchronous and single-threaded on purpose: the async scheduler runs ``step`` in a worker
thread, and the CLI calls it directly. Sequences of different lengths, some still reading
their prompt and some decoding, share every forward pass.
"""

from __future__ import annotations

import torch

from shard_common.model.ends import ModelEnds
from shard_common.model.span import SpanRequest
from shard_common.tokenizer import Tokenizer

from .pipeline import Pipeline
from .sequence import Sequence, TokenEvent


class Engine:
    def __init__(self, ends: ModelEnds, pipeline: Pipeline, tokenizer: Tokenizer, prefill_chunk: int = 256):
        self.ends = ends
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.context_length = ends.config.context_length
        self.prefill_chunk = prefill_chunk

    def plan(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
        """How many pending tokens each sequence feeds this step: decoders one each, prefills share
        what is left of the chunk budget, so a long prompt never stalls running streams."""
        plan = []
        budget = self.prefill_chunk
        for s in seqs:
            if s.pending == 1:
                plan.append((s, 1))
                budget -= 1
        for s in seqs:
            if s.pending > 1 and budget > 0:
                n = min(s.pending, budget)
                plan.append((s, n))
                budget -= n
        return plan

    def _share_prefills(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            src = s.share_prefill_with
            if src is None:
                continue
            if src.finished:
                # Its cache may already be freed: this sequence reads the prompt itself.
                s.share_prefill_with = None
            elif src.cached >= len(s.prompt_ids):
                self.pipeline.fork(src.session, s.session)
                self.pipeline.rollback(s.session, len(s.prompt_ids) - 1)
                s.cached = len(s.prompt_ids) - 1
                s.share_prefill_with = None

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, TokenEvent]]:
        self._share_prefills(seqs)
        plan = [(s, n) for s, n in self.plan(seqs) if s.share_prefill_with is None]
        if not plan:
            return []
        ids = [t for s, n in plan for t in s.tokens[s.cached:s.cached + n]]
        requests = [SpanRequest(s.session, s.cached, n) for s, n in plan]
        hidden = self.pipeline.forward(self.ends.embed(ids), requests)
        rows, done = [], []
        offset = 0
        for s, n in plan:
            offset += n
            s.cached += n
            if s.pending == 0:
                rows.append(offset - 1)
                done.append(s)
        events = []
        if rows:
            # Sampling state (generators, penalty counts) lives on the CPU whatever the device.
            logits = self.ends.logits(hidden[rows]).cpu()
            for s, row in zip(done, logits):
                events.append((s, s.append(s.sampler.choose(row))))
        return events

    def release(self, seq: Sequence) -> None:
        self.pipeline.free(seq.session)

    def generate(self, seqs: list[Sequence]):
        """Run sequences to the end, yielding (sequence, event) as tokens come."""
        active = list(seqs)
        try:
            while active:
                for event in self.step(active):
                    yield event
                for s in [s for s in active if s.finished]:
                    active.remove(s)
                    self.release(s)
        finally:
            for s in active:
                self.release(s)
