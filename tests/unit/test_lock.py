"""The dependency locks (requirements/*.txt, written by scripts/lock.sh) agree with pyproject.toml's
ranges, and every place that installs Shard installs from them, so that a fresh machine gets the
versions CI tested rather than whatever pip resolves that day."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(name: str) -> dict[str, Version]:
    found = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
        assert match, f"requirements/{name}: {line!r} is not an exact pin"
        found[canonicalize_name(match[1])] = Version(match[2])
    return found


def declared(*extras: str) -> list[Requirement]:
    lines = list(PROJECT["dependencies"])
    for extra in extras:
        lines += PROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("lock, extras", [("runtime.txt", ()), ("dev.txt", ("test", "bench"))])
def test_every_declared_dependency_is_locked_within_its_range(lock, extras):
    locked = pins(lock)
    for requirement in declared(*extras):
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is missing from requirements/{lock}: run scripts/lock.sh"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements/{lock} pins {name}=={locked[name]}, outside pyproject.toml's {requirement}: run scripts/lock.sh"
        )


def test_the_runtime_lock_is_the_dev_lock_restricted():
    runtime, dev = pins("runtime.txt"), pins("dev.txt")
    assert runtime.keys() <= dev.keys()
    assert {name: version for name, version in runtime.items() if dev[name] != version} == {}


def test_torch_is_the_cpu_build_without_cuda_packages():
    for lock in ("runtime.txt", "dev.txt"):
        locked = pins(lock)
        assert locked["torch"].local == "cpu", lock
        assert not [name for name in locked if name.startswith("nvidia-")], lock


def test_every_install_goes_through_the_lock():
    """pip never resolves by itself: each install is from a lock file, with --no-deps. (lock.sh's
    throwaway pip-tools venv is the one exception: it makes the lock. gpu_check.sh installs
    wheels/requirements.txt: the pins of requirements/runtime.txt that gpu_wheels.sh downloaded.)"""
    places = [p for p in (ROOT / "scripts").glob("*.sh") if p.name != "lock.sh"] + [*(ROOT / "compose").glob("Dockerfile.*")]
    installs = []
    for path in places:
        text = re.sub(r"\\\n\s*", " ", path.read_text())
        for line in text.splitlines():
            if re.search(r"\bpip install\b", line) and not line.lstrip().startswith("#"):
                installs.append((path.name, line))
                assert "--no-deps" in line, f"{path.name}: {line.strip()}"
                rest = re.sub(r"\s--?\S+(\s+https?://\S+)?", " ", line.split("pip install", 1)[1]).replace('"', "").split()
                allowed = {".", "/app", "${locks[@]}", "wheels", "wheels/requirements.txt"}
                assert all(arg.startswith("requirements/") or arg in allowed or "==" in arg for arg in rest), (
                    f"{path.name}: {line.strip()}"
                )
    assert {name for name, _ in installs} >= {"install.sh", "Dockerfile.oracle", "Dockerfile.scout"}
    # install.sh's locks are lock files too, and every one of them pins exact versions.
    locks = re.findall(r"locks=\(([^)]*)\)", (ROOT / "scripts" / "install.sh").read_text())
    assert locks and all(part.startswith("requirements/") for group in locks for part in group.split() if part != "-r")
    for path in (ROOT / "requirements").glob("*.txt"):
        pins = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith(("#", " "))]
        assert all("==" in line for line in pins), path.name
