"""compose/: the files every service references exist, every SHARD_* variable is a real option of
the command it configures, and ports line up. (``docker compose config`` too, where docker is.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from oracle.cli import build_parser as oracle_parser
from scout.cli import build_parser as scout_parser
from shard_common.settings import env_name

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
ENV_ONLY = {"SHARD_ADMIN_KEY"}  # read from the environment by the Oracle, not a flag


def option_envs(parser) -> set[str]:
    return {env_name(o) for a in parser._actions for o in a.option_strings if o.startswith("--")}


def serve_parser():
    sub = next(a for a in oracle_parser()._actions if a.dest == "command")
    return sub.choices["serve"]


def test_compose_file_is_consistent():
    doc = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    services = doc["services"]
    assert set(services) == {"redis", "oracle", "scout"}
    commands = {"oracle": option_envs(serve_parser()), "scout": option_envs(scout_parser())}
    for name in ("oracle", "scout"):
        service = services[name]
        context = (COMPOSE / service["build"]["context"]).resolve()
        dockerfile = context / service["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (context / source).exists(), f"{dockerfile.name} copies missing {source}"
        env = service["environment"]
        unknown = {k for k in env if k.startswith("SHARD_")} - commands[name] - ENV_ONLY
        assert not unknown, f"{name}: {unknown} are not options of its command"
        exposed = {int(p) for line in dockerfile.read_text().splitlines() if line.startswith("EXPOSE") for p in line.split()[1:]}
        ports = {int(env[k]) for k in env if k.endswith("_PORT")}
        assert ports <= exposed, (name, ports, exposed)
        for dependency in service.get("depends_on", {}):
            assert dependency in services
    oracle = services["oracle"]
    assert f'{oracle["environment"]["SHARD_PORT"]}:{oracle["environment"]["SHARD_PORT"]}' in oracle["ports"]
    assert services["scout"]["environment"]["SHARD_ORACLE_URL"] == oracle["environment"]["SHARD_PUBLIC_URL"]
    assert re.match(r"redis://redis:6379", oracle["environment"]["SHARD_REDIS_URL"])
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if ":" in v}
    assert named <= set(doc["volumes"])
    for service in services.values():
        assert "healthcheck" in service or "HEALTHCHECK" in (COMPOSE.parent / service["build"]["dockerfile"]).read_text()


def test_docker_compose_config_accepts_it():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        import pytest

        pytest.skip("no docker compose on this machine: the structural test above stands in")
    out = subprocess.run([docker, "compose", "-f", str(COMPOSE / "docker-compose.yml"), "config", "--quiet"],
                         capture_output=True, text=True, env={"SHARD_ADMIN_KEY": "sk-oracle-" + "x" * 40, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
