"""Keep client connections spread evenly over a server's worker processes.

BentoML's workers share one listening socket, and asyncio accepts every queued connection in one
go. So a burst of new keep-alive connections (a client pool starting up) often lands mostly on
one worker: 30 of 32 in one measured run. With a compute-bound model the other worker then
idles, and throughput fell by up to a quarter. Each worker counts the connections it has served
in the last two seconds and reports the count in its heartbeat (mlserve.control). From all the
reports it computes the fair share. A worker more than one over the fair share closes its
surplus once: the next responses it sends carry ``Connection: close``. Those clients reconnect,
and each new connection goes to whichever worker accepts it first. No request is refused or
retried: a closed connection has just received its full response.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from mlserve import observability as obs


class ConnectionBalancer:
    """Per-worker connection count and the decision to shed a surplus connection.

    ``seen`` runs in the event loop for every request; ``rebalance`` runs in the heartbeat
    thread with the counts that this server's workers reported.
    """

    def __init__(self, enabled: bool = True, window_seconds: float = 2.0, tolerance: int = 1):
        self.enabled = enabled
        self.window = window_seconds
        self.tolerance = tolerance
        self.budget = 0  # connections to close before the next heartbeat
        self._last_seen: dict[Any, float] = {}  # changed only in the event loop
        self._pruned = 0.0

    def seen(self, client: Any) -> bool:
        """Record a request on connection ``client``; True if its response should close it."""
        if client is None:
            return False
        now = time.monotonic()
        self._last_seen[client] = now
        if now - self._pruned >= 1.0:
            cutoff = now - self.window
            for key in [k for k, t in self._last_seen.items() if t < cutoff]:
                del self._last_seen[key]
            self._pruned = now
        if self.budget > 0:
            self.budget -= 1
            del self._last_seen[client]
            obs.observe_connection_shed()
            return True
        return False

    def active(self) -> int:
        """Connections seen within the window (safe to call from another thread)."""
        cutoff = time.monotonic() - self.window
        return sum(1 for t in list(self._last_seen.values()) if t >= cutoff)

    def rebalance(self, mine: int, counts: Iterable[int]) -> None:
        """Set the budget from this worker's count and every live worker's (``mine`` included).

        A worker over the fair share by more than the tolerance closes its whole surplus once;
        about half of those clients reconnect to a sibling, so the next heartbeats close the gap
        geometrically. Only reported counts are compared: a worker never sheds against a target
        that its own shedding has lowered.
        """
        counts = list(counts)
        if not self.enabled or len(counts) < 2:
            self.budget = 0
            return
        surplus = mine - math.ceil(sum(counts) / len(counts))
        self.budget = surplus if surplus > self.tolerance else 0
