"""Property-based fuzzing of every route in the Oracle's own OpenAPI document (under /v1; schemathesis, a
bounded number of examples per route): whatever is generated, no 5xx, and every error is an OpenAI
error body. Half of the bodies name the real model (with tiny token counts, so that generation
paths are fuzzed too without running long); the rest exercise validation."""

from __future__ import annotations

import json
import zlib

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from .conftest import ADMIN_KEY

EXAMPLES = 12


@pytest.fixture(scope="module")
def served_schema(server):
    return schemathesis.openapi.from_url(server + "/openapi.json")


# Every /v1 route is also served without the prefix by the same handler (test_api_clients checks
# that): fuzzing both would only double the time.
schema = schemathesis.pytest.from_fixture("served_schema").include(path_regex=r"^/(v1/|health$|swarm$)")


def aim_at_the_real_model(case, model_id: str) -> None:
    body = case.body
    if not isinstance(body, dict) or "model" not in body or zlib.crc32(json.dumps(body, sort_keys=True, default=str).encode()) % 2:
        return
    body["model"] = model_id
    limit = "max_output_tokens" if case.path.endswith("/responses") else "max_tokens"
    body[limit] = min(3, body[limit]) if isinstance(body.get(limit), int) else 3
    body.pop("max_completion_tokens", None)
    for field in ("n", "best_of"):
        if isinstance(body.get(field), int) and body[field] > 2:
            body[field] = 2


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_no_input_gets_a_5xx_or_an_error_outside_openais_shape(case, server, model_id):
    aim_at_the_real_model(case, model_id)
    response = case.call(base_url=server, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path} {json.dumps(case.body, default=str)} -> {response.text[:500]}"
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], response.text[:500]


def test_the_server_is_still_healthy_after_fuzzing(server):
    assert requests.get(server + "/health", timeout=5).json()["ready"] is True
