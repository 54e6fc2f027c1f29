"""SIGTERM (an evicted or preempted pod) asks the loop to checkpoint after the current step and stop."""

import logging
import os
import signal
import time

from tunery.api import contract

logger = logging.getLogger("tunery_trainer")

_signalled_at: float | None = None
_announced = False


class Preempted(Exception):
    """Training stopped early on SIGTERM, after checkpointing `step`; the Job retries and resumes from it."""

    reason = "Preempted"

    def __init__(self, step: int) -> None:
        self.step = step
        grace = _grace_seconds()
        taken = (
            ""
            if _signalled_at is None
            else f" {_since_signal():.1f} s after it" + (f", of a {grace} s grace period" if grace else "")
        )
        self.message = (
            f"the pod was asked to stop (SIGTERM: eviction, preemption or deletion) and checkpointed step {step}"
            f"{taken}; the Job retries it from that checkpoint"
        )
        super().__init__(self.message)


def _grace_seconds() -> int | None:
    """The pod's grace period as the operator rendered it; unknown outside a pod."""
    seconds = os.environ.get(contract.GRACE_SECONDS_ENV, "")
    return int(seconds) if seconds.isdigit() else None


def _since_signal() -> float:
    return time.monotonic() - (_signalled_at or time.monotonic())


def _request(_signum: int, _frame: object) -> None:
    # Only a note of when: the handler runs between bytecodes, possibly mid-step or mid-write of a log line; the
    # loop acts, and says so, at a step boundary.
    global _signalled_at
    if _signalled_at is None:
        _signalled_at = time.monotonic()


def install() -> None:
    """Handle SIGTERM from now on (the trainer's command; a library caller keeps its own handling)."""
    signal.signal(signal.SIGTERM, _request)


def requested() -> bool:
    """Whether SIGTERM came; the first time it has, log how long is left to checkpoint (what a slow upload needs)."""
    global _announced
    if _signalled_at is None:
        return False
    if not _announced:
        _announced = True
        grace = _grace_seconds()
        left = (
            f"within the {grace - _since_signal():.0f} s left of the pod's {grace} s grace period"
            if grace
            else "(the pod's grace period is not known here)"
        )
        logger.warning("SIGTERM: checkpointing this step and stopping %s", left)
    return True
