"""The reconcile work queue: one run per object at a time, a burst of events is one more run, bounded concurrency."""

import asyncio

from tunery.controller.workqueue import WorkQueue

RETRY = (0.01, 0.02)


class Recorder:
    """Work that records each run and how many were in flight at once; each run waits until released."""

    def __init__(self, fail: int = 0, again: float | None = None) -> None:
        self.runs: list[tuple[str, str]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()
        self.fail = fail
        self.again = again

    async def __call__(self, key: tuple[str, str]) -> float | None:
        self.runs.append(key)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
            if self.fail:
                self.fail -= 1
                raise RuntimeError("the API server is away")
            again, self.again = self.again, None
            return again
        finally:
            self.in_flight -= 1


async def settle(queue: WorkQueue) -> None:
    for _ in range(5):
        await asyncio.sleep(0.05)
        await queue.drain()


def test_a_burst_during_a_run_makes_exactly_one_more_run() -> None:
    async def scenario() -> list[tuple[str, str]]:
        work = Recorder()
        queue = WorkQueue(work, workers=4, retry_seconds=RETRY)
        queue.add(("ns", "a"))
        await asyncio.sleep(0)
        for _ in range(50):
            queue.add(("ns", "a"))
        work.release.set()
        await settle(queue)
        return work.runs

    assert asyncio.run(scenario()) == [("ns", "a"), ("ns", "a")]


def test_runs_are_bounded_by_the_workers_and_events_before_a_run_share_it() -> None:
    async def scenario() -> Recorder:
        work = Recorder()
        queue = WorkQueue(work, workers=2, retry_seconds=RETRY)
        for name in "abcde":
            queue.add(("ns", name))
            queue.add(("ns", name))
        await asyncio.sleep(0.05)
        assert work.in_flight == 2
        work.release.set()
        await settle(queue)
        return work

    work = asyncio.run(scenario())
    assert work.most_in_flight == 2
    assert sorted(work.runs) == [("ns", name) for name in "abcde"]


def test_a_failed_run_is_retried_and_a_run_may_ask_to_be_looked_at_again() -> None:
    async def scenario() -> list[tuple[str, str]]:
        work = Recorder(fail=2, again=0.01)
        work.release.set()
        queue = WorkQueue(work, workers=1, retry_seconds=RETRY)
        queue.add(("ns", "a"))
        await settle(queue)
        return work.runs

    # Two failures retried, the success asks for one more look, which asks for none.
    assert asyncio.run(scenario()) == [("ns", "a")] * 4


def test_a_forgotten_object_is_not_run_again() -> None:
    async def scenario() -> list[tuple[str, str]]:
        work = Recorder()
        work.release.set()
        queue = WorkQueue(work, workers=1, retry_seconds=RETRY)
        queue.add(("ns", "a"), delay=0.05)
        queue.forget(("ns", "a"))
        await settle(queue)
        return work.runs

    assert asyncio.run(scenario()) == []
