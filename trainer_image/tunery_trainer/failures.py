"""The trainer's failure taxonomy: each exception maps to a reason, an exit code and a {reason, message} termination message."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tunery.api import contract
from tunery_trainer.data import MESSAGE_CHARS, DataError
from tunery_trainer.disk import OutOfDiskError, is_full_disk
from tunery_trainer.preemption import Preempted
from tunery_trainer.redaction import redact
from tunery_trainer.storage import RETRYABLE_REASONS, StorageError

# torch's allocators name the failure in the message: CUDA's OutOfMemoryError, the CPU allocator a RuntimeError.
_OUT_OF_MEMORY_TEXTS = ("out of memory", "can't allocate memory")
# Enough of an unclassified error to search for; the pod log has the whole traceback.
_CRASH_CHARS = 600


class UnsupportedError(Exception):
    """The spec asks for something this machine or model cannot do; reported as reason Unsupported."""

    reason = "Unsupported"

    def __init__(self, message: str) -> None:
        self.message = redact(message)
        super().__init__(self.message)


@dataclass(frozen=True)
class Failure:
    """How the trainer ends: the status reason, the message with the fix, the exit code (final ones are not retried)."""

    reason: str
    message: str
    exit_code: int
    classified: bool = True
    """False for an error no class covers: its traceback goes to the log."""


def classify(error: Exception, scratch: Path | None = None) -> Failure:
    """The failure an exception means; `scratch` is the directory a full disk is reported for when nothing else says."""
    if isinstance(error, DataError):
        return Failure(error.reason, error.message, contract.EXIT_DATA_ERROR)
    if isinstance(error, UnsupportedError):
        return Failure(error.reason, error.message, contract.EXIT_UNSUPPORTED)
    if isinstance(error, StorageError):
        retryable = error.reason in RETRYABLE_REASONS
        return Failure(
            error.reason, error.message, contract.EXIT_RETRYABLE if retryable else contract.EXIT_STORAGE_ERROR
        )
    if isinstance(error, Preempted):
        return Failure(error.reason, error.message, contract.EXIT_RETRYABLE)
    if isinstance(error, OutOfDiskError):
        return Failure(error.reason, error.message, contract.EXIT_OUT_OF_DISK)
    if is_full_disk(error):
        path = Path(getattr(error, "filename", None) or scratch or ".")
        return Failure("OutOfDisk", OutOfDiskError(path, "a file", None).message, contract.EXIT_OUT_OF_DISK)
    if out_of_memory := _out_of_memory(error):
        return Failure("OutOfMemory", out_of_memory, contract.EXIT_OUT_OF_MEMORY)
    detail = redact(f"{type(error).__name__}: {error}")[:_CRASH_CHARS]
    return Failure(
        "TrainerCrashed",
        f"{detail}: an unexpected failure (the pod log has the traceback); the Job retries it from the latest "
        "checkpoint up to spec.backoffLimit times. If it persists, report it with the log",
        contract.EXIT_RETRYABLE,
        classified=False,
    )


def _out_of_memory(error: Exception) -> str | None:
    gpu = type(error).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(error)
    if not gpu and not isinstance(error, MemoryError) and not any(text in str(error) for text in _OUT_OF_MEMORY_TEXTS):
        return None
    # torch's first line says how much it tried to allocate and how much was free.
    detail = redact(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)[:300]
    where = "GPU" if gpu else "host"
    more = "spec.resources.gpus (FSDP shards the model)" if gpu else "spec.resources.memory"
    return (
        f"the trainer ran out of {where} memory ({detail}): lower hyperparameters.batchSize (raise "
        "gradientAccumulationSteps to keep the effective batch) or dataset.maxLength, enable "
        f"hyperparameters.gradientCheckpointing, use method lora or qlora, or raise {more}"
    )


def write_termination_message(reason: str, message: str) -> None:
    """Where Kubernetes reads it (the file exists in a pod), or TUNERY_TERMINATION_MESSAGE_PATH for local runs."""
    override = os.environ.get("TUNERY_TERMINATION_MESSAGE_PATH")
    path = Path(override or contract.TERMINATION_MESSAGE_PATH)
    if override or path.exists():
        # Kubernetes keeps at most 4096 bytes of it.
        path.write_text(json.dumps({"reason": reason, "message": redact(message)[:MESSAGE_CHARS]}))
