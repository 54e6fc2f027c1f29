"""SIGTERM (an evicted or preempted pod) asks the loop to checkpoint after the current step and stop."""

import signal

_requested = False


class Preempted(Exception):
    """Training stopped early on SIGTERM, after checkpointing `step`; the Job retries and resumes from it."""

    reason = "Preempted"

    def __init__(self, step: int) -> None:
        self.step = step
        self.message = (
            f"the pod was asked to stop (SIGTERM: eviction, preemption or deletion) and checkpointed step {step}; "
            "the Job retries it from that checkpoint"
        )
        super().__init__(self.message)


def _request(_signum: int, _frame: object) -> None:
    # Only a flag: the handler runs between bytecodes, possibly mid-step; the loop acts at a step boundary.
    global _requested
    _requested = True


def install() -> None:
    """Handle SIGTERM from now on (the trainer's command; a library caller keeps its own handling)."""
    signal.signal(signal.SIGTERM, _request)


def requested() -> bool:
    return _requested
