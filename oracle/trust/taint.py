"""Which answers a quarantined Scout may have spoiled.

Every forward a Scout serves is noted here with the sessions it carried, except sessions the
Oracle verified end to end (followed from their first position, every forward checked). A passed
check vouches only for the forward it checked, so a clean audit does not clear the list: it holds
every unverified session the Scout carried since it connected (the newest ``limit``). When the
Scout fails a check, those sessions are tainted: named in the log and the cluster status, and the
stored completions they produced are marked (the API layer takes the marks with ``take_marks``;
a completion stored later asks ``taints_of`` and is stored marked).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

log = logging.getLogger(__name__)


class TaintLedger:
    def __init__(self, limit: int = 10000):
        self.limit = limit
        self._served: dict[str, OrderedDict[str, None]] = {}  # peer → unverified sessions, oldest first
        self._dropped: dict[str, int] = {}  # sessions that fell off a peer's list
        self._tainted: dict[str, dict] = {}  # peer → {"time", "reason", "sessions"}
        self._session_taints: dict[str, set[str]] = {}  # session → peers that tainted it
        self._labels: OrderedDict[str, str] = OrderedDict()  # session → the stored object it produced
        self._marks: list[tuple[str, dict]] = []  # (stored id, taint) not yet written
        self._lock = threading.Lock()  # forwards are noted on the engine's thread, quarantines anywhere

    def served(self, peer: str, sessions: list[str]) -> None:
        with self._lock:
            seen = self._served.setdefault(peer, OrderedDict())
            for s in sessions:
                seen[s] = None
                seen.move_to_end(s)
            while len(seen) > self.limit:
                seen.popitem(last=False)
                self._dropped[peer] = self._dropped.get(peer, 0) + 1

    def quarantined(self, peer: str, reason: str) -> list[str]:
        """``peer`` failed a check: taint what it served unverified. Returns the sessions."""
        with self._lock:
            sessions = list(self._served.pop(peer, {}))
            dropped = self._dropped.pop(peer, 0)
            entry = self._tainted.setdefault(peer, {"time": time.time(), "reason": reason, "sessions": [], "unlisted": 0})
            entry["sessions"] = (entry["sessions"] + sessions)[-self.limit:]
            entry["unlisted"] += dropped
            taint = {"peer_id": peer, "reason": reason, "time": entry["time"]}
            for s in sessions:
                self._session_taints.setdefault(s, set()).add(peer)
                if s in self._labels:
                    self._marks.append((self._labels[s], taint))
        if sessions or dropped:
            log.warning("Scout %s failed a check: %d sessions it served unverified are tainted%s: %s", peer, len(sessions),
                        f" (and {dropped} older ones not listed)" if dropped else "", ", ".join(sessions[:20]) +
                        (" …" if len(sessions) > 20 else ""))
        return sessions

    def label(self, sessions: list[str], ident: str) -> list[dict]:
        """``sessions`` produced the stored object ``ident``; returns the taints they already carry."""
        with self._lock:
            for s in sessions:
                self._labels[s] = ident
                self._labels.move_to_end(s)
            while len(self._labels) > self.limit * 4:
                self._labels.popitem(last=False)
            peers = sorted({p for s in sessions for p in self._session_taints.get(s, ())})
            return [{"peer_id": p, "reason": self._tainted[p]["reason"], "time": self._tainted[p]["time"]} for p in peers]

    def take_marks(self) -> list[tuple[str, dict]]:
        """Stored objects to mark as tainted since the last call: (id, taint)."""
        with self._lock:
            marks, self._marks = self._marks, []
        return marks

    def report(self, peer: str) -> dict | None:
        with self._lock:
            entry = self._tainted.get(peer)
            if entry is None:
                return None
            return {**entry, "completions": sorted({self._labels[s] for s in entry["sessions"] if s in self._labels})}

    def status(self) -> dict:
        with self._lock:
            return {peer: {"sessions": len(e["sessions"]) + e["unlisted"], "since": e["time"]} for peer, e in self._tainted.items()}
