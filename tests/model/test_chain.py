"""Chained forwards over real data-plane servers in this process: Oracle → S1 → S2 → S3 → Oracle
gives the same numbers as the blocks computed locally, keeps per-hop evidence, and every way a
chain can break is reported with the hop or link that broke."""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from oracle.engine.engine import Engine
from oracle.engine.pipeline import LocalPipeline
from oracle.engine.sampler import SamplingParams
from oracle.engine.sequence import Sequence
from oracle.swarm.chain import ChainBroken, ChainStats, run_chain
from oracle.swarm.connection import ScoutAddress, ScoutConnection
from oracle.swarm.runner import SwarmPipeline
from oracle.trust.audit_policy import AuditPolicy
from oracle.trust.health import HealthPolicy, PeerHealth
from oracle.trust.plausibility import Plausibility
from oracle.trust.reference import ReferenceModel
from oracle.trust.traffic import TrafficAudit
from oracle.trust.verdicts import Verdicts
from scout.faults import FaultInjector
from scout.server import SpanServer
from shard_common.identity import Identity, verify_reply
from shard_common.model.span import Span, SpanRequest
from shard_common.protocol import CacheOp, Forward, Kind, NextHop, SessionSlice
from shard_common.wire import tensor_to_bytes

SPANS = ((0, 1), (1, 2), (2, 3))


@pytest.fixture(scope="module")
def spans(weights, quant_parts):
    return [Span(weights, a, b, quant_parts[0]) for a, b in SPANS]


def with_chain(spans, tmp_path, body, faults=None, health=None):
    """Start one server per span (``faults``: index → FaultInjector), connect an Oracle to each."""
    async def main():
        oracle = Identity.generate()
        servers, conns = [], []
        try:
            for k, span in enumerate(spans):
                server = SpanServer(span, Identity.generate(), "test", ThreadPoolExecutor(1), tmp_path / str(k),
                                    faults=(faults or {}).get(k))
                await server.start("127.0.0.1", 0)
                servers.append(server)
                conns.append(await ScoutConnection(ScoutAddress(server.identity.peer_id, "127.0.0.1", server.port), oracle,
                                                   timeout=5.0, health=health).open())
            return await body(servers, conns)
        finally:
            for c in conns:
                await c.close()
            for s in servers:
                await s.close()

    return asyncio.run(main())


def local_output(weights, quant_parts, hidden, session, end=3):
    whole = Span(weights, 0, end, quant_parts[0])
    return whole.forward(hidden, [SpanRequest(session, 0, len(hidden))])


def test_a_chain_computes_what_the_blocks_compute_locally(spans, weights, quant_parts, tmp_path):
    hidden = quant_parts[2].embed([5, 6, 7, 8])

    async def body(servers, conns):
        stats = ChainStats()
        out = await run_chain(conns, hidden, [SpanRequest("s", 0, 4)], "float32", [[], [], []], stats)
        assert out[0] is None and out[1] is None  # only the last hop's output comes back
        # A decode step after it, with a rollback riding on every hop's request; every hop echoes its output.
        rollback = [[CacheOp(op="rollback", session="s", length=3)] for _ in conns]
        step = await run_chain(conns, hidden[3:4], [SpanRequest("s", 3, 1)], "float32", rollback, stats, echo=True)
        assert torch.equal(step[0], local_output(weights, quant_parts, hidden, "echo", 1)[3:4])
        assert stats.passes == 2 and stats.hops == 6
        # Per-hop evidence: each hop signed the digest of what it sent on (run_chain checked that
        # the next hop received exactly that), and the Oracle keeps it per Scout as for a hub forward.
        for c in conns:
            assert verify_reply(c.peer_id, **c.last_reply)
        assert conns[2].last_reply["output_sha256"] == hashlib.sha256(tensor_to_bytes(step[-1], "float32")).hexdigest()
        assert [c.chained for c in conns] == [2, 2, 2] and [c.forwards for c in conns] == [0, 0, 0]
        assert [s.relays.status()["received"] for s in servers] == [0, 2, 2]
        return out[-1], step[-1]

    out, step = with_chain(spans, tmp_path, body)
    expected = local_output(weights, quant_parts, hidden, "s")
    assert torch.equal(out, expected)
    assert torch.equal(step, expected[3:4])


