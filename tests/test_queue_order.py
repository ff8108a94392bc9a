"""The queue's order: retries first, then by epoch (what queued between two admission rounds), longest
``max_tokens`` first within an epoch, FIFO otherwise (rollout_plugin/pool/core/queue.py)."""

from __future__ import annotations

import asyncio

from rollout_plugin.pool.core.ledger import Ledger
from rollout_plugin.types import Request, SamplingParams


def _queue(ledger: Ledger, rid: str, max_tokens: int, front: bool = False) -> None:
    loop = asyncio.new_event_loop()
    try:
        ticket = ledger.open(Request(rid, [1, 2, 3], sampling=SamplingParams(max_tokens=max_tokens)),
                             loop.create_future(), 0.0)
    finally:
        loop.close()
    ledger.enqueue(ledger.unit(ticket, 1), front=front)


def _next(ledger: Ledger) -> str:
    key = ledger.queue.oldest()
    assert key is not None
    return ledger.take(key).ticket.request.id


def test_a_burst_goes_longest_first_and_equal_lengths_stay_fifo():
    ledger = Ledger(engines=1)
    for rid, mt in [("a", 50), ("b", 400), ("c", 100), ("d", 400), ("e", 30), ("f", 100)]:
        _queue(ledger, rid, mt)
    # b and d ask 400 (b first: FIFO among equals), then c and f (100), then a, e
    assert [_next(ledger) for _ in range(6)] == ["b", "d", "c", "f", "a", "e"]


def test_later_long_work_never_overtakes_short_work_already_waiting():
    ledger = Ledger(engines=1)
    for rid, mt in [("short1", 20), ("short2", 10), ("long0", 300)]:
        _queue(ledger, rid, mt)
    assert _next(ledger) == "long0"  # an admission round took: the first epoch is closed
    _queue(ledger, "long1", 5000)  # a later epoch
    _queue(ledger, "long2", 900)
    assert [_next(ledger) for _ in range(4)] == ["short1", "short2", "long1", "long2"]


def test_a_retry_still_goes_before_new_work_however_long():
    ledger = Ledger(engines=1)
    _queue(ledger, "new", 8000)
    _queue(ledger, "retried", 5, front=True)
    assert [_next(ledger) for _ in range(2)] == ["retried", "new"]


def test_calls_are_walked_in_the_order_they_started():
    """Cuts and requeues walk the ledger's calls: in start order, so one simulated run gives one set of figures
    (as a set of objects, memory-address order: the same simulated run differed by up to 8 % between processes)."""
    ledger = Ledger(engines=4)
    for i in range(64):
        _queue(ledger, f"r{i}", 100)
    started = [ledger.start_call(i % 4, [_take_next(ledger)], 0, float(i)) for i in range(64)]
    assert list(ledger.calls) == started
    for call in started[::3]:
        ledger.end_call(call)
    assert list(ledger.calls) == [c for i, c in enumerate(started) if i % 3]


def _take_next(ledger: Ledger):
    key = ledger.queue.oldest()
    assert key is not None
    return ledger.take(key)
