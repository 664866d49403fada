"""OpenAI request and response bodies, field by field (see docs/openai-compatibility.md).

Unknown fields are ignored. Known fields this server cannot honor yet are declared here too, so
that a request using them is rejected with a 400 naming the field instead of silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from oracle.engine.sampler import SamplingParams

from .errors import APIError, bad_request

if TYPE_CHECKING:
    from oracle.engine.grammar import Grammar

MAX_STOP = 4


@dataclass
class RequestLimits:
    """The server's own limits on what one request may ask."""

    max_n: int = 16
    max_tokens: int | None = None


def check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's limits on ``metadata``."""
    if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
        raise ValueError("at most 16 pairs, keys up to 64 and values up to 512 characters")
    return value


class Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(Schema):
    type: Literal["text"]
    text: str


class ChatMessage(Schema):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None  # deprecated form of tool_calls

    @field_validator("content", mode="before")
    @classmethod
    def only_text_parts(cls, value):
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part {i} has type {kind!r}; only 'text' parts are supported")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(Schema):
    include_usage: bool = False


class SamplingFields(Schema):
    """Fields shared by chat and legacy completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions many servers accept (vLLM, llama.cpp).
    top_k: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    # Shard's own: how to decode this request (see docs/speculative.md); the server's --speculative when unset.
    speculative: Literal["off", "ngram", "scout", "auto"] | None = None

    @field_validator("stop")
    @classmethod
    def stop_list(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def bias_values(cls, value):
        if value is None:
            return value
        if len(value) > 1024:
            raise ValueError("at most 1024 entries")
        for key, bias in value.items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for {key} must be between -100 and 100")
        return value

    def stop_list_value(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def asked_max_tokens(self) -> int | None:
        """The completion length the client asked for (None: as long as the context allows)."""
        return self.max_tokens

    def asked_logprobs(self) -> tuple[bool, int]:
        """(whether to compute logprobs, how many alternatives per token)."""
        return False, 0

    def to_sampling_params(self, vocab_size: int, prompt_len: int, context_length: int, limits: RequestLimits,
                           grammar: Grammar | None = None, token_budget: int | None = None) -> SamplingParams:
        """This request as the engine's parameters, decided once: everything downstream (the
        sequences, the rate-limit reservation, usage) reads ``max_tokens`` from the result.

        ``token_budget``: the most tokens the key may spend on one request (its tokens per
        minute). A request that names no length gets what the context and that budget allow, so
        its reservation covers everything it can generate."""
        asked = self.asked_max_tokens()
        room = context_length - prompt_len
        if room <= 0 or (asked is not None and asked > room):
            raise APIError(
                400,
                f"This model's maximum context length is {context_length} tokens. However, you requested "
                f"{prompt_len + (asked or 1)} tokens ({prompt_len} in the messages, {asked or 1} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="messages", code="context_length_exceeded",
            )
        if limits.max_tokens is not None and asked is not None and asked > limits.max_tokens:
            raise bad_request(f"max_tokens is limited to {limits.max_tokens} on this server", "max_tokens", "invalid_value")
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            token = int(key)
            if not 0 <= token < vocab_size:
                raise bad_request(f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})", "logit_bias",
                                  "invalid_value")
            bias[token] = value
        max_tokens = asked if asked is not None else min(room, limits.max_tokens or room)
        if asked is None and token_budget is not None:
            affordable = (token_budget - prompt_len) // (self.n or 1)
            if affordable < 1:
                raise APIError(429, f"This request needs more than {token_budget} tokens (its prompt has {prompt_len}) but the "
                               f"key's limit is {token_budget} tokens per minute.", type="tokens", code="rate_limit_exceeded")
            max_tokens = min(max_tokens, affordable)
        logprobs, top_logprobs = self.asked_logprobs()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=bias,
            seed=self.seed,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            stop=self.stop_list_value(),
            ignore_eos=bool(self.ignore_eos),
            speculative=self.speculative,
            grammar=grammar,
        )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None  # deprecated: tools
    function_call: Any = None  # deprecated: tool_choice
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    # Extensions: vLLM's structured_outputs (json, regex, choice, grammar) and llama.cpp's GBNF grammar.
    structured_outputs: dict[str, Any] | None = None
    grammar: str | None = None
    # Known but not implemented: rejected with a 400 when set.
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def metadata_limits(cls, value):
        return check_metadata(value)

    @model_validator(mode="after")
    def top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "audio", "modalities", "prediction", "reasoning_effort", "web_search_options",
    )

    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def asked_logprobs(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0


TokenArray = list[int]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenArray | list[TokenArray]
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1, le=20)
    suffix: str | None = None

    def asked_max_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens  # the legacy API's default

    def asked_logprobs(self) -> tuple[bool, int]:
        # best_of > n ranks candidates by their summed logprobs, so they are computed anyway.
        return self.logprobs is not None or (self.best_of or 1) > (self.n or 1), self.logprobs or 0

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


# Responses


class Usage(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(Schema):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Schema):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class FunctionCall(Schema):
    name: str
    arguments: str  # JSON text


class ToolCall(Schema):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


FinishReason = Literal["stop", "length", "tool_calls", "function_call"]


class AssistantMessage(Schema):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # only when the request used the deprecated functions


class ChatChoice(Schema):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletion(Schema):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage
    service_tier: str | None = None


class ChunkDelta(Schema):
    role: Literal["assistant"] | None = None
    content: str | None = None
    # OpenAI's tool-call deltas: {index, id, type, function: {name, arguments: ""}} first, then
    # {index, function: {arguments: fragment}}.
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, str] | None = None


class ChunkChoice(Schema):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Schema):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(Schema):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Schema):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(Schema):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(Schema):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "shard"


class ModelList(Schema):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(Schema):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Schema):
    error: ErrorDetail


class Health(Schema):
    status: Literal["ok", "no_route", "stopping"]
    model: str | None
    ready: bool
    running_sequences: int
    waiting_requests: int


# Stored completions


class TaintMark(Schema):
    """A Scout that computed part of this answer later failed a check (docs/trust.md)."""

    peer_id: str
    reason: str
    time: float  # unix time of the failure


class StoredCompletion(ChatCompletion):
    metadata: dict[str, str] = Field(default_factory=dict)
    tainted_by: list[TaintMark] | None = None  # Shard: Scouts that computed it and later failed a check


class CursorPage(Schema):
    """OpenAI's cursor-paginated list: pass ``last_id`` as ``after`` for the next page."""

    object: Literal["list"] = "list"
    first_id: str | None
    last_id: str | None
    has_more: bool


