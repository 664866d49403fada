"""The data plane in-process: identity checks both ways, frames, and hostile input."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from oracle.swarm.connection import ScoutAddress, ScoutConnection, ScoutError
from shard_common.protocol import CacheOp
from scout.server import SpanServer
from shard_common.dataplane import HandshakeError, client_context, connect
from shard_common.identity import Identity, peer_id_of, verify_reply
from shard_common.model.span import Span, SpanRequest
from shard_common.protocol import Hello, Kind
from shard_common.wire import PRELUDE, read_frame, write_frame


@pytest.fixture(scope="module")
def tiny_span(weights, quant_parts):
    return Span(weights, 0, 2, quant_parts[0])


def run_with_server(tiny_span, tmp_path, body, **options):
    async def main():
        ident = Identity.generate()
        server = SpanServer(tiny_span, ident, "test", ThreadPoolExecutor(1), tmp_path, **options)
        await server.start("127.0.0.1", 0)
        try:
            return await body(server, ident)
        finally:
            await server.close()

    return asyncio.run(main())


def test_identity_file_round_trip(tmp_path):
    a = Identity.load_or_create(tmp_path / "id.key")
    b = Identity.load_or_create(tmp_path / "id.key")
    assert a.peer_id == b.peer_id and a.peer_id.startswith("12D3KooW")
    assert (tmp_path / "id.key").stat().st_mode & 0o777 == 0o600
    assert peer_id_of(a.public_key) == a.peer_id


def test_forward_over_the_wire_matches_local(tiny_span, quant_parts, tmp_path):
    ends = quant_parts[2]
    hidden = ends.embed([1, 2, 3, 4])

    async def body(server, ident):
        conn = await ScoutConnection(ScoutAddress(ident.peer_id, "127.0.0.1", server.port), Identity.generate()).open()
        assert conn.span == (0, 2)
        out = await conn.forward(hidden, [SpanRequest("w", 0, 4)], "float32")
        assert verify_reply(ident.peer_id, **conn.last_reply)  # the reply is bound to the Scout's identity
        assert not verify_reply(Identity.generate().peer_id, **conn.last_reply)
        await conn.cache([CacheOp(op="rollback", session="w", length=2)])
        await conn.ping()
        with pytest.raises(ScoutError, match="SessionOutOfStep"):
            await conn.forward(hidden[:1], [SpanRequest("w", 5, 1)], "float32")
        # Cache operations riding on a forward apply first, in order: fork w into v, roll v back
        # to 1, close w; then v's position 1 is computed in the same request.
        ops = [CacheOp(op="fork", session="w", target="v"), CacheOp(op="rollback", session="v", length=1),
               CacheOp(op="close", session="w")]
        again = await conn.forward(hidden[1:2], [SpanRequest("v", 1, 1)], "float32", ops)
        assert torch.equal(again, out[1:2])
        with pytest.raises(ScoutError, match="UnknownSession"):  # w is gone
            await conn.cache([CacheOp(op="rollback", session="w", length=1)])
        assert conn.round_trips == {"forward": 3, "cache": 2, "ping": 1}
        await conn.free("v")
        await conn.close()
        return out

    remote = run_with_server(tiny_span, tmp_path, body)
    local = tiny_span.forward(hidden, [SpanRequest("local", 0, 4)])
    tiny_span.free("local")
    assert torch.equal(remote, local)


def test_sessions_left_idle_are_freed(tiny_span, quant_parts, tmp_path):
    hidden = quant_parts[2].embed([1, 2, 3])

    async def body(server, ident):
        conn = await ScoutConnection(ScoutAddress(ident.peer_id, "127.0.0.1", server.port), Identity.generate()).open()
        await conn.forward(hidden, [SpanRequest("forgotten", 0, 3)], "float32")
        assert "forgotten" in tiny_span.kv.sessions
        await asyncio.sleep(0.6)
        await conn.close()
        return "forgotten" in tiny_span.kv.sessions

    assert run_with_server(tiny_span, tmp_path, body, session_idle_seconds=0.2) is False


def test_a_scout_without_a_span_refuses_connections_until_it_has_one(tiny_span, tmp_path):
    async def main():
        ident = Identity.generate()
        server = SpanServer(None, ident, "", ThreadPoolExecutor(1), tmp_path)
        await server.start("127.0.0.1", 0)
        address = ScoutAddress(ident.peer_id, "127.0.0.1", server.port)
        try:
            with pytest.raises(ScoutError, match="ERROR"):
                await ScoutConnection(address, Identity.generate()).open()
            server.set_span(tiny_span, "test")
            conn = await ScoutConnection(address, Identity.generate()).open()
            assert conn.span == (0, 2)
            await conn.close()
        finally:
            await server.close()

    asyncio.run(main())


def test_wrong_peer_id_is_refused(tiny_span, tmp_path):
    async def body(server, ident):
        with pytest.raises(HandshakeError, match="not the expected"):
            await connect("127.0.0.1", server.port, Identity.generate(), Identity.generate().peer_id)

    run_with_server(tiny_span, tmp_path, body)


def test_forged_hello_and_garbage_are_dropped_and_server_survives(tiny_span, tmp_path, caplog):
    async def body(server, ident):
        # A client claiming someone else's peer id without their key.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=client_context())
        await read_frame(reader)  # challenge
        victim = Identity.generate()
        await write_frame(writer, Kind.HELLO, Hello(peer_id=victim.peer_id, public_key=victim.public_key.hex(), signature="00" * 64))
        with pytest.raises(asyncio.IncompleteReadError):
            await read_frame(reader)
        writer.close()
        # Garbage and oversize frames after a proper handshake.
        for junk in (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 20, PRELUDE.pack(b"SH", 1, 3, 1 << 30, 0), PRELUDE.pack(b"SH", 1, 99, 2, 0) + b"{}"):
            r, w, _ = await connect("127.0.0.1", server.port, Identity.generate(), ident.peer_id)
            await read_frame(r)  # welcome
            w.write(junk)
            await w.drain()
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await asyncio.wait_for(read_frame(r), 10)
            w.close()
        # A wrong-sized tensor body is a request error, not a dropped connection.
        conn = await ScoutConnection(ScoutAddress(ident.peer_id, "127.0.0.1", server.port), Identity.generate()).open()
        with pytest.raises(ScoutError, match="hidden states of shape"):
            await conn.forward(torch.zeros(3, 576), [SpanRequest("g", 0, 2)], "float32")
        await conn.ping()
        await conn.close()

    run_with_server(tiny_span, tmp_path, body)
    dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropping connection")]
    assert len(dropped) == 4, dropped  # the forged HELLO and each junk frame, each with its reason
    assert any("failed to prove" in d for d in dropped) and any("unknown message kind" in d for d in dropped)
    assert any("too large" in d for d in dropped) and any("not a shard frame" in d for d in dropped)


def test_a_listener_that_never_handshakes_times_out(monkeypatch):
    """Accepting TCP and then saying nothing must cost a bounded wait, not a hung Oracle."""
    monkeypatch.setattr(ScoutConnection, "HANDSHAKE_SECONDS", 0.5)

    async def main():
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        try:
            with pytest.raises(asyncio.TimeoutError):
                await ScoutConnection(ScoutAddress(Identity.generate().peer_id, "127.0.0.1", port), Identity.generate()).open()
        finally:
            silent.close()

    asyncio.run(main())


def test_requests_are_pipelined_and_a_given_up_one_does_not_break_the_connection(tiny_span, quant_parts, tmp_path):
    """Requests go out at once and wait at the Scout, not a round trip away; each reply reaches
    its own request; a request given up (cancelled) leaves its late reply unread and the
    connection usable."""
    from scout.faults import FaultInjector

    hidden = quant_parts[2].embed([1, 2, 3])

    async def body(server, ident):
        conn = await ScoutConnection(ScoutAddress(ident.peer_id, "127.0.0.1", server.port), Identity.generate()).open()
        first = asyncio.ensure_future(conn.forward(hidden, [SpanRequest("p", 0, 3)], "float32"))
        second = asyncio.ensure_future(conn.forward(hidden[:1], [SpanRequest("q", 0, 1)], "float32"))
        await asyncio.sleep(0.1)
        both_out = len(conn._waiting) == 2 and not first.done()  # both on the wire while the Scout holds the first
        out_p, out_q = await asyncio.gather(first, second)
        given_up = asyncio.ensure_future(conn.ping())
        await asyncio.sleep(0.05)
        given_up.cancel()
        await conn.ping()  # the cancelled ping's reply arrives first and is skipped
        alive = not conn.dead and conn.round_trips == {"forward": 2, "ping": 1}
        await conn.close()
        return both_out, alive, out_p, out_q

    both_out, alive, out_p, out_q = run_with_server(tiny_span, tmp_path, body, faults=FaultInjector("delay_ms=300"))
    assert both_out and alive
    assert torch.equal(out_q, tiny_span.forward(hidden[:1], [SpanRequest("r", 0, 1)]))
    assert torch.equal(out_p, tiny_span.forward(hidden, [SpanRequest("s", 0, 3)]))
    tiny_span.free("r")
    tiny_span.free("s")
