"""A work queue of FineTuneJobs to reconcile: one run per object at a time, bursts coalesced, bounded concurrency."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

Key = tuple[str, str]
# Runs the work for a key; returns seconds until it should run again though nothing changed, or None.
Work = Callable[[Key], Awaitable[float | None]]


@dataclass
class _Entry:
    timer: asyncio.TimerHandle | None = None
    running: bool = False
    dirty: bool = False
    failures: int = 0


class WorkQueue:
    """Level-triggered work: every event about an object only marks it; a run reads the object's current state.

    Events that arrive while an object's run is in flight make exactly one more run after it, however many there
    are; at most `workers` runs are in flight. A failed run is retried after `retry_seconds` (by attempt, the last
    repeating); a run may ask to be looked at again after a delay (a Job whose pods have not started).
    """

    def __init__(self, work: Work, workers: int, retry_seconds: tuple[float, ...]) -> None:
        self._work = work
        self._slots = asyncio.Semaphore(workers)
        self._retry_seconds = retry_seconds
        self._entries: dict[Key, _Entry] = {}
        self._tasks: set[asyncio.Task] = set()

    def add(self, key: Key, delay: float = 0.0) -> None:
        """Run the work for `key` after `delay` seconds; sooner if already due sooner, once more if it is running."""
        entry = self._entries.setdefault(key, _Entry())
        if entry.running:
            entry.dirty = entry.dirty or delay == 0
            if delay and not entry.dirty:
                self._later(key, entry, delay)
            return
        if delay == 0:
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
            self._start(key, entry)
            return
        self._later(key, entry, delay)

    def forget(self, key: Key) -> None:
        """Drop pending work for a deleted object (a run in flight finishes and finds it gone)."""
        entry = self._entries.get(key)
        if entry is None:
            return
        if entry.timer is not None:
            entry.timer.cancel()
        if not entry.running:
            del self._entries[key]

    async def drain(self) -> None:
        """Wait until no run is in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _later(self, key: Key, entry: _Entry, delay: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if entry.timer is not None and entry.timer.when() <= due:
            return
        if entry.timer is not None:
            entry.timer.cancel()
        entry.timer = loop.call_at(due, self._due, key)

    def _due(self, key: Key) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.timer = None
        if entry.running:
            entry.dirty = True
        else:
            self._start(key, entry)

    def _start(self, key: Key, entry: _Entry) -> None:
        entry.running = True
        task = asyncio.create_task(self._run(key, entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: Key, entry: _Entry) -> None:
        while True:
            again: float | None = None
            try:
                async with self._slots:
                    # Events until now are seen by this run, which reads the current state.
                    entry.dirty = False
                    again = await self._work(key)
                entry.failures = 0
            except Exception:
                delay = self._retry_seconds[min(entry.failures, len(self._retry_seconds) - 1)]
                entry.failures += 1
                logger.exception("reconciling %s/%s failed; retrying in %.0fs", *key, delay)
                again = delay
            if not entry.dirty:
                break
        entry.running = False
        if again is not None:
            self._later(key, entry, again)
        elif entry.timer is None and self._entries.get(key) is entry and entry.failures == 0:
            del self._entries[key]
