"""The in-process replica fixture's teardown (tests/fixtures/replica.py): it must end tasks that
swallow a cancellation, as a follower does when redis-py drops a CancelledError, and name the ones
that never end."""

import asyncio

import pytest

from tests.fixtures.replica import drain_tasks


async def _swallows_first_cancel(polls: list[int]) -> None:
    """A follower loop whose first cancellation is lost inside a 'Redis call'."""
    swallowed = False
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed = True  # what redis-py does to some cancelled commands
        polls.append(1)


def test_a_task_that_swallows_one_cancel_is_cancelled_again_until_it_ends():
    loop = asyncio.new_event_loop()
    try:
        polls: list[int] = []
        task = loop.create_task(_swallows_first_cancel(polls))
        plain = loop.create_task(asyncio.sleep(3600))
        loop.run_until_complete(asyncio.sleep(0.05))
        loop.run_until_complete(drain_tasks(loop, timeout_s=5.0))
        assert task.cancelled() and plain.cancelled()
        assert polls  # it did run on after the first cancel
    finally:
        loop.close()


def test_a_task_that_never_ends_is_named():
    loop = asyncio.new_event_loop()
    stop: list[int] = []

    async def immortal() -> None:
        while not stop:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass

    try:
        task = loop.create_task(immortal(), name="follower-immortal")
        with pytest.raises(RuntimeError, match="follower-immortal"):
            loop.run_until_complete(drain_tasks(loop, timeout_s=0.2))
    finally:
        stop.append(1)  # let it end, so the loop closes with nothing pending
        loop.run_until_complete(asyncio.wait([task], timeout=1.0))
        loop.close()
