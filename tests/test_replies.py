"""The outbox and the memory of recent jobs, without a broker."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from agent.jobs.replies import Outbox, Recent, Reply, job_key


def test_a_redelivered_job_is_known_in_flight_then_answered() -> None:
    recent: Recent[str] = Recent(size=2)
    key = job_key(b'{"id": "j1"}')
    assert key == job_key(b'{"id": "j1"}')
    assert key != job_key(b'{"id": "j1", "model": "other"}')  # same id, other job: not a duplicate
    assert key not in recent
    recent.start(key)
    assert key in recent
    assert recent.get(key) is None  # in flight: ignore the duplicate
    recent.finish(key, "result")
    assert recent.get(key) == "result"  # answered: send it again


def test_recent_forgets_the_oldest_and_cancelled_jobs() -> None:
    recent: Recent[str] = Recent(size=2)
    a, b, c = (job_key(x) for x in (b"a", b"b", b"c"))
    recent.finish(a, "A")
    recent.finish(b, "B")
    recent.start(a)  # touched: now the newest
    recent.finish(c, "C")
    assert b not in recent
    assert a in recent
    assert c in recent
    recent.forget(c)
    assert c not in recent


def test_outbox_keeps_a_reply_until_it_was_sent_in_order() -> None:
    async def go() -> None:
        box = Outbox(size=10)
        first, second = Reply("t/1", b"1", job="1"), Reply("t/2", b"2", job="2")
        box.put(first)
        box.put(second)
        assert await box.first() is first
        assert await box.first() is first  # a failed publish leaves it first
        box.sent(first)
        assert await box.first() is second
        waiter = asyncio.ensure_future(box.flushed())
        await asyncio.sleep(0)
        assert not waiter.done()
        box.sent(second)
        await asyncio.wait_for(waiter, 1)
        assert len(box) == 0

    asyncio.run(go())


def test_outbox_waits_for_a_reply() -> None:
    async def go() -> None:
        box = Outbox()
        taker = asyncio.ensure_future(box.first())
        await asyncio.sleep(0)
        assert not taker.done()
        reply = Reply("t", b"x")
        box.put(reply)
        assert await asyncio.wait_for(taker, 1) is reply

    asyncio.run(go())


def test_a_full_outbox_drops_the_oldest_and_says_so() -> None:
    box = Outbox(size=2)
    with capture_logs() as logs:
        for i in range(3):
            box.put(Reply("t", str(i).encode(), job=str(i)))
    assert len(box) == 2
    assert box.dropped == 1
    assert [e["job"] for e in logs if e["event"] == "result_dropped"] == ["0"]
