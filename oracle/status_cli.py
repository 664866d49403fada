"""``shard-oracle status``: the dashboard's picture in the terminal (rich tables)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from rich.console import Console
from rich.table import Table
from rich.text import Text

COVERAGE_STYLE = {0: "white on red", 1: "white on green", 2: "white on dark_green"}


def fetch_status(url: str, key: str | None) -> dict:
    request = urllib.request.Request(url.rstrip("/") + "/v1/cluster/status",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def render(status: dict, console: Console) -> None:
    spec, tickets = status.get("speculative") or {}, status.get("tickets") or {}
    console.print(f"[bold]{status['model']}[/bold] · {status['mode']} · Oracle {status.get('oracle_peer_id') or '(local)'}")
    console.print(f"running {status['running_sequences']} · waiting {status['waiting_requests']} · sessions {status['sessions']} · "
                  f"failovers {status['failovers']} · tokens generated {status['tokens_generated']} · "
                  f"round trips/token {status.get('round_trips_per_token') or '–'} · "
                  f"speculative acceptance {spec.get('acceptance_rate')} · checks {tickets.get('passed', 0)} ok / "
                  f"{tickets.get('failed', 0)} failed")
    if audits := status.get("audits"):
        console.print(f"audits of real traffic: {audits['sessions_followed']} of {audits['sessions_started']} sessions followed · "
                      f"{audits['recomputed']} recomputed · {100 * audits['audit_share']:.1f}% of engine time · "
                      f"tainted sessions {sum(t['sessions'] for t in audits['tainted'].values())}")
    strip = Text("coverage ")
    for n in status["coverage"]:
        strip.append(str(min(n, 9)), style=COVERAGE_STYLE.get(min(n, 2)))
    console.print(strip)
    table = Table(title="Scouts")
    for column in ("peer", "role", "blocks", "state", "reached", "reputation", "probation", "latency ms", "throughput", "load",
                   "sessions", "free KV MB"):
        table.add_column(column)
    for s in status["scouts"]:
        free = s.get("free_kv_bytes")
        table.add_row(s["peer_id"][-10:], s.get("role") or "span", f"{s['span'][0]}–{s['span'][1]}" if s.get("span") else "–",
                      s["state"], s.get("reached") or "–", str(s.get("reputation") or "–"), str(s.get("probation_left") or "–"),
                      str(s.get("latency_ms") or "–"), str(s.get("throughput") or "–"),
                      str(s.get("load") if s.get("load") is not None else "–"), str(s.get("sessions", 0)),
                      f"{free / 1048576:.0f}" if free is not None else "–")
    console.print(table)


def run_status_command(args: argparse.Namespace) -> int:
    # Piped output (a file, a test) gets room for every column instead of rich's 80.
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        render(fetch_status(args.url, args.key), console)
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        console.print(f"[red]{e.code}[/red] {body}")
        return 1
    except (urllib.error.URLError, OSError) as e:
        console.print(f"[red]cannot reach {args.url}[/red]: {e}")
        return 1
    return 0
