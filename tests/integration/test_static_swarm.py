"""Oracle + two Scout processes on loopback over the TLS data plane (Scouts given by address)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import openai
import pytest

from .conftest import ADMIN_KEY, OracleProcess

PROMPTS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain."]


class ScoutProcess:
    def __init__(self, data_dir, span: str, *extra: str):
        self.log_path = data_dir / "scout.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "scout.cli", "--span", span, "--data-dir", str(data_dir), *extra],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        deadline = time.monotonic() + 120
        self.address = None
        while self.address is None and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"scout exited with {self.proc.returncode}; see {self.log_path}")
            m = re.match(r"scout (\S+) span", line)
            if m:
                self.address = m.group(1)
        if self.address is None:
            raise TimeoutError("scout did not start")

    @property
    def peer_id(self) -> str:
        return self.address.split("@")[0]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def scouts(tmp_path_factory):
    made = []
    try:
        for span in ("0:11", "11:30"):
            made.append(ScoutProcess(tmp_path_factory.mktemp("scout"), span))
        yield made
    finally:
        for s in made:
            s.stop()


def answers(url: str, model_id: str) -> list[str]:
    c = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    return [c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=24)
            .choices[0].message.content for p in PROMPTS]


def test_swarm_output_identical_to_single_process(scouts, server, model_id, tmp_path):
    swarm = OracleProcess(tmp_path, "--scouts", ",".join(s.address for s in scouts))
    try:
        assert answers(swarm.url, model_id) == answers(server, model_id)
        c = openai.OpenAI(base_url=swarm.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0, max_tokens=24, stream=True) if ch.choices)
        assert "Paris" in streamed
        three = c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Say a word."}], n=3,
                                          temperature=1.0, seed=9, max_tokens=6)
        assert len(three.choices) == 3  # n > 1 forks the prompt's caches on every Scout
    finally:
        swarm.stop()


def test_oracle_refuses_a_scout_with_the_wrong_identity(scouts, tmp_path):
    real, other = scouts
    forged = other.peer_id + "@" + real.address.split("@")[1]  # right address, someone else's peer id
    with pytest.raises(RuntimeError):
        OracleProcess(tmp_path, "--scouts", forged + "," + other.address)
    log = open(next(tmp_path.glob("oracle-*.log"))).read()
    assert "not the expected" in log


def test_uncovered_blocks_are_a_clear_startup_error(scouts, tmp_path):
    with pytest.raises(RuntimeError):
        OracleProcess(tmp_path, "--scouts", scouts[1].address)
    assert "no Scout serves block 0" in open(next(tmp_path.glob("oracle-*.log"))).read()


def test_killing_a_scout_mid_stream_fails_over_to_a_replica(tmp_path_factory, server, model_id, tmp_path):
    """SIGKILL the Scout serving the second hop while a stream is running: a replica takes over,
    the session is replayed into it, and the client gets the same tokens without an error."""
    made = []
    try:
        for span in ("0:11", "11:30", "11:30"):
            made.append(ScoutProcess(tmp_path_factory.mktemp("fo"), span))
        swarm = OracleProcess(tmp_path, "--scouts", ",".join(s.address for s in made))
        try:
            kw = dict(model=model_id, messages=[{"role": "user", "content": "Write a short poem about the sea."}],
                      temperature=0, max_tokens=40)
            expected = openai.OpenAI(base_url=server + "/v1", api_key=ADMIN_KEY).chat.completions.create(**kw).choices[0].message.content
            c = openai.OpenAI(base_url=swarm.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
            pieces = []
            for i, chunk in enumerate(c.chat.completions.create(**kw, stream=True)):
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                if i == 5:
                    made[1].proc.kill()  # the chain uses the first Scout given for a span
            assert "".join(pieces) == expected
            assert "moved from" in open(swarm.log_path).read()
        finally:
            swarm.stop()
    finally:
        for s in made:
            s.stop()
