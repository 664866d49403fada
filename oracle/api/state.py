"""What the HTTP layer holds: the tokenizer, the scheduler, the served model names, limits, and
the Redis-backed services (absent until startup connects them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from oracle.engine.grammar import GrammarCompiler
from oracle.engine.scheduler import Scheduler
from oracle.store.completions import CompletionStore
from oracle.swarm.swarm import Swarm
from shard_common.tokenizer import Tokenizer

from .auth import Authenticator, RateLimits
from .schemas import RequestLimits
from .metrics import Metrics


@dataclass
class OracleState:
    tokenizer: Tokenizer
    scheduler: Scheduler
    model_ids: list[str]
    context_length: int
    n_layers: int
    created: int
    fingerprint: str
    grammars: GrammarCompiler  # response_format, tools and grammars, compiled once per distinct source
    limits: RequestLimits = field(default_factory=RequestLimits)
    auth: Authenticator | None = None  # None: --no-auth
    rate_limits: RateLimits | None = None
    completions: CompletionStore | None = None
    responses: CompletionStore | None = None  # /v1/responses, stored like completions
    store_by_default: bool = True
    embedding_pooling: str = "mean"  # /v1/embeddings: mean or last over the final hidden states
    swarm: Swarm | None = None  # None: every block runs in this process
    metrics: Metrics | None = None


STATE = web.AppKey("state", OracleState)
