"""Data-plane messages between the Oracle and Scouts (typed headers of binary frames)."""

from __future__ import annotations

from enum import IntEnum

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL = "shard-dataplane/1"


class Kind(IntEnum):
    HELLO = 1
    WELCOME = 2
    FORWARD = 3
    ROLLBACK = 4
    FORK = 5
    CLOSE = 6
    PING = 7
    RESULT = 8
    ERROR = 9
    CHALLENGE = 10


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


class SessionSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session: str = Field(max_length=128)
    start: int = Field(ge=0)
    n_tokens: int = Field(ge=1)


class Forward(Message):
    sessions: list[SessionSlice] = Field(min_length=1, max_length=4096)
    dtype: str
    shape: tuple[int, int]


class Rollback(Message):
    session: str = Field(max_length=128)
    length: int = Field(ge=0)


class Fork(Message):
    source: str = Field(max_length=128)
    target: str = Field(max_length=128)


class Close(Message):
    session: str = Field(max_length=128)


class Ping(Message):
    pass


class Result(Message):
    """Reply to any request; a forward's hidden states travel in the frame body."""

    dtype: str | None = None
    shape: tuple[int, int] | None = None
    compute_ms: float = 0.0


class Error(Message):
    code: str
    message: str


MESSAGES: dict[Kind, type[Message]] = {
    Kind.CHALLENGE: Challenge,
    Kind.HELLO: Hello, Kind.WELCOME: Welcome, Kind.FORWARD: Forward, Kind.ROLLBACK: Rollback, Kind.FORK: Fork,
    Kind.CLOSE: Close, Kind.PING: Ping, Kind.RESULT: Result, Kind.ERROR: Error,
}
