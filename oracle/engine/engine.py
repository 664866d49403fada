"""One batched step of generation: embed → the blocks (a Pipeline) → head → sample.

Single-threaded on purpose: the async scheduler runs steps on the main thread, and the CLI calls
``step`` directly. A step is written as a resumable (``resumable_step``) that yields while the
blocks run elsewhere (on Scouts), so the scheduler can keep several micro-batches' steps in flight.
Sequences of different lengths, some still reading their prompt and some decoding, share every
forward pass.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from shard_common.main_thread import Resumable, drive
from shard_common.model.ends import ModelEnds
from shard_common.model.span import SpanRequest
from shard_common.tokenizer import Tokenizer

from .pipeline import Pipeline
from .sequence import Sequence, TokenEvent
from .speculative import Draft, Drafter, NgramDrafter, SpeculationStats

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, ends: ModelEnds, pipeline: Pipeline, tokenizer: Tokenizer, prefill_chunk: int = 256,
                 speculative: str = "off", drafters: dict[str, Drafter] | None = None):
        self.ends = ends
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.context_length = ends.config.context_length
        self.prefill_chunk = prefill_chunk
        self.speculative = speculative  # the default mode; a request may ask for another
        self.drafters = {"ngram": NgramDrafter(), **(drafters or {})}
        self.speculation = SpeculationStats()  # over all finished sequences
        # Grammar masks are computed here while the forward pass runs (llguidance drops the GIL).
        self._masker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")

    def drafter_for(self, seq: Sequence) -> Drafter | None:
        mode = seq.params.speculative or self.speculative
        if mode == "off":
            return None
        scout = self.drafters.get("scout")
        if mode in ("scout", "auto") and scout is not None and scout.available:
            return scout
        return self.drafters["ngram"]  # "scout" without a draft Scout falls back to prompt lookup

    def _draft(self, seq: Sequence) -> Draft | None:
        drafter = self.drafter_for(seq)
        if drafter is None:
            return None
        # Never draft past what the sequence may still produce: the last token comes from the target.
        room = min(seq.params.max_tokens - len(seq.output), self.context_length - len(seq.tokens)) - 1
        k = min(seq.spec.wanted(), room)
        if k <= 0:
            return None
        draft = drafter.propose(seq.session, seq.tokens, k, seq.params)
        if draft and draft.tokens and seq.grammar is not None:
            # Tokens the grammar forbids would be rejected anyway: don't spend the pass on them.
            keep = seq.grammar.valid_prefix(draft.tokens)
            draft = Draft(draft.tokens[:keep], draft.probs[:keep] if draft.probs else None)
        return draft if draft and draft.tokens else None

    def plan(self, seqs: list[Sequence]) -> list[tuple[Sequence, int, Draft | None]]:
        """What each sequence feeds this step: decoders their pending token (and a draft, when
        speculating), prefills share what is left of the chunk budget, so a long prompt never
        stalls running streams."""
        plan = []
        budget = self.prefill_chunk
        for s in seqs:
            if s.pending == 1 and s.share_prefill_with is None and s.pooling is None:
                draft = self._draft(s)
                plan.append((s, 1, draft))
                budget -= 1 + (len(draft.tokens) if draft else 0)
        for s in seqs:
            # Embeddings only ever read their prompt, down to its last token.
            if (s.pending > 1 or (s.pooling is not None and s.pending == 1)) and budget > 0:
                n = min(s.pending, budget)
                plan.append((s, n, None))
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

    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, TokenEvent]]:
        return drive(self.resumable_step(seqs))

    @torch.inference_mode()
    def resumable_step(self, seqs: list[Sequence]) -> Resumable[list[tuple[Sequence, TokenEvent]]]:
        """One step of ``seqs``. Steps of disjoint sets of sequences may be in flight together
        (pipelined micro-batches); one sequence is never in two."""
        self._share_prefills(seqs)
        plan = [(s, n, d) for s, n, d in self.plan(seqs) if s.share_prefill_with is None]
        if not plan:
            return []
        fed = [s.tokens[s.cached:s.cached + n] + (d.tokens if d else []) for s, n, d in plan]
        requests = [SpanRequest(s.session, s.cached, len(ids)) for (s, _, _), ids in zip(plan, fed)]
        constrained = [(s, d) for s, n, d in plan if s.grammar is not None and s.cached + n == len(s.tokens)]
        masks: Future | None = self._masker.submit(self._masks, constrained) if constrained else None
        try:
            hidden = yield from self.pipeline.resumable_forward(self.ends.embed([t for ids in fed for t in ids]), requests)
        finally:
            allowed = masks.result() if masks is not None else {}  # never leave the masker walking a matcher
        rows, scored = [], []  # output rows to score, and per scored sequence how many
        offset = 0
        for (s, n, draft), ids in zip(plan, fed):
            offset += len(ids)
            s.cached += n
            if s.pooling is not None:
                s.pool(self.ends.final_hidden(hidden[offset - n:offset]).cpu())
            elif s.pending == 0:
                width = 1 + (len(draft.tokens) if draft else 0)
                rows.extend(range(offset - width, offset))
                scored.append((s, draft, width))
        events = []
        if rows:
            # Sampling state (generators, penalty counts) lives on the CPU whatever the device.
            logits = self.ends.logits(hidden[rows]).cpu()
            start = 0
            for s, draft, width in scored:
                part = logits[start:start + width]
                start += width
                mask = allowed.get(id(s))
                if draft is None:
                    events.append((s, s.append(s.sampler.choose(part[0], None if mask is None else mask[0]))))
                else:
                    events.extend((s, e) for e in self._accept(s, draft, part, mask))
        return events

    @staticmethod
    def _masks(constrained: list[tuple[Sequence, Draft | None]]) -> dict[int, torch.Tensor]:
        return {id(s): s.grammar.masks(d.tokens if d else []) for s, d in constrained}

    def _accept(self, s: Sequence, draft: Draft, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> list[TokenEvent]:
        """Judge ``draft`` with the target's ``logits`` (one row per drafted token, plus one), emit
        the accepted prefix and one more token, and roll every cache back to what was accepted.
        ``allowed``: the grammar's mask at each of those positions. The grammar's matcher, like
        the sampler, only ever consumes emitted tokens; its masks for drafted positions were
        computed by walking the draft and rolling back."""
        events, accepted = [], 0
        for j, token in enumerate(draft.tokens):
            mask = None if allowed is None else allowed[j]
            choice, ok = s.sampler.verify(logits[j], token, draft.probs[j] if draft.probs else None, mask)
            events.append(s.append(choice))
            if not ok or s.finished:
                break
            accepted += 1
        else:
            last = len(draft.tokens)
            events.append(s.append(s.sampler.choose(logits[last], None if allowed is None else allowed[last])))
        s.spec.update(len(draft.tokens), accepted, len(events))
        valid = s.cached + accepted  # the pending token's position and the accepted drafts
        if not s.finished and accepted < len(draft.tokens):
            self.pipeline.rollback(s.session, valid)
        s.cached = valid
        return events

    def release(self, seq: Sequence) -> None:
        stats = seq.spec.stats
        if stats.passes:
            self.speculation.add(stats)
            log.info("%s: %d tokens; speculation %s", seq.session, len(seq.output), stats.as_dict())
        for drafter in self.drafters.values():
            drafter.release(seq.session)
        self.pipeline.free(seq.session)

    def speculation_status(self) -> dict:
        return {"mode": self.speculative, "drafters": sorted(self.drafters), **self.speculation.as_dict(),
                "drafter_stats": {name: d.stats() for name, d in sorted(self.drafters.items())}}

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
