"""Helpers shared by the benchmark scripts: result files, tables, memory."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def rss_mb() -> float:
    """This process's resident memory."""
    rss = _rss_mb_of("self")
    return float("nan") if rss is None else rss


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _rss_mb_of(pid: int | str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def process_tree_rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of an Oracle and its children (local Scouts, embedded Redis), by role:
    {"oracle": MB, "scout-0": MB, ..., "redis": MB}."""
    out: dict[str, float] = {}
    todo, scouts = [pid], 0
    while todo:
        p = todo.pop(0)
        rss = _rss_mb_of(p)
        if rss is None:
            continue
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if p == pid:
            name = "oracle"
        elif "scout.cli" in cmdline or "shard-scout" in cmdline:
            name, scouts = f"scout-{scouts}", scouts + 1
        elif "redis-server" in cmdline:
            name = "redis"
        else:
            name = f"pid-{p}"
        out[name] = rss
        todo += _children(p)
    return out


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(widths[c]) for c in columns))


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def save_plot(draw, rows: list[dict], name: str) -> None:
    """``draw(rows, path)`` into bench/results/<name>.png, if matplotlib (pip install shard[bench]) is there."""
    path = RESULTS / f"{name}.png"
    try:
        draw(rows, path)
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    print("wrote", path)
