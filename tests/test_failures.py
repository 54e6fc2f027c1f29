"""The trainer's failure taxonomy: each exception class maps to its reason, exit code and a message with the fix."""

import errno
from pathlib import Path

import pytest
import torch

from tunery.api import contract
from tunery_trainer.data import DataError
from tunery_trainer.disk import OutOfDiskError, is_full_disk
from tunery_trainer.failures import classify
from tunery_trainer.storage import StorageError


@pytest.mark.parametrize(
    ("error", "reason", "code"),
    [
        (DataError("row 3: expected text"), "DataError", contract.EXIT_DATA_ERROR),
        (StorageError("StorageCredentials", "denied"), "StorageCredentials", contract.EXIT_STORAGE_ERROR),
        (StorageError("StorageUnavailable", "500"), "StorageUnavailable", contract.EXIT_RETRYABLE),
        (StorageError("StorageUnreachable", "refused"), "StorageUnreachable", contract.EXIT_RETRYABLE),
        (OutOfDiskError(Path("/work"), "x", 10), "OutOfDisk", contract.EXIT_OUT_OF_DISK),
    ],
)
def test_each_class_has_its_reason_and_exit_code(error: Exception, reason: str, code: int) -> None:
    failure = classify(error)
    assert (failure.reason, failure.exit_code, failure.classified) == (reason, code, True)


def test_a_bare_enospc_names_its_file_and_the_free_space(tmp_path: Path) -> None:
    failure = classify(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.bin")))
    assert failure.reason == "OutOfDisk" and failure.exit_code in contract.FINAL_EXIT_CODES
    assert str(tmp_path / "x.bin") in failure.message and "free there" in failure.message


def test_torch_s_failed_write_is_a_full_disk() -> None:
    assert is_full_disk(RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1664 vs 1552"))
    assert not is_full_disk(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_a_real_allocation_failure_is_out_of_memory_with_the_fix() -> None:
    with pytest.raises(RuntimeError) as refused:
        torch.empty(2**52, dtype=torch.uint8)  # 4 PiB: the allocator refuses it at once
    failure = classify(refused.value)
    assert failure.reason == "OutOfMemory" and failure.exit_code == contract.EXIT_OUT_OF_MEMORY
    assert (
        "host memory" in failure.message
        and "batchSize" in failure.message
        and "spec.resources.memory" in failure.message
    )


def test_an_unclassified_error_still_has_a_reason_and_is_retried(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    failure = classify(KeyError("s3cr3t-value-123 went missing"))
    assert failure.reason == "TrainerCrashed" and failure.exit_code == contract.EXIT_RETRYABLE
    assert not failure.classified and "KeyError" in failure.message and "s3cr3t" not in failure.message
