"""Requests resolve their own engine parameters, once: max_tokens above all, since the
rate-limit reservation and the sequences both read the resolved value."""

from __future__ import annotations

import pytest

from oracle.api.errors import APIError
from oracle.api.schemas import ChatCompletionRequest, CompletionRequest, RequestLimits

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def params(req, prompt_len=10, context=100, limits=RequestLimits(), budget=None):
    return req.to_sampling_params(1000, prompt_len, context, limits, token_budget=budget)


def test_an_unbounded_chat_gets_the_rest_of_the_context_or_what_the_key_affords():
    assert params(ChatCompletionRequest(**CHAT)).max_tokens == 90
    assert params(ChatCompletionRequest(**CHAT), limits=RequestLimits(max_tokens=40)).max_tokens == 40
    assert params(ChatCompletionRequest(**CHAT), budget=50).max_tokens == 40
    assert params(ChatCompletionRequest(**CHAT, n=4), budget=50).max_tokens == 10  # every choice is reserved
    with pytest.raises(APIError) as e:
        params(ChatCompletionRequest(**CHAT), budget=10)
    assert e.value.status == 429


def test_an_asked_length_is_kept_and_checked():
    assert params(ChatCompletionRequest(**CHAT, max_tokens=7)).max_tokens == 7
    assert params(ChatCompletionRequest(**CHAT, max_tokens=7, max_completion_tokens=9)).max_tokens == 9
    assert params(ChatCompletionRequest(**CHAT, max_tokens=7), budget=12).max_tokens == 7  # the reservation refuses it
    with pytest.raises(APIError, match="maximum context length"):
        params(ChatCompletionRequest(**CHAT, max_tokens=91))


def test_legacy_completions_default_to_16_tokens_and_compute_logprobs_for_best_of():
    p = params(CompletionRequest(model="m", prompt="x"))
    assert p.max_tokens == 16 and not p.logprobs
    p = params(CompletionRequest(model="m", prompt="x", best_of=3, n=1))
    assert p.logprobs and p.top_logprobs == 0
    p = params(ChatCompletionRequest(**CHAT, logprobs=True, top_logprobs=3))
    assert p.logprobs and p.top_logprobs == 3
