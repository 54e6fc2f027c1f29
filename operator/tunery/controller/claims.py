"""Mount the pvc:// URIs of a spec: one volume per claim, each URI's directory as a subPath where the trainer reads it."""

import posixpath
from dataclasses import dataclass
from typing import Any

from tunery.api import contract


@dataclass(frozen=True)
class ClaimMounts:
    """The pod's claim volumes and a container's mounts of them."""

    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]


def claim_mounts(
    directories: list[str | None], data: list[str | None] = (), writable: list[str | None] = ()
) -> ClaimMounts:
    """Mounts at PVC_MOUNT_ROOT/CLAIM/PATH of pvc://CLAIM/PATH URIs: model `directories` and `writable` output
    directories whole, `data` (a file, or a prefix ending in /) as the prefix or the file's directory.

    A file's directory is mounted rather than the file: the kubelet would create a missing subPath as a directory.
    The paths cannot leave their claim (the API refuses '.', '..' and empty segments), and the kubelet resolves a
    subPath inside the volume. A directory both read and written is mounted writable, once.
    """
    wanted: dict[tuple[str, str], bool] = {}

    def want(uri: str | None, whole: bool, writes: bool) -> None:
        if not uri or not uri.startswith("pvc://"):
            return
        claim, _, path = uri.removeprefix("pvc://").partition("/")
        directory = path.rstrip("/") if whole or path.endswith("/") else posixpath.dirname(path)
        wanted[(claim, directory)] = wanted.get((claim, directory), False) or writes

    for uri in directories:
        want(uri, whole=True, writes=False)
    for uri in data:
        want(uri, whole=False, writes=False)
    for uri in writable:
        want(uri, whole=True, writes=True)
    claims = sorted({claim for claim, _ in wanted})
    volume_of = {claim: f"claim-{index}" for index, claim in enumerate(claims)}
    volumes = [{"name": volume_of[claim], "persistentVolumeClaim": {"claimName": claim}} for claim in claims]
    mounts = []
    for (claim, directory), writes in sorted(wanted.items()):
        mount: dict[str, Any] = {
            "name": volume_of[claim],
            "mountPath": posixpath.join(contract.PVC_MOUNT_ROOT, claim, directory).rstrip("/"),
        }
        if not writes:
            mount["readOnly"] = True
        if directory:
            mount["subPath"] = directory
        mounts.append(mount)
    return ClaimMounts(volumes, mounts)