def test_a_scout_that_refuses_relays_breaks_the_link_before_it(spans, quant_parts, tmp_path):
    hidden = quant_parts[2].embed([5, 6])

    async def body(servers, conns):
        with pytest.raises(ChainBroken) as e:
            await run_chain(conns, hidden, [SpanRequest("r", 0, 2)], "float32", [[], [], []])
        assert e.value.link and e.value.at == 1 and "refuses relays" in str(e.value)
        # The first hop computed the step; rolled back, it takes the same step again by hub.
        await conns[0].cache([CacheOp(op="rollback", session="r", length=0)])
        x = hidden
        for c in conns:
            x = await c.forward(x, [SpanRequest("r", 0, 2)], "float32")
        return x

    assert with_chain(spans, tmp_path, body, faults={1: FaultInjector("refuse_relays=1")}).shape == hidden.shape


def test_an_unreachable_next_hop_is_reported_by_the_hop_before_it(spans, quant_parts, tmp_path):
    hidden = quant_parts[2].embed([5, 6])

    async def body(servers, conns):
        port = servers[1].port
        await servers[1].close()  # its listener is gone, its connection to the Oracle stays open
        servers[1].server = None
        with pytest.raises(ChainBroken) as e:
            await run_chain(conns[:2], hidden, [SpanRequest("u", 0, 2)], "float32", [[], []])
        assert e.value.at == 1 and (e.value.link or not conns[1].dead), (e.value, port)

    with_chain(spans, tmp_path, body)


def test_a_relay_from_a_peer_the_oracle_did_not_name_is_refused(spans, quant_parts, tmp_path):
    """Hop 2 is told its input comes from someone else: the real sender's relay is refused, and the
    hop reports it, so no peer can feed a session on the Oracle's behalf."""
    hidden = quant_parts[2].embed([5, 6])

    async def body(servers, conns):
        a, b = conns[0], conns[1]
        b_id = b.reserve()
        wait_b = await b.send(Kind.FORWARD, Forward(sessions=[SessionSlice(session="f", start=0, n_tokens=2)], dtype="float32",
                                                    shape=tuple(hidden.shape), source=Identity.generate().peer_id), request_id=b_id)
        nxt = NextHop(peer_id=b.peer_id, host="127.0.0.1", port=servers[1].port, id=b_id)
        wait_a = await a.send(Kind.FORWARD, Forward(sessions=[SessionSlice(session="f", start=0, n_tokens=2)], dtype="float32",
                                                    shape=tuple(hidden.shape), next=nxt), tensor_to_bytes(hidden, "float32"))
        ack, body_a = await a.answer(wait_a)
        assert body_a == b"" and ack.output_sha256  # relayed: the Oracle gets only the digest
        with pytest.raises(Exception, match="relay_refused"):
            await b.answer(wait_b)
        assert servers[1].relays.status()["refused"] == 1
        assert servers[1].span.kv.length("f") == 0  # nothing was computed from the refused input

    with_chain(spans, tmp_path, body)


def test_the_pipeline_chains_and_falls_back_to_hub_across_a_refusing_scout(route_spans, tokenizer, quant_parts, engine, tmp_path):
    """A whole generation through the SwarmPipeline over three Scouts: chained, the tokens are the
    local engine's; with the middle Scout refusing relays, the first step breaks, that link goes
    hub, and the tokens are still the same."""
    expected = greedy_tokens(engine, tokenizer, "Name three colors.", 12)
    for faults in ({}, {1: FaultInjector("refuse_relays=1")}):
        tokens, chain, _ = with_chain(route_spans, tmp_path, through_swarm(quant_parts, tokenizer, "Name three colors.", 12), faults)
        assert tokens == expected
        if faults:
            assert chain["fallbacks"] == 1 and chain["breaks"] == 1 and len(chain["hub_only"]) == 1
            assert chain["passes"] > 0  # the first link still chains: Oracle → S1 → Oracle → S2 → S3 → Oracle
        else:
            assert chain["fallbacks"] == 0 and chain["passes"] == chain["hops"] // 3 > 0


