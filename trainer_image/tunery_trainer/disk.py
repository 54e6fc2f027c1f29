"""A full disk, however the OS, torch or safetensors report it, as an error that names the path and the size needed."""

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# torch.save reports a failed write as "PytorchStreamWriter failed writing file ..." or "unexpected pos N vs M",
# safetensors as its Rust io::Error; neither keeps the OSError.
_FULL_DISK_TEXTS = ("unexpected pos", "PytorchStreamWriter failed writing", "No space left on device", "os error 28")


class OutOfDiskError(Exception):
    """The file system under `path` is full (or over its quota); reported as reason OutOfDisk, not retried."""

    reason = "OutOfDisk"

    def __init__(self, path: Path, what: str, needed: int | None) -> None:
        self.path = path
        usage = _usage(path)
        need = f"it needs about {human_size(needed)}" if needed else "the size it needs is unknown"
        room = (
            f"{human_size(usage.free)} of {human_size(usage.total)} is free there"
            if usage
            else "the free space there is unknown"
        )
        self.message = (
            f"out of disk space writing {what} to {path}: {need}, {room}: raise spec.resources.ephemeralStorage "
            "(it must hold the base model, the data and a checkpoint), or run on nodes with a larger disk"
        )
        super().__init__(self.message)


def is_full_disk(error: BaseException) -> bool:
    """Whether an exception, or one it was raised from, says the disk is full."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen) for text in _FULL_DISK_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def writing(path: Path, what: str, needed: int | None) -> Iterator[None]:
    """Turn a full disk while writing `what` (about `needed` bytes) under `path` into an OutOfDiskError."""
    try:
        yield
    except OutOfDiskError:
        raise
    except Exception as error:
        if not is_full_disk(error):
            raise
        raise OutOfDiskError(path, what, needed) from error


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{value:.1f} TiB"


def _usage(path: Path):
    """Disk usage of the file system holding `path` (its nearest existing ancestor), or None."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate)
            except OSError:
                return None
    return None