class StoredList(CursorPage):
    data: list[StoredCompletion]


class MetadataUpdate(Schema):
    metadata: dict[str, str] | None

    @field_validator("metadata")
    @classmethod
    def metadata_limits(cls, value):
        return check_metadata(value)


class Deleted(Schema):
    id: str
    object: Literal["chat.completion.deleted"] = "chat.completion.deleted"
    deleted: bool


class StoredMessage(Schema):
    id: str
    role: str
    content: str | None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None


class StoredMessageList(CursorPage):
    data: list[StoredMessage]


# Cluster


class ScoutStatus(Schema):
    peer_id: str
    address: str | None  # data plane HOST:PORT (None until the Oracle has connected)
    reached: Literal["direct", "scout-dialed"] | None = None  # who opened the data-plane connection
    span: tuple[int, int] | None
    state: Literal["active", "spare", "joining", "quarantined", "refused", "dead"]
    reputation: str | None = None  # active / quarantined / banned, from golden tickets
    cooldown_s: float | None = None  # it stopped answering: seconds until it is tried again
    reachable: bool | None = None
    probation_left: int | None = None  # forwards still to be checked by the Oracle before it samples them
    clean_checks: int | None = None  # checks it passed (tickets and checked forwards)
    tainted_sessions: int | None = None  # sessions it served unverified before it failed a check
    role: Literal["span", "draft"] = "span"  # draft: proposes tokens for speculative decoding
    refused: str | None = None  # why the Oracle will not use it
    sessions: int = 0  # sessions the Oracle routes through it
    requests: int = 0
    round_trips: dict[str, int] = {}  # data-plane requests by kind (forward, cache, ping, draft)
    last_ms: float | None = None
    latency_ms: float | None = None  # smoothed forward round trip: the routing weight
    forwards: int = 0  # hub forwards (Oracle → this Scout → Oracle), timed
    chained_forwards: int = 0  # forwards it did as a hop of a chain (its input from the Scout before it)
    overhead_ms: float | None = None  # mean round trip minus the Scout's compute time, per hub forward
    tokens_forwarded: int = 0
    wire_bytes: int = 0
    # What the Scout announces over libp2p (absent for Scouts given by address with --scouts):
    announced_state: str | None = None
    assigned_span: tuple[int, int] | None = None
    announced_span: tuple[int, int] | None = None
    heartbeat_age_s: float | None = None
    throughput: float | None = None  # block-tokens per second, measured by the Scout on its span
    memory_bytes: int | None = None
    device: str | None = None
    load: float | None = None  # requests per second it served over its last heartbeat
    sessions_on_scout: int | None = None
    free_kv_bytes: int | None = None
    p2p_connected: bool | None = None


