"""Mutually authenticated TLS 1.3 connections between nodes, named by peer id.

The server presents a certificate self-signed by its identity key; the client derives the peer
id from it and refuses any other than the one it expected (a Scout cannot be impersonated). The
client then proves its own identity inside the encrypted channel: it signs the server's fresh
nonce together with the server certificate's hash, so the proof cannot be replayed elsewhere.
(Python's ssl module cannot accept self-signed client certificates without a CA, hence the
signature instead of a client certificate; the guarantee is the same.)
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

from .identity import Identity, certificate_digest, peer_id_of, peer_id_of_certificate, verify
from .protocol import PROTOCOL, Challenge, Hello, Kind
from .wire import FrameError, read_frame, write_frame


class HandshakeError(ConnectionError):
    pass


def server_context(identity: Identity, directory: Path) -> tuple[ssl.SSLContext, bytes]:
    """The TLS context and the server certificate in DER (which clients sign over)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cert, key = identity.tls_files(directory)
    ctx.load_cert_chain(cert, key)
    return ctx, ssl.PEM_cert_to_DER_cert(cert.read_text())


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # No CA: the server's identity is checked against the expected peer id below.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _proof(nonce: bytes, server_cert: bytes) -> bytes:
    return PROTOCOL.encode() + nonce + certificate_digest(server_cert)


async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity, own_cert: bytes,
                 timeout: float = 10.0) -> str:
    """Server side, right after the TLS handshake: returns the authenticated client's peer id."""
    nonce = os.urandom(32)
    await write_frame(writer, Kind.CHALLENGE, Challenge(nonce=nonce.hex(), peer_id=identity.peer_id))
    kind, hello, _ = await asyncio.wait_for(read_frame(reader), timeout)
    if kind != Kind.HELLO:
        raise HandshakeError(f"expected HELLO, got {kind.name}")
    try:
        public_key = bytes.fromhex(hello.public_key)
        signature = bytes.fromhex(hello.signature)
    except ValueError:
        raise HandshakeError("HELLO carries malformed hex") from None
    if len(public_key) != 32 or peer_id_of(public_key) != hello.peer_id:
        raise HandshakeError("HELLO's key does not match its peer id")
    if not verify(public_key, signature, _proof(nonce, own_cert)):
        raise HandshakeError(f"peer {hello.peer_id} failed to prove its identity")
    return hello.peer_id


async def connect(host: str, port: int, identity: Identity, expected_peer: str | None, timeout: float = 10.0):
    """Client side: (reader, writer, server peer id). Raises HandshakeError for the wrong peer."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=client_context(), server_hostname=None), timeout
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        server_peer = peer_id_of_certificate(der)
        if expected_peer is not None and server_peer != expected_peer:
            raise HandshakeError(f"{host}:{port} is {server_peer}, not the expected {expected_peer}")
        kind, challenge, _ = await asyncio.wait_for(read_frame(reader), timeout)
        if kind != Kind.CHALLENGE or challenge.peer_id != server_peer:
            raise HandshakeError("the server's challenge does not match its certificate")
        signature = identity.sign(_proof(bytes.fromhex(challenge.nonce), der))
        await write_frame(writer, Kind.HELLO, Hello(peer_id=identity.peer_id, public_key=identity.public_key.hex(),
                                                    signature=signature.hex()))
        return reader, writer, server_peer
    except (HandshakeError, FrameError, ValueError, asyncio.IncompleteReadError):
        writer.close()
        raise
