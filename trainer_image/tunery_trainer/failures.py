"""How the trainer ends on bad input: a JSON {reason, message} termination message and an exit code per class."""

import json
import os
from pathlib import Path

from tunery.api import contract
from tunery_trainer.data import MESSAGE_CHARS, DataError
from tunery_trainer.redaction import redact
from tunery_trainer.storage import StorageError

# Unreachable storage is worth a retry (the Job's backoffLimit); the other classes are final (podFailurePolicy).
_RETRYABLE_STORAGE = {"StorageUnreachable"}
EXIT_RETRYABLE = 1


class UnsupportedError(Exception):
    """The spec asks for something this machine or model cannot do; reported as reason Unsupported."""

    reason = "Unsupported"

    def __init__(self, message: str) -> None:
        self.message = redact(message)
        super().__init__(self.message)


def exit_code(error: DataError | StorageError | UnsupportedError) -> int:
    if isinstance(error, DataError):
        return contract.EXIT_DATA_ERROR
    if isinstance(error, UnsupportedError):
        return contract.EXIT_UNSUPPORTED
    return EXIT_RETRYABLE if error.reason in _RETRYABLE_STORAGE else contract.EXIT_STORAGE_ERROR


def write_termination_message(reason: str, message: str) -> None:
    """Where Kubernetes reads it (the file exists in a pod), or TUNERY_TERMINATION_MESSAGE_PATH for local runs."""
    override = os.environ.get("TUNERY_TERMINATION_MESSAGE_PATH")
    path = Path(override or contract.TERMINATION_MESSAGE_PATH)
    if override or path.exists():
        # Kubernetes keeps at most 4096 bytes of it.
        path.write_text(json.dumps({"reason": reason, "message": redact(message)[:MESSAGE_CHARS]}))
