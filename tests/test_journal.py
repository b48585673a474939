"""The job journal and the outbox, without a broker: what a crash leaves, what a restart owes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.jobs.journal import MAX_ATTEMPTS, Entry, Journal, State
from agent.jobs.replies import Outbox, Reply, job_key


def entry(payload: bytes, topic: str | None = None) -> Entry:
    return Entry(job_key(payload), None, topic, None, payload)


async def test_a_job_taken_before_a_crash_is_run_again_after_it(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    before = Journal(path)
    await before.open()
    job = entry(b'{"id": "j1"}')
    await before.take(job)  # the crash: never closed, never answered
    after = Journal(path)
    owed = await after.open()
    assert [e.payload for e in owed.rerun] == [b'{"id": "j1"}']
    assert owed.rerun[0].attempts == 1
    assert after.state(job.key) is State.TAKEN  # a redelivered copy is not run a second time
    await after.close()


async def test_an_answered_job_is_sent_again_and_a_sent_one_is_known(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    await journal.open()
    answered, sent = entry(b'{"id": "a"}', "t/a"), entry(b'{"id": "s"}', "t/s")
    for e in (answered, sent):
        await journal.take(e)
        await journal.answer(e.key, b"result of " + e.payload)  # type: ignore[operator]
    await journal.sent(sent.key)
    again = Journal(path)
    owed = await again.open()
    assert [(e.key, e.topic) for e in owed.resend] == [(answered.key, "t/a")]
    assert owed.rerun == []
    assert await again.result(answered.key) == b'result of {"id": "a"}'
    assert again.state(sent.key) is State.SENT
    assert await again.result(sent.key) == b'result of {"id": "s"}'  # a copy gets the same answer
    await again.close()


async def test_a_forgotten_answer_lets_the_same_job_run_again(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    await journal.open()
    busy = entry(b'{"id": "b"}', "t/b")
    await journal.take(busy)
    await journal.answer(busy.key, b"busy")
    await journal.sent(busy.key, forget=True)
    assert journal.state(busy.key) is None
    await journal.close()


async def test_a_job_in_flight_at_two_crashes_is_given_up(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    first = Journal(path)
    await first.open()
    await first.take(entry(b'{"id": "poison"}'))
    for attempt in range(1, MAX_ATTEMPTS + 1):
        owed = await Journal(path).open()
        if attempt < MAX_ATTEMPTS:
            assert len(owed.rerun) == 1
            assert not owed.given_up
        else:
            assert not owed.rerun
            assert [e.attempts for e in owed.given_up] == [MAX_ATTEMPTS]


async def test_sent_results_are_pruned_to_the_budget_but_keys_stay(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3", max_bytes=1 << 20)
    await journal.open()
    keys = []
    for i in range(12):
        e = entry(f'{{"id": "{i}"}}'.encode(), "t")
        keys.append(e.key)
        await journal.take(e)
        await journal.answer(e.key, bytes(200_000))
        await journal.sent(e.key)
    assert await journal.result(keys[0]) is None  # the oldest result went
    assert await journal.result(keys[-1]) == bytes(200_000)
    assert journal.state(keys[0]) is State.SENT  # still known: a late copy is not run again
    await journal.close()


async def test_outbox_keeps_a_reply_until_it_was_sent_in_order() -> None:
    box = Outbox()
    first, second = Reply(b"1", "t/1", b"1", job="1"), Reply(b"2", "t/2", b"2", job="2")
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


async def test_outbox_waits_for_a_reply() -> None:
    box = Outbox()
    taker = asyncio.ensure_future(box.first())
    await asyncio.sleep(0)
    assert not taker.done()
    reply = Reply(b"k", "t", b"x")
    box.put(reply)
    assert await asyncio.wait_for(taker, 1) is reply


def test_past_its_byte_budget_the_outbox_keeps_keys_not_bytes_and_drops_nothing() -> None:
    box = Outbox(max_bytes=2_000)
    for i in range(5):
        box.put(Reply(bytes([i]), "t", bytes(900), job=str(i)))
    assert len(box) == 5  # nothing dropped: the journal has the bytes
    assert box.bytes == 1_800
    kept = [r.payload is not None for r in box._items]
    assert kept == [True, True, False, False, False]


def test_job_keys_tell_content_apart() -> None:
    assert job_key(b'{"id": "j1"}') == job_key(b'{"id": "j1"}')
    assert job_key(b'{"id": "j1"}') != job_key(b'{"id": "j1", "model": "other"}')
