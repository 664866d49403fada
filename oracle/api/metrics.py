"""Prometheus metrics (``GET /metrics``): counters and histograms updated as requests run, and
gauges read from the Oracle's state at scrape time (queue, Scouts, coverage, speculation,
golden tickets)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("shard_http_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("shard_http_request_seconds", "HTTP request duration (streams: until the last byte)",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("shard_time_to_first_token_seconds", "From admission to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("shard_inter_token_latency_seconds", "Between consecutive tokens of one choice",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("shard_generation_seconds", "From admission to the last token of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("shard_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("shard_completion_tokens", "Generated tokens of finished requests", registry=r)
        self.batch = Histogram("shard_batch_sequences", "Sequences in one engine step", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                               registry=r)
        self.rate_limited = Counter("shard_rate_limit_rejections", "Requests refused with 429", registry=r)
        self.redis_errors = Counter("shard_redis_errors", "Requests that met a Redis error", registry=r)

    def watch(self, state) -> None:
        """Read the rest from ``state`` (an OracleState) at every scrape."""
        self.registry.register(StateCollector(state))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Time to first token, inter-token latency and duration of one generation request."""

    def __init__(self, metrics: Metrics | None):
        self.metrics = metrics
        self.started = time.perf_counter()
        self.last: dict[int, float] = {}

    def token(self, index: int) -> None:
        if self.metrics is None:
            return
        now = time.perf_counter()
        if not self.last:
            self.metrics.ttft.observe(now - self.started)
        elif index in self.last:
            self.metrics.itl.observe(now - self.last[index])
        self.last[index] = now

    def done(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self.metrics is None:
            return
        self.metrics.e2e.observe(time.perf_counter() - self.started)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.completion_tokens.inc(completion_tokens)


class StateCollector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        state = self.state
        sched = state.scheduler
        yield gauge("shard_running_sequences", "Sequences in the running batch", sched.running_sequences)
        yield gauge("shard_queue_depth", "Requests waiting for a batch slot", len(sched.waiting))
        c = CounterMetricFamily("shard_engine_steps", "Engine steps run")
        c.add_metric([], sched.steps)
        yield c
        spec = sched.engine.speculation_status()
        g = GaugeMetricFamily("shard_speculative", "Speculative decoding totals", labels=["what"])
        for what in ("passes", "drafted", "accepted", "acceptance_rate", "tokens_per_pass"):
            g.add_metric([what], float(spec[what] or 0))
        yield g
        swarm = state.swarm
        if swarm is None:
            yield labelled("shard_block_coverage", "Servers of each block", "block", {str(b): 1 for b in range(state.n_layers)})
            return
        status = swarm.status()
        states: dict[str, int] = {}
        for scout in status["scouts"]:
            states[scout["state"]] = states.get(scout["state"], 0) + 1
        yield labelled("shard_scouts", "Scouts by state", "state", states)
        yield labelled("shard_block_coverage", "Live Scouts serving each block", "block",
                       {str(b): n for b, n in enumerate(status["coverage"])})
        yield gauge("shard_failovers", "Hops replaced after a Scout failed", status["failovers"])
        tickets = status.get("tickets") or {}
        yield labelled("shard_golden_tickets", "Checks of Scouts (golden tickets and real traffic) by result", "result",
                       {"passed": tickets.get("passed", 0), "failed": tickets.get("failed", 0)})


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def labelled(name: str, doc: str, label: str, values: dict[str, float]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        g.add_metric([key], value)
    return g
