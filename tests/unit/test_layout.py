"""The layout a newcomer reads: every module is mapped in docs/architecture.md, and the swarm
never reaches into storage or HTTP (it is handed what it needs)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("oracle", "scout", "shard_common")


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py")


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_every_module_is_in_the_architecture_map():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Where things live"):]
    missing = []
    for path in modules():
        folder = f"`{path.parent.relative_to(ROOT).as_posix()}/`"
        # A row names its folder once; the files of a folder follow in rows of their own.
        rows = table[table.index(folder):] if folder in table else ""
        rows = rows[:re.search(r"\n\| `[a-z_/]+/` \|", rows[1:]).start() + 1] if re.search(r"\n\| `[a-z_/]+/` \|", rows[1:]) else rows
        if f"`{path.name}`" not in rows:
            missing.append(path.relative_to(ROOT).as_posix())
    assert not missing, f"docs/architecture.md does not say what these are for: {missing}"


def test_the_swarm_imports_neither_storage_nor_http():
    offenders = {p.relative_to(ROOT).as_posix(): sorted(n for n in imported(p) if n.startswith(("oracle.store", "oracle.api", "redis")))
                 for p in (ROOT / "oracle" / "swarm").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_import_check_sees_imports():
    """The check above must be able to fail: it reads both import forms."""
    sample = ROOT / "oracle" / "serve.py"
    names = imported(sample)
    assert "oracle.api.app" in names and "asyncio" in names
