"""Golden tickets: work sent to span Scouts whose right answer the Oracle computes itself.

A ticket looks like the start of a real session: a fresh session id from the same counter, a
prefill of the hidden states of a real prompt (one recently served, passed through the blocks
before the Scout's span by the Oracle's own copy of the model), sent on the same connection
between real requests. The Oracle computes the span's output for the same input off the hot path
(one worker thread) and compares: a relative L2 error above the tolerance fails the ticket.

When: after a ``rate`` fraction of a Scout's forwards (its real traffic is audited as well, see
traffic.py); an idle Scout gets one every ``idle_seconds``, a quarantined one
every ``quarantined_seconds`` (it gets no traffic but keeps being judged). Verdicts go to
``PeerHealth`` through ``Verdicts``; the swarm asks ``PeerHealth`` before it uses a Scout.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable

import torch

from oracle.engine.sequence import new_session_id
from oracle.swarm.connection import ScoutConnection, ScoutError
from shard_common.model.span import SpanRequest

from .reference import ReferenceModel
from .verdicts import Verdicts, relative_error

log = logging.getLogger(__name__)


@dataclass
class TicketPolicy:
    rate: float = 0.03  # fraction of a Scout's forwards followed by a ticket
    idle_seconds: float = 60.0
    quarantined_seconds: float = 2.0
    max_tokens: int = 48  # ticket prompt length (a prefix of a real prompt)


class Auditor:
    def __init__(self, reference: ReferenceModel, executor: Executor, verdicts: Verdicts, wire_dtype: str,
                 policy: TicketPolicy | None = None, fallback_prompts: list[torch.Tensor] | None = None):
        self.reference = reference
        self.executor = executor  # the engine's: the reference runs between steps, off the event loop
        self.verdicts = verdicts
        self.health = verdicts.health
        self.wire_dtype = wire_dtype
        self.policy = policy or TicketPolicy()
        # Recent real prompts as embedded rows (inputs to block 0), newest last; tickets reuse them.
        self.samples: list[torch.Tensor] = [p[: self.policy.max_tokens].float() for p in fallback_prompts or []]
        self.last_ticket: dict[str, float] = {}
        self.scouts: Callable[[], list[ScoutConnection]] = lambda: []
        self._queue: asyncio.Queue[ScoutConnection] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._random = random.Random()

    def start(self, scouts: Callable[[], list[ScoutConnection]]) -> None:
        """Begin auditing ``scouts()`` (the span Scouts the swarm holds connections to, quarantined
        ones included)."""
        self.scouts = scouts
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # ---- called on the engine's thread --------------------------------------------------------

    def observe(self, scout: ScoutConnection, prompt_rows: torch.Tensor | None = None) -> None:
        """A real forward went to ``scout`` (``prompt_rows``: a session's embedded prompt, kept as
        material for future tickets); maybe follow it with a ticket."""
        if prompt_rows is not None and len(prompt_rows) > 1:
            self.samples = (self.samples + [prompt_rows[: self.policy.max_tokens].float()])[-16:]
        if self.health.audited(scout.address.peer_id) and self._random.random() < self.policy.rate:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, scout)

    # ---- on the event loop --------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            scout = self._queue.get_nowait() if not self._queue.empty() else self._due()
            if scout is None:
                try:
                    scout = await asyncio.wait_for(self._queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    continue
            if scout.dead:
                continue
            try:
                await self.ticket(scout)
            except asyncio.CancelledError:
                raise
            except ScoutError as e:  # gone mid-ticket: the failover path deals with it
                log.info("ticket for %s not completed: %s", scout.address.peer_id, e)
            except Exception:
                log.exception("ticket for %s failed to run", scout.address.peer_id)

    def _due(self) -> ScoutConnection | None:
        """The Scout longest without a ticket, if that is longer than it should be (idle ones
        every ``idle_seconds``, quarantined ones every ``quarantined_seconds``)."""
        now = time.monotonic()
        due = [s for s in self.scouts() if self.health.audited(s.address.peer_id) and now - self.last_ticket.get(s.address.peer_id, 0.0) >=
               (self.policy.quarantined_seconds if self.health.trust(s.address.peer_id) != "active" else self.policy.idle_seconds)]
        return min(due, key=lambda s: self.last_ticket.get(s.address.peer_id, 0.0), default=None)

    async def ticket(self, scout: ScoutConnection) -> bool:
        peer, span = scout.address.peer_id, scout.span
        self.last_ticket[peer] = time.monotonic()
        if not self.samples:
            return True
        sample = self._random.choice(self.samples)
        rows = sample[: self._random.randint(max(1, len(sample) // 2), len(sample))]
        loop = asyncio.get_running_loop()
        inputs, expected = await loop.run_in_executor(self.executor, self.reference.ticket, rows, span, self.wire_dtype)
        session = new_session_id()
        output = await scout.forward(inputs, [SpanRequest(session, 0, len(rows))], self.wire_dtype)
        reply = scout.last_reply  # taken before the next await lets real traffic through
        await scout.free(session)
        error = relative_error(output, expected)
        evidence = {
            "tokens": len(rows), "wire_dtype": self.wire_dtype,
            "input_sha256": hashlib.sha256(inputs.numpy().tobytes()).hexdigest(),
            "expected_norm": float(expected.norm()), "received_norm": float(output.float().norm()),
            "expected_head": [round(v, 4) for v in expected[-1, :4].tolist()],
            "received_head": [round(v, 4) for v in output[-1, :4].float().tolist()],
            "reply": reply,  # signed by the Scout: shard_common.identity.verify_reply checks it
        }
        return self.verdicts.judge(peer, span, error, "ticket", evidence)

    def status(self) -> dict:
        return {**self.verdicts.status(), "rate": self.policy.rate}
