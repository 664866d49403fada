"""Speculative decoding through a real swarm: two span Scouts and a draft Scout over libp2p."""

from __future__ import annotations

import openai
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QT

from oracle.swarm.local_scouts import LocalScout
from shard_common.model.loader import load_weights

from ..model.test_gguf_files import ROPE_BASE, write_gguf
from .conftest import ADMIN_KEY, OracleProcess, same_or_tied_tokens

PROMPTS = ["Write a short poem about the sea.", "Repeat exactly: the red fox and the blue bird sat on the old stone wall.",
           "What is the capital of France?"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    oracle = OracleProcess(tmp_path_factory.mktemp("spec"), "--local-scouts", "2", "--local-draft-scouts", "1")
    yield oracle
    oracle.stop()


def ask(url, model_id, prompt, **kw):
    c = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    return c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": prompt}], max_tokens=40,
                                     logprobs=True, top_logprobs=2, **kw).choices[0]


def same_or_tied(a, b) -> bool:
    return same_or_tied_tokens(a.logprobs.content, b.logprobs.content)


def test_draft_scout_speculation_gives_the_plain_greedy_output(swarm, model_id):
    status = swarm.wait_for("the draft Scout", lambda st: [s for s in st["scouts"] if s["role"] == "draft" and s["state"] == "active"])
    assert status[0]["span"] == [0, 30]
    before = swarm.status()["speculative"]
    identical = [same_or_tied(ask(swarm.url, model_id, p, temperature=0, extra_body={"speculative": "off"}),
                              ask(swarm.url, model_id, p, temperature=0, extra_body={"speculative": "scout"})) for p in PROMPTS]
    assert sum(identical) >= len(PROMPTS) - 1
    after = swarm.status()["speculative"]
    assert "scout" in after["drafters"]
    drafted, accepted = after["drafted"] - before["drafted"], after["accepted"] - before["accepted"]
    passes, emitted = after["passes"] - before["passes"], after["emitted"] - before["emitted"]
    # The draft Scout runs the same model: nearly every drafted token is accepted.
    assert drafted > 20 and accepted / drafted > 0.7 and emitted / passes > 2.5
    # ... so its guess of the Oracle's next token comes true and drafts requested ahead get used.
    ahead = after["drafter_stats"]["scout"]
    assert ahead["ahead_used"] > 0 and ahead["ahead_used"] <= ahead["drafted_ahead"] and ahead["failures"] == 0
    # Where the drafts' time went (bench/speculative.py reads it): the draft Scout's compute, the engine's wait.
    assert ahead["drafts"] > 0 and ahead["draft_compute_ms"] > 0 and ahead["wait_ms"] >= 0


def test_sampled_requests_speculate_with_the_drafters_distribution(swarm, model_id):
    """Above temperature 0 the draft Scout samples and sends its distribution; the Oracle accepts
    by rejection sampling (its exactness is tested in tests/unit and tests/model)."""
    before = swarm.status()["speculative"]
    a = ask(swarm.url, model_id, PROMPTS[0], temperature=0.8, seed=5, extra_body={"speculative": "scout"})
    b = ask(swarm.url, model_id, PROMPTS[0], temperature=0.8, seed=5, extra_body={"speculative": "scout"})
    after = swarm.status()["speculative"]
    assert a.message.content and a.finish_reason in ("stop", "length")
    assert after["accepted"] > before["accepted"] and after["drafted"] > after["accepted"] - before["accepted"]
    assert a.message.content == b.message.content  # seeded: the Oracle's and the drafter's draws repeat


def test_a_drafter_with_another_vocabulary_is_refused(swarm, tmp_path, weights):
    spec = weights.tokenizer
    other = type(spec)(**{**spec.__dict__, "tokens": spec.tokens[:-1] + ["<not-the-same>"]})
    cfg = transformers.LlamaConfig(vocab_size=len(spec.tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_theta=ROPE_BASE, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path / "other-vocab.gguf"
    write_gguf(path, transformers.AutoModelForCausalLM.from_config(cfg).eval(), "llama", other, QT.F32)
    assert load_weights(path).tokenizer.vocab_digest() != spec.vocab_digest()
    bootstrap = swarm.status()["oracle_multiaddrs"][0]
    scout = LocalScout(None, tmp_path / "bad-drafter", ["--role", "draft", "--draft-model", str(path), "--bootstrap", bootstrap,
                                                        "--heartbeat", "0.5", "--threads", "1"])
    try:
        refused = swarm.wait_for("the refusal", lambda st: [s for s in st["scouts"] if s["peer_id"] == scout.address.peer_id
                                                            and s["state"] == "refused"])
        assert "vocabulary" in refused[0]["refused"]
        assert all(s["state"] != "active" for s in swarm.status()["scouts"] if s["peer_id"] == scout.address.peer_id)
    finally:
        scout.stop()
