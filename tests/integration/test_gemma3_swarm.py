"""Gemma 3 (a real Q4_K_M file) served through the swarm: `serve --local-scouts 2` answers exactly
as one process does (fp32 wire: hidden states cross the network unrounded)."""

from __future__ import annotations

import requests

from .conftest import ADMIN_KEY, OracleProcess

PROMPT = "The capital of France is"


def complete(oracle: OracleProcess) -> str:
    r = requests.post(oracle.url + "/v1/completions", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120,
                      json={"model": "gemma-3-270m-q4_k_m", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_gemma3_through_two_scouts_answers_as_one_process(tmp_path_factory, gemma_path):
    single = OracleProcess(tmp_path_factory.mktemp("gemma-single"), "--model", str(gemma_path))
    try:
        alone = complete(single)
    finally:
        single.stop()
    swarm = OracleProcess(tmp_path_factory.mktemp("gemma-swarm"), "--model", str(gemma_path), "--local-scouts", "2", ready=False)
    try:
        status = swarm.wait_for("two Scouts serving Gemma's 18 blocks", lambda st: len(st["chain"]) == 2 and st, timeout=240)
        assert status["n_layers"] == 18
        assert complete(swarm) == alone
        assert "France" in alone or "Paris" in alone  # a base model continuing the sentence about France
    finally:
        swarm.stop()