class SwarmInfo(Schema):
    peer_id: str
    multiaddrs: list[str]  # /ip4/.../tcp/.../p2p/PEER: what shard-scout --bootstrap takes
    model: str


class ScoutReputation(Schema):
    object: Literal["scout.reputation"] = "scout.reputation"
    peer_id: str
    state: Literal["active", "quarantined", "banned"]
    passed: int  # golden tickets, ever
    failed: int
    recent: str  # the last tickets, oldest first: 1 passed, 0 failed
    score: float | None  # passed share of the recent tickets
    ban_until: float | None  # unix time, while banned
    updated: float


class ScoutReputationList(Schema):
    object: Literal["list"] = "list"
    data: list[ScoutReputation]


class ScoutReputationDeleted(Schema):
    peer_id: str
    object: Literal["scout.reputation.deleted"] = "scout.reputation.deleted"
    deleted: bool


class ScoutTaint(Schema):
    reason: str
    time: float
    sessions: list[str]  # sessions it served unverified before it failed (the newest ones)
    unlisted: int  # older such sessions not listed
    completions: list[str]  # stored completions among them (marked with tainted_by)


class ScoutReputationDetail(ScoutReputation):
    evidence: list[dict]  # failed checks, newest first: input hash, expected vs received summary
    tainted: ScoutTaint | None = None  # what it may have spoiled, since this Oracle started


class SpeculationStatus(Schema):
    mode: str  # the server's default (--speculative)
    drafters: list[str]
    passes: int  # verification passes of finished sequences
    drafted: int
    accepted: int
    emitted: int  # tokens produced by verification passes
    acceptance_rate: float | None
    tokens_per_pass: float | None
    # Per drafter: a draft Scout's failures, drafts requested ahead of their step and those used.
    drafter_stats: dict[str, dict[str, int | float]] = {}  # per drafter: failures, drafts ahead, waits (ms)


class LinkStatus(Schema):
    from_peer: str  # the Scout that could not relay
    to_peer: str  # to this one
    seconds_left: float


class ChainStatus(Schema):
    enabled: bool  # off: serve --no-chain
    passes: int  # steps that went through a chain of Scouts (Oracle → S1 → … → Sn → Oracle)
    hops: int  # Scouts those chains went through
    fallbacks: int  # chained steps that broke and went on the hub way
    overhead_ms_per_hop: float | None = None  # chained steps' wall time minus the Scouts' compute, per hop
    breaks: int  # links between two Scouts found unable to relay
    hub_only: list[LinkStatus] = []  # links left to the hub path for now


class DataPlaneStatus(Schema):
    passes: int  # forward passes through the whole route
    round_trips: int  # data-plane requests to Scouts those passes took (replays and cache operations included)
    round_trips_per_pass: float | None  # = hops per pass when cache operations ride on forwards
    failovers: int
    piggyback: bool  # cache operations ride on the next forward (off: serve --eager-cache-ops)
    chain: ChainStatus | None = None


class ClusterStatus(Schema):
    model: str
    n_layers: int
    mode: Literal["local", "swarm"]
    oracle_peer_id: str | None
    oracle_multiaddrs: list[str] = []  # where Scouts reach the control plane (--bootstrap)
    wire_dtype: str | None
    coverage: list[int]  # live Scouts serving each block (the Oracle itself in local mode)
    chain: list[str]
    local_spans: list[tuple[int, int]]  # spans the Oracle computes itself (--fallback-local)
    scouts: list[ScoutStatus]
    failovers: int
    data_plane: DataPlaneStatus | None = None
    round_trips_per_token: float | None = None  # data-plane round trips per generated token, since start
    tickets: dict | None = None  # golden tickets: passed, failed, rate, tolerance, honest error p50/max
    audits: dict | None = None  # real traffic: sessions followed, recomputed, audit share, policy, taints
    sessions: int
    running_sequences: int
    waiting_requests: int
    tokens_generated: int
    steps: int
    speculative: SpeculationStatus
