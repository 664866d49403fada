"""A draft Scout's model: a whole (small) model with the target's vocabulary that proposes the
next k tokens of a session, keeping a KV cache per session in step with what the Oracle accepted."""

from __future__ import annotations

import time

import torch

from shard_common.model.ends import ModelEnds
from shard_common.model.runtime import Runtime
from shard_common.model.span import SessionOutOfStep, Span, SpanRequest
from shard_common.model.weights import ModelWeights
from shard_common.protocol import Draft, Drafted

# A sampled draft is drawn from its distribution's most likely tokens only (renormalised), so the
# Oracle knows that distribution exactly while the reply stays small.
SUPPORT = 256


class DraftModel:
    def __init__(self, weights: ModelWeights, runtime: Runtime, kv_budget_bytes: int):
        self.name = weights.name
        self.ends = ModelEnds(weights, runtime)
        self.span = Span(weights, 0, weights.config.n_layers, runtime, kv_budget_bytes=kv_budget_bytes)
        self.vocab_digest = weights.tokenizer.vocab_digest()

    @torch.inference_mode()
    def draft(self, request: Draft) -> Drafted:
        t0 = time.perf_counter()
        session, have = request.session, self.span.kv.length(request.session)
        if have < request.start:
            raise SessionOutOfStep(f"draft session {session} holds {have} positions, not {request.start}: resend from 0")
        if have > request.start:
            self.span.rollback(session, request.start)
        position = request.start
        hidden = self.span.forward(self.ends.embed(request.tokens), [SpanRequest(session, position, len(request.tokens))])
        position += len(request.tokens)
        generator = None
        if request.temperature > 0:
            generator = torch.Generator()
            if request.seed is not None:
                generator.manual_seed(request.seed * 1_000_003 + position)  # seeded requests stay reproducible
            else:
                generator.seed()
        out = Drafted(tokens=[], support=[] if generator else None, probs=[] if generator else None)
        for i in range(request.k):
            logits = self.ends.logits(hidden[-1:])[0].float()
            if generator is None:
                token = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / request.temperature, dim=-1)
                top, ids = torch.topk(probs, min(SUPPORT, probs.numel()))
                if request.top_p < 1.0:
                    keep = (torch.cumsum(top, 0) - top) < request.top_p
                    top, ids = top[keep], ids[keep]
                top = top / top.sum()
                token = int(ids[torch.multinomial(top, 1, generator=generator)])
                out.support.append(ids.tolist())
                out.probs.append(top.tolist())
            out.tokens.append(token)
            if i < request.k - 1:
                hidden = self.span.forward(self.ends.embed([token]), [SpanRequest(session, position, 1)])
                position += 1
        out.compute_ms = (time.perf_counter() - t0) * 1000
        return out
