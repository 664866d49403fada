"""Data-plane messages between the Oracle and Scouts (typed headers of binary frames)."""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROTOCOL = "shard-dataplane/3"


class Kind(IntEnum):
    HELLO = 1
    WELCOME = 2
    FORWARD = 3
    CACHE = 4  # KV cache operations alone (they usually ride on the next FORWARD instead)
    PING = 7
    RESULT = 8
    ERROR = 9
    CHALLENGE = 10
    DRAFT = 11
    DRAFTED = 12
    RELAY = 13  # Scout → Scout: a chained forward's hidden states for the next hop


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int = 0


class Challenge(Message):
    """Server → client right after TLS: the nonce the client signs to prove its identity."""

    protocol: str = PROTOCOL
    nonce: str  # hex
    peer_id: str


class Hello(Message):
    """Client → server: its key and a signature over nonce + the server certificate's SHA-256."""

    peer_id: str
    public_key: str  # hex
    signature: str  # hex


class Welcome(Message):
    """Server → client: what this Scout serves."""

    peer_id: str
    model: str
    span: tuple[int, int]
    n_layers: int
    wire_dtypes: list[str]
    role: str = "span"  # "draft": a whole (small) model that proposes tokens
    vocab_digest: str | None = None


class SessionSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session: str = Field(max_length=128)
    start: int = Field(ge=0)
    n_tokens: int = Field(ge=1)


class CacheOp(BaseModel):
    """One KV cache operation: ``rollback`` ``session`` to ``length`` positions, ``fork`` it into
    ``target``, or ``close`` it (free its cache; an unknown session is already closed)."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["rollback", "fork", "close"]
    session: str = Field(max_length=128)
    length: int | None = Field(default=None, ge=0)
    target: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _complete(self) -> "CacheOp":
        if (self.op == "rollback") != (self.length is not None) or (self.op == "fork") != (self.target is not None):
            raise ValueError("rollback takes a length, fork a target, close neither")
        return self


class NextHop(BaseModel):
    """Where a chained forward's output goes: the next Scout, and the id of the request the Oracle
    sent that Scout for this step (the relay is matched to it there)."""

    model_config = ConfigDict(extra="forbid")
    peer_id: str = Field(max_length=128)
    host: str = Field(max_length=255)
    port: int = Field(ge=1, le=65535)
    id: int = Field(ge=1)


class Forward(Message):
    """Hidden states for ``sessions``; ``ops`` are applied first, in order (rollbacks of rejected
    drafts, forks, frees: riding here saves each its own round trip).

    Chained (Oracle → S1 → … → Sn → Oracle): with ``source``, the hidden states come from that
    Scout in a RELAY frame instead of in this frame's body; with ``next``, the output goes on to
    the next Scout and the reply to the Oracle is an acknowledgement carrying the signed digest
    of the output, and the output itself only with ``echo`` (off the critical path: the Oracle
    checks it while the next hops compute)."""

    sessions: list[SessionSlice] = Field(min_length=1, max_length=4096)
    dtype: str
    shape: tuple[int, int]
    ops: list[CacheOp] = Field(default_factory=list, max_length=4096)
    source: str | None = Field(default=None, max_length=128)
    next: NextHop | None = None
    echo: bool = False  # a chained hop's acknowledgement carries its output too (for the Oracle's checks)


class Relay(Message):
    """Scout → next Scout: the output of a chained forward (in the body), for the request ``id``
    that ``oracle`` sent the receiving Scout."""

    oracle: str = Field(max_length=128)
    dtype: str
    shape: tuple[int, int]


class CacheOps(Message):
    ops: list[CacheOp] = Field(min_length=1, max_length=4096)


class Ping(Message):
    pass


class Draft(Message):
    """Oracle → draft Scout: the session's context from ``start`` on (what the Scout's cache does not
    hold yet: it keeps the first ``start`` positions and drops the rest), then k proposals."""

    session: str = Field(max_length=128)
    start: int = Field(ge=0)
    tokens: list[int] = Field(min_length=1, max_length=32768)
    k: int = Field(ge=1, le=32)
    temperature: float = Field(default=0.0, ge=0.0)  # 0: greedy, no distribution returned
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None


class Drafted(Message):
    """Draft Scout → Oracle: the proposed tokens and, when sampled, the distribution each was drawn
    from (its support and probabilities), so the Oracle can accept exactly by rejection sampling."""

    tokens: list[int]
    support: list[list[int]] | None = None
    probs: list[list[float]] | None = None
    compute_ms: float = 0.0


class Result(Message):
    """Reply to any request; a forward's hidden states travel in the frame body."""

    dtype: str | None = None
    shape: tuple[int, int] | None = None
    compute_ms: float = 0.0
    # A forward's reply is signed by the Scout's identity key over reply_digest(id, output): evidence
    # that it, and no one else, sent these numbers. A chained hop's reply carries the digests of
    # what it received and sent on, so the Oracle can check that consecutive hops agree.
    signature: str | None = None
    input_sha256: str | None = None
    output_sha256: str | None = None


class Error(Message):
    code: str
    message: str


MESSAGES: dict[Kind, type[Message]] = {
    Kind.CHALLENGE: Challenge,
    Kind.HELLO: Hello, Kind.WELCOME: Welcome, Kind.FORWARD: Forward, Kind.CACHE: CacheOps, Kind.PING: Ping, Kind.RESULT: Result, Kind.ERROR: Error, Kind.DRAFT: Draft,
    Kind.DRAFTED: Drafted, Kind.RELAY: Relay,
}
