"""What operators touch: Prometheus metrics, the live dashboard (in real headless Chromium), and
``shard-oracle status``, against an Oracle with two Scouts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import openai
import pytest
import requests

from .conftest import ADMIN_KEY, OracleProcess


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    oracle = OracleProcess(tmp_path_factory.mktemp("ops"), "--local-scouts", "2")
    yield oracle
    oracle.stop()


def scrape(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_move_with_traffic(swarm, model_id):
    assert requests.get(swarm.url + "/metrics", timeout=5).status_code == 401
    before = scrape(swarm.url)
    c = openai.OpenAI(base_url=swarm.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    list(c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Count to five."}], max_tokens=8, stream=True))
    after = scrape(swarm.url)
    chat = 'shard_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}'
    assert after[chat] - before.get(chat, 0) == 2
    assert after["shard_completion_tokens_total"] - before.get("shard_completion_tokens_total", 0) >= 2
    assert after["shard_time_to_first_token_seconds_count"] - before.get("shard_time_to_first_token_seconds_count", 0) == 2
    assert after["shard_inter_token_latency_seconds_count"] > before.get("shard_inter_token_latency_seconds_count", 0)
    assert after["shard_batch_sequences_count"] > before.get("shard_batch_sequences_count", 0)
    assert after['shard_scouts{state="active"}'] == 2
    assert all(after[f'shard_block_coverage{{block="{b}"}}'] == 1 for b in range(30))
    assert 'shard_speculative{what="passes"}' in after and 'shard_golden_tickets{result="passed"}' in after


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it where apt-get is available)")
    return path


def test_dashboard_shows_the_live_swarm_in_headless_chromium(swarm, tmp_path):
    browser = chromium()
    scouts = [s["peer_id"] for s in swarm.status()["scouts"]]
    url = f"{swarm.url}/dashboard?key={ADMIN_KEY}"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=15000"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom, dom[:2000]
    cells = re.findall(r'data-block="(\d+)" data-coverage="(\d+)"', dom)
    assert [int(b) for b, _ in cells] == list(range(30)) and all(int(n) >= 1 for _, n in cells)
    assert all(f'data-peer="{peer}"' in dom for peer in scouts)
    assert dom.count('<td class="reached">direct</td>') == len(scouts)  # how each Scout is reached
    shot = tmp_path / "dashboard.png"
    subprocess.run([*flags, "--window-size=1280,900", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
    print("dashboard screenshot:", shot)
    # Without the admin key there is no data, only a key form.
    assert requests.get(swarm.url + "/dashboard", timeout=5).status_code == 401


def test_status_command_prints_the_picture(swarm):
    out = subprocess.run([sys.executable, "-m", "oracle.cli", "status", "--url", swarm.url, "--key", ADMIN_KEY],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "coverage 111111111111111111111111111111" in out.stdout
    assert "audits of real traffic: 0 of 0 sessions followed" in out.stdout  # its own local Scouts are not audited
    for s in swarm.status()["scouts"]:
        assert s["peer_id"][-10:] in out.stdout
    bad = subprocess.run([sys.executable, "-m", "oracle.cli", "status", "--url", swarm.url, "--key", "sk-oracle-" + "z" * 40],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "401" in bad.stdout
