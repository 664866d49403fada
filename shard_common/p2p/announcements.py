"""Control-plane messages carried by gossipsub (JSON, typed with pydantic).

Scouts announce themselves once a second on ``SCOUT_TOPIC`` (the announcement doubles as the
heartbeat); the Oracle announces itself and the span it assigns to each Scout on ``ORACLE_TOPIC``.
gossipsub signs every message with the sender's libp2p key; receivers also check that the peer
id inside an announcement is the one that signed it, so nobody can speak for another peer.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCOUT_TOPIC = "/shard/scouts/1"
ORACLE_TOPIC = "/shard/oracle/1"
ORACLE_DHT_KEY = "/shard/oracle/1"
# gossipsub silently drops anything over 1 MiB; an announcement stays far below this.
MAX_MESSAGE_BYTES = 64 * 1024


class Announcement(BaseModel):
    model_config = ConfigDict(extra="ignore")
    peer_id: str
    seq: int = 0
    sent_at: float = Field(default_factory=time.time)
    proof: str | None = None  # private swarms: HMAC of the swarm secret over who and when (see prove)


class Capabilities(BaseModel):
    device: str = "cpu"
    threads: int = 1
    memory_bytes: int = 0  # the Scout's budget for weights + KV caches
    throughput: float | None = None  # block-tokens per second measured on its span (decode, batch 1)


class ScoutAnnouncement(Announcement):
    kind: Literal["scout"] = "scout"
    role: Literal["span", "draft"] = "span"
    vocab_digest: str | None = None  # a draft Scout's vocabulary, which must be the Oracle's
    data_host: str  # informative only: the Oracle dials the address it observes, never this one
    data_port: int
    listening: bool = True  # False (--no-listen, behind NAT): it opens the data-plane connection itself
    model: str | None = None  # the shard set it serves (manifest digest), None until it loads one
    span: tuple[int, int] | None = None
    state: Literal["idle", "loading", "serving"] = "idle"
    capabilities: Capabilities = Field(default_factory=Capabilities)
    sessions: int = 0
    load: float = 0.0  # requests per second served over the last heartbeat
    free_kv_bytes: int = 0


class OracleAnnouncement(Announcement):
    kind: Literal["oracle"] = "oracle"
    model: str  # shard set id (manifest digest) Scouts must load
    model_name: str
    n_layers: int
    shards_url: str | None = None  # where the shard files are served over HTTP
    block_bytes: int = 0
    vocab_digest: str | None = None
    multiaddrs: list[str] = Field(default_factory=list)
    assignments: dict[str, tuple[int, int]] = Field(default_factory=dict)  # Scout peer id → span
    data_port: int = 0  # where Scouts that cannot be reached open their data-plane connection (0: nowhere)
    dial_in: list[str] = Field(default_factory=list)  # Scouts the Oracle cannot reach: they dial in


class AnnouncementError(ValueError):
    pass


# A proof older (or newer) than this is refused: a recorded announcement cannot be replayed later.
PROOF_SECONDS = 120.0


def _mac(secret: str, a: Announcement) -> str:
    return hmac.new(secret.encode(), f"{a.kind}|{a.peer_id}|{a.seq}|{a.sent_at!r}".encode(), hashlib.sha256).hexdigest()


def prove(secret: str | None, a: Announcement) -> Announcement:
    """Sign ``a`` with the swarm secret (no-op without one). The peer id inside is the gossip
    signer's, so a proof cannot be lifted into another peer's announcement."""
    if secret:
        a.proof = _mac(secret, a)
    return a


def proof_problem(secret: str | None, a: Announcement) -> str | None:
    """Why ``a`` does not prove knowledge of the swarm secret (None: it does, or no secret is set)."""
    if not secret:
        return None
    if not a.proof or not hmac.compare_digest(a.proof, _mac(secret, a)):
        return "it does not prove knowledge of the swarm secret (--swarm-secret)"
    if abs(time.time() - a.sent_at) > PROOF_SECONDS:
        return "its swarm-secret proof is stale (clocks more than two minutes apart, or a replay)"
    return None


def replayed(new: Announcement, last: Announcement) -> bool:
    """``new`` is no newer than ``last`` from the same peer: a late relay or a replay. Ignored, so
    a replayed heartbeat cannot keep a dead Scout alive nor an old Oracle announcement move a Scout
    (a restarted node counts from 1 again, but its clock has moved on)."""
    return new.seq <= last.seq and new.sent_at <= last.sent_at


def encode(message: Announcement) -> bytes:
    data = message.model_dump_json().encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise AnnouncementError(f"{type(message).__name__} of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def decode(cls: type[Announcement], sender: str, data: bytes) -> Announcement:
    """Parse ``data`` as ``cls``, refusing oversize messages and announcements made for
    another peer than the one that signed them."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise AnnouncementError(f"message of {len(data)} bytes from {sender}")
    try:
        message = cls.model_validate_json(data)
    except ValidationError as e:
        raise AnnouncementError(f"malformed {cls.__name__} from {sender}: {e.errors()[0]['msg']}") from None
    if message.peer_id != sender:
        raise AnnouncementError(f"{sender} sent an announcement in the name of {message.peer_id}")
    return message
