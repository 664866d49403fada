"""Keys, rate limits and stored completions against real Redis servers and real Oracle processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import openai
import pytest
import redis
import requests

from oracle.store.redis_server import redis_binary

from .conftest import ADMIN_KEY, OracleProcess, cli, client, create_key, free_port

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class RedisProcess:
    """A real redis-server on a TCP port, with an append-only file so it can be restarted."""

    def __init__(self, directory):
        self.dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen([redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                                      "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                if r.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise TimeoutError("redis did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory):
    r = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield r
    if r.proc.poll() is None:
        r.stop()


@pytest.fixture(scope="module")
def two_oracles(shared_redis, tmp_path_factory):
    """Two Oracle replicas sharing one Redis, as behind a load balancer."""
    a = OracleProcess(tmp_path_factory.mktemp("a"), "--redis-url", shared_redis.url, "--auth-cache-seconds", "1")
    try:
        b = OracleProcess(tmp_path_factory.mktemp("b"), "--redis-url", shared_redis.url, "--auth-cache-seconds", "1")
    except Exception:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


# --- keys and auth ----------------------------------------------------------------------------------


def test_key_lifecycle_via_cli(oracle, model_id):
    data_dir = os.path.dirname(oracle.log_path)
    key = create_key("carol", "--rpm", "100", data_dir=data_dir)
    assert key.startswith("sk-oracle-") and len(key) >= len("sk-oracle-") + 32
    listing = cli("list", data_dir=data_dir)
    assert listing.returncode == 0 and "carol" in listing.stdout and key not in listing.stdout and key[:14] in listing.stdout
    c = client(oracle.url, key)
    assert c.models.list().data[0].id == model_id
    forbidden = requests.get(oracle.url + "/v1/cluster/status", headers={"Authorization": f"Bearer {key}"}, timeout=5)
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "admin_required"
    assert cli("revoke", "carol", data_dir=data_dir).returncode == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            c.models.list()
        except openai.AuthenticationError:
            break
        time.sleep(0.3)
    with pytest.raises(openai.AuthenticationError) as e:
        c.models.list()
    assert e.value.body["code"] == "invalid_api_key"


def test_401_cases(server):
    for headers in ({}, {"Authorization": "Bearer sk-oracle-wrong-" + "y" * 32}, {"Authorization": "Basic abc"}):
        r = requests.get(server + "/v1/models", headers=headers, timeout=5)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(server + "/v1/models", headers={"X-API-Key": ADMIN_KEY}, timeout=5).status_code == 200
    assert requests.get(server + "/health", timeout=5).status_code == 200  # public


def test_rpm_shared_by_two_oracles(two_oracles, shared_redis, model_id):
    a, b = two_oracles
    key = create_key("rpm3", "--rpm", "3", redis_url=shared_redis.url)
    statuses, last = [], None
    for url in (a.url, b.url, a.url, b.url):
        last = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        statuses.append(last.status_code)
        if last.status_code == 200:
            assert last.headers["x-ratelimit-limit-requests"] == "3"
    assert statuses == [200, 200, 200, 429]
    assert last.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(last.headers["Retry-After"]) >= 1
    assert last.headers["x-ratelimit-remaining-requests"] == "0"


def test_tpm_enforced(two_oracles, shared_redis, model_id):
    a, _ = two_oracles
    key = create_key("tpm", "--rpm", "100", "--tpm", "150", redis_url=shared_redis.url)
    c = client(a.url, key)
    r = c.chat.completions.with_raw_response.create(model=model_id, messages=QUESTION, max_tokens=60, temperature=0)
    assert r.headers["x-ratelimit-limit-tokens"] == "150"
    used = r.parse().usage.total_tokens
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=150 - 37, temperature=0)
    assert e.value.body["code"] == "rate_limit_exceeded"
    assert used < 150
    with pytest.raises(openai.RateLimitError):  # can never fit
        c.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=1000, temperature=0)


def test_a_request_without_max_tokens_never_spends_past_the_key_limit(two_oracles, shared_redis, model_id):
    """It used to reserve only its prompt and then generate up to the context window."""
    a, _ = two_oracles
    key = create_key("tpm-open", "--rpm", "100", "--tpm", "120", redis_url=shared_redis.url)
    c = client(a.url, key)
    long = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]
    body = c.chat.completions.create(model=model_id, messages=long, temperature=0, extra_body={"ignore_eos": True})
    assert body.usage.total_tokens <= 120 and body.choices[0].finish_reason == "length"
    with pytest.raises(openai.RateLimitError):  # the reservation covered everything it could generate: spent
        c.chat.completions.create(model=model_id, messages=long, temperature=0)


# --- stored completions -----------------------------------------------------------------------------


def test_stored_completion_round_trip(two_oracles, shared_redis, model_id):
    a, b = two_oracles
    key = create_key("store-user", "--rpm", "1000", redis_url=shared_redis.url)
    ca, cb = client(a.url, key), client(b.url, key)
    made = ca.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, max_tokens=12, metadata={"topic": "geo"})
    got = cb.chat.completions.retrieve(made.id)  # any replica
    assert got.choices[0].message.content == made.choices[0].message.content
    assert got.usage.total_tokens == made.usage.total_tokens
    assert 0 < shared_redis.client().ttl(f"shard:cmpl:{made.id}") <= 30 * 86400
    messages = ca.chat.completions.messages.list(made.id)
    assert [m.content for m in messages.data] == ["What is the capital of France?"]
    updated = ca.chat.completions.update(made.id, metadata={"topic": "capitals"})
    assert updated.metadata == {"topic": "capitals"}
    stream = ca.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, max_tokens=12, stream=True)
    chunks = list(stream)
    streamed = cb.chat.completions.retrieve(chunks[0].id)
    assert streamed.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    unstored = ca.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        ca.chat.completions.retrieve(unstored.id)
    assert ca.chat.completions.delete(made.id).deleted
    with pytest.raises(openai.NotFoundError):
        cb.chat.completions.retrieve(made.id)


def test_isolation_between_keys_and_admin_sees_all(two_oracles, shared_redis, model_id):
    a, _ = two_oracles
    k1 = create_key("iso-1", "--rpm", "1000", redis_url=shared_redis.url)
    k2 = create_key("iso-2", "--rpm", "1000", redis_url=shared_redis.url)
    mine = client(a.url, k1).chat.completions.create(model=model_id, messages=QUESTION, max_tokens=2)
    other = client(a.url, k2)
    with pytest.raises(openai.NotFoundError) as e:
        other.chat.completions.retrieve(mine.id)
    assert e.value.body["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.messages.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.update(mine.id, metadata={"owner": "me now"})
    assert mine.id not in [c.id for c in other.chat.completions.list(limit=100)]
    assert client(a.url, ADMIN_KEY).chat.completions.retrieve(mine.id).metadata in (None, {})


def test_list_pagination_and_filters(two_oracles, shared_redis, model_id):
    a, _ = two_oracles
    c = client(a.url, create_key("pager", "--rpm", "1000", redis_url=shared_redis.url))
    ids = [c.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=1, metadata={"n": str(i % 2)}).id for i in range(5)]
    first = c.chat.completions.list(limit=2)
    assert [x.id for x in first.data] == ids[:2] and first.has_more
    second = c.chat.completions.list(limit=2, after=first.data[-1].id)
    assert [x.id for x in second.data] == ids[2:4]
    everything = [x.id for x in c.chat.completions.list(limit=2)]  # the SDK follows `after` pages
    assert everything == ids
    assert [x.id for x in c.chat.completions.list(order="desc", limit=5).data] == ids[::-1]
    assert [x.id for x in c.chat.completions.list(metadata={"n": "1"}).data] == [ids[1], ids[3]]
    assert c.chat.completions.list(model="other-model").data == []


def test_redis_outage_loses_no_completion(two_oracles, shared_redis, model_id):
    a, b = two_oracles
    key = create_key("outage", "--rpm", "1000", redis_url=shared_redis.url)
    c = client(a.url, key)
    c.models.list()  # the key is now verified and cached on Oracle a
    shared_redis.stop()
    try:
        made = c.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, max_tokens=8)
        assert c.chat.completions.retrieve(made.id).id == made.id  # served from the buffer
        # A key nobody has verified yet can't be checked: a clear 503, not a crash.
        r = requests.get(b.url + "/v1/models", headers={"Authorization": "Bearer sk-oracle-never-seen-" + "z" * 32}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "auth_unavailable"
    finally:
        shared_redis.start()
    deadline = time.monotonic() + 30
    while shared_redis.client().get(f"shard:cmpl:{made.id}") is None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert client(b.url, key).chat.completions.retrieve(made.id).choices[0].message.content == made.choices[0].message.content


def test_taint_marks_reach_stored_completions_and_responses(shared_redis, tmp_path):
    """A Scout fails a check after it served a chat completion and a response: both stored
    objects get ``tainted_by``, each in its own store (real Redis, the real ledger and marker)."""
    from oracle.api.storage import TaintMarker
    from oracle.store.completions import CompletionStore
    from oracle.store.redis_server import async_client
    from oracle.trust.taint import TaintLedger

    async def scenario() -> tuple[dict, dict]:
        client = async_client(shared_redis.url)
        completions = CompletionStore(client, "taint-test:", 60, journal=tmp_path / "c.jsonl")
        responses = CompletionStore(client, "taint-test:", 60, journal=tmp_path / "r.jsonl", kind="resp")
        ledger = TaintLedger()
        ledger.served("liar", ["s-chat", "s-resp"])
        for ident, store, session in (("chatcmpl-1", completions, "s-chat"), ("resp_1", responses, "s-resp")):
            assert ledger.label([session], ident) == []  # stored clean: nothing known yet
            await store.save({"id": ident, "owner": "k", "created_ms": 1, "completion": {}})
        ledger.quarantined("liar", "failed a golden ticket")
        marker = TaintMarker(ledger, completions, responses, interval_seconds=0.05)
        marker.start()
        await asyncio.sleep(0.5)
        await marker.close()
        out = await completions.get("chatcmpl-1", None), await responses.get("resp_1", None)
        await client.aclose()
        return out

    chat, response = asyncio.run(scenario())
    for record in (chat, response):
        assert [m["peer_id"] for m in record["tainted_by"]] == ["liar"]
        assert record["tainted_by"][0]["reason"] == "failed a golden ticket"
