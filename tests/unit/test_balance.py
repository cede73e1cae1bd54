"""Spreading keep-alive connections over a server's workers (mlserve.balance)."""

from __future__ import annotations

import random

from mlserve.balance import ConnectionBalancer


def serve_round(balancer: ConnectionBalancer, clients: list[tuple[str, int]]) -> list:
    """One request on each connection; returns the connections told to close."""
    return [c for c in clients if balancer.seen(c)]


def test_a_worker_over_its_share_closes_exactly_its_surplus_once() -> None:
    busy = ConnectionBalancer()
    clients = [("127.0.0.1", 40000 + i) for i in range(24)]
    serve_round(busy, clients)
    assert busy.active() == 24
    busy.rebalance(24, [24, 8])  # fair share 16: 8 too many
    closed = serve_round(busy, clients)
    assert len(closed) == 8
    still_open = [c for c in clients if c not in closed]
    assert serve_round(busy, still_open) == []  # the budget is spent until the next heartbeat
    assert busy.active() == 16


def test_within_the_tolerance_nothing_is_closed() -> None:
    balancer = ConnectionBalancer()
    clients = [("127.0.0.1", 41000 + i) for i in range(17)]
    serve_round(balancer, clients)
    balancer.rebalance(17, [17, 15])  # one over the fair share of 16
    assert serve_round(balancer, clients) == []


def test_one_worker_disabled_or_no_client_address_never_closes() -> None:
    clients = [("127.0.0.1", 42000 + i) for i in range(10)]
    alone = ConnectionBalancer()
    serve_round(alone, clients)
    alone.rebalance(10, [10])
    off = ConnectionBalancer(enabled=False)
    off.rebalance(10, [10, 0])
    assert serve_round(alone, clients) == [] and serve_round(off, clients) == []
    assert off.active() == 10  # still counted, for /admin/stats
    assert ConnectionBalancer().seen(None) is False


def test_idle_connections_leave_the_count_after_the_window(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("mlserve.balance.time.monotonic", lambda: now[0])
    balancer = ConnectionBalancer(window_seconds=2.0)
    serve_round(balancer, [("127.0.0.1", 43000 + i) for i in range(5)])
    now[0] += 1.0
    balancer.seen(("127.0.0.1", 43100))
    assert balancer.active() == 6
    now[0] += 1.5  # the first five are now 2.5 s old
    assert balancer.active() == 1


def test_two_workers_converge_from_a_lopsided_accept() -> None:
    """Simulate the kernel handing each reconnection to either worker at random."""
    rng = random.Random(7)
    workers = [ConnectionBalancer(), ConnectionBalancer()]
    owner = {("127.0.0.1", 50000 + i): 0 if i < 30 else 1 for i in range(32)}  # 30 / 2
    port = 51000
    for _heartbeat in range(10):
        for _ in range(5):  # a few requests per connection between heartbeats
            for client, w in list(owner.items()):
                if workers[w].seen(client):
                    del owner[client]
                    port += 1
                    owner[("127.0.0.1", port)] = rng.randrange(2)
        counts = [w.active() for w in workers]
        for w, balancer in enumerate(workers):
            balancer.rebalance(counts[w], counts)
    split = sorted(sum(1 for w in owner.values() if w == i) for i in range(2))
    assert len(owner) == 32
    assert split[1] - split[0] <= 3, split
