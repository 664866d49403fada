"""The client examples in examples/, run as they are against the shared Oracle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ADMIN_KEY

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def env(server: str, model_id: str) -> dict:
    return {**os.environ, "OPENAI_BASE_URL": server + "/v1", "OPENAI_API_KEY": ADMIN_KEY, "SHARD_MODEL": model_id}


@pytest.mark.parametrize("script", ["python_sync.py", "python_async.py", "python_stream.py", "langchain_chat.py"])
def test_python_examples(server, model_id, script):
    out = subprocess.run([sys.executable, str(EXAMPLES / script)], env=env(server, model_id), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_curl_example(server, model_id):
    out = subprocess.run(["bash", str(EXAMPLES / "curl.sh")], env=env(server, model_id), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "Paris" in out.stdout and '"chat.completion"' in out.stdout


def test_node_example(server, model_id, tmp_path):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed")
    work = tmp_path / "node"
    shutil.copytree(EXAMPLES / "node", work)
    install = subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=work, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    out = subprocess.run(["node", "chat.mjs"], cwd=work, env=env(server, model_id), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Paris") == 2  # plain and streamed