def test_speculative_verification_and_its_rollbacks_travel_the_chain(route_spans, weights, tokenizer, quant_parts, tmp_path):
    """Prompt lookup drafts several tokens a step: each verification is a multi-row chained step,
    and the rollbacks of rejected drafts ride on the chain's requests; the tokens are those of plain
    decoding in one process."""
    text = "List the numbers from 1 to 20 separated by commas."
    expected = greedy_tokens(Engine(quant_parts[2], LocalPipeline(Span(weights, 0, 30, quant_parts[0])), tokenizer), tokenizer, text, 24)
    tokens, chain, speculation = with_chain(route_spans, tmp_path, through_swarm(quant_parts, tokenizer, text, 24, "ngram"))
    assert tokens == expected
    assert speculation["drafted"] > speculation["accepted"] > 0  # drafts were verified, some rejected (rolled back)
    assert chain["passes"] > 0 and chain["fallbacks"] == 0


@pytest.fixture(scope="module")
def route_spans(weights, quant_parts):
    return [Span(weights, a, b, quant_parts[0]) for a, b in ((0, 10), (10, 20), (20, 30))]


def greedy_tokens(engine, tokenizer, text: str, max_tokens: int) -> list[int]:
    seq = Sequence(tokenizer.encode_chat([{"role": "user", "content": text}]), SamplingParams(max_tokens=max_tokens, temperature=0),
                   tokenizer, engine.context_length)
    list(engine.generate([seq]))
    return [c.token for c in seq.output]


def through_swarm(quant_parts, tokenizer, text: str, max_tokens: int, speculative: str = "off", **pipeline_options):
    """A ``with_chain`` body: generate through a SwarmPipeline over the servers' connections (the
    engine on a worker thread, the connections on the event loop); tokens and the status."""
    async def body(servers, conns):
        loop = asyncio.get_running_loop()
        pipeline = SwarmPipeline(lambda: conns, 30, loop, pipeline_options.pop("health", PeerHealth()), **pipeline_options)
        engine = Engine(quant_parts[2], pipeline, tokenizer, speculative=speculative)
        tokens = await loop.run_in_executor(None, greedy_tokens, engine, tokenizer, text, max_tokens)
        return tokens, pipeline.status()["chain"], engine.speculation_status()

    return body


class LiesWhenDecoding(FaultInjector):
    """Honest on prompts (checked the hub way, where sessions start), grossly wrong on every decode
    step, which travels the chain unchecked by any follower."""

    def __bool__(self) -> bool:
        return True

    def forward(self, hidden, out):
        return out * 50 if len(hidden) == 1 else out


def test_a_liar_in_the_middle_of_a_chain_is_caught_and_routed_around(route_spans, weights, tokenizer, quant_parts, engine, tmp_path):
    """Audits on, nothing followed: every hop of a chain echoes its output and is judged as on the
    hub path; the liar's first decode output is implausible, recomputed, found wrong: it is
    quarantined, the step goes to its replica, and no wrong token comes out."""
    spans = [*route_spans, Span(weights, 10, 20, quant_parts[0])]  # the last: an honest replica of the liar's blocks
    health = PeerHealth(policy=HealthPolicy(probation=0))
    runtime = quant_parts[0]
    plausibility = Plausibility(min_rows=16)
    traffic = TrafficAudit(ReferenceModel(weights, runtime), Verdicts(health), "float32",
                           AuditPolicy(probation=0, floor=0.0, budget=0.0, reprobation=0.0), plausibility, seed=0)
    # Calibrated on verified outputs of the liar's blocks (what audits of followed sessions feed it).
    rows = quant_parts[2].embed(tokenizer.encode_chat([{"role": "user", "content": "Tell me about the sea and the sky."}]))
    front, middle = Span(weights, 0, 10, runtime), Span(weights, 10, 20, runtime)
    plausibility.learn((10, 20), middle.forward(front.forward(rows, [SpanRequest("c", 0, len(rows))]), [SpanRequest("c", 0, len(rows))]))
    expected = greedy_tokens(engine, tokenizer, "Name three colors.", 8)
    tokens, chain, _ = with_chain(spans, tmp_path, through_swarm(quant_parts, tokenizer, "Name three colors.", 8, health=health,
                                                                 traffic=traffic),
                                  faults={1: LiesWhenDecoding()}, health=health)
    assert tokens == expected
    liar = next(p for p in health._peers if health.trust(p) != "active")
    assert health.trust(liar) == "quarantined" and traffic.recomputed >= 1
    assert chain["fallbacks"] == 1 and chain["passes"] > 0  # chained before it was caught, and after, through the replica
