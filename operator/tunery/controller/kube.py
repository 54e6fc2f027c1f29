"""API I/O for the operator: read FineTuneJobs and their children, server-side apply, patch status."""

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from lightkube import AsyncClient, codecs
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import Event, Service
from lightkube.resources.networking_v1 import NetworkPolicy
from lightkube.types import CascadeType, PatchType

from tunery.api.resource import GROUP, KIND, PLURAL, VERSION
from tunery.controller.naming import FIELD_MANAGER

FineTuneJobResource = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)
# Kueue v0.17 stores Workloads as v1beta2; it names them itself and labels them with their Job's UID.
Workload = create_namespaced_resource("kueue.x-k8s.io", "v1beta2", "Workload", "workloads")
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
# Registering Kopf's peering kinds lets codecs.from_dict build them for apply.
create_namespaced_resource("kopf.dev", "v1", "KopfPeering", "kopfpeerings")
create_global_resource("kopf.dev", "v1", "ClusterKopfPeering", "clusterkopfpeerings")


# A child is applied again after this long even if unchanged, so that one deleted or edited by hand (or deleted while
# the watch was away) is put back.
REAPPLY_SECONDS = 600.0
# Tells unchanged() that the caller has no stored copy (the kind is not watched).
UNWATCHED = object()


@dataclass(frozen=True)
class _Applied:
    digest: str
    generation: int | None
    at: float


def _identity(manifest: dict[str, Any]) -> tuple[str, str, str, str]:
    metadata = manifest["metadata"]
    return (manifest["apiVersion"], manifest["kind"], metadata.get("namespace", ""), metadata["name"])


def _digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class NotOwned(Exception):
    """A child's name is taken by an object this FineTuneJob does not own: it is neither changed nor deleted."""

    def __init__(self, kind: str, namespace: str, name: str) -> None:
        super().__init__(
            f"{kind} {namespace}/{name} already exists and is not owned by this FineTuneJob: the operator leaves it "
            "alone; rename the FineTuneJob, or delete or rename that object"
        )


def owned_by(body: dict[str, Any], uid: str) -> bool:
    return any(reference.get("uid") == uid for reference in body["metadata"].get("ownerReferences") or [])


class KubeApi:
    """The few API calls reconciliation needs, returning plain dicts."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._applied: dict[tuple[str, str, str, str], _Applied] = {}

    def unchanged(self, manifest: dict[str, Any], stored: Any = UNWATCHED) -> bool:
        """Whether applying `manifest` would change nothing: this operator applied exactly it, and since then the
        stored object (as watched) has kept its spec, or, for a kind not watched, not long ago."""
        applied = self._applied.get(_identity(manifest))
        if applied is None or applied.digest != _digest(manifest):
            return False
        if time.monotonic() - applied.at >= REAPPLY_SECONDS:
            return False
        # A watch that missed a deletion (a gap longer than the API server's watch window) keeps showing the object:
        # applying again at least every REAPPLY_SECONDS brings back one that is gone.
        return stored is UNWATCHED or (
            stored is not None and stored["metadata"].get("generation") == applied.generation
        )

    async def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get_or_none(FineTuneJobResource, namespace, name)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply under the operator's field manager (taking over fields is intended); the object as stored."""
        applied = (
            await self._client.apply(codecs.from_dict(manifest), field_manager=FIELD_MANAGER, force=True)
        ).to_dict()
        generation = applied["metadata"].get("generation")
        self._applied[_identity(manifest)] = _Applied(_digest(manifest), generation, time.monotonic())
        return applied

    async def apply_owned(self, manifest: dict[str, Any]) -> None:
        """Apply a child only where its name is free or already carries the owner's UID; NotOwned otherwise.

        An object created by someone else between the read and the apply is taken over, but only one that did not
        exist when looked at: nothing that anyone had before is ever changed. One applied unchanged a moment ago
        is neither read nor applied again.
        """
        if self.unchanged(manifest):
            return
        metadata = manifest["metadata"]
        existing = await self._get_or_none(type(codecs.from_dict(manifest)), metadata["namespace"], metadata["name"])
        if existing is not None and not owned_by(existing, metadata["ownerReferences"][0]["uid"]):
            raise NotOwned(manifest["kind"], metadata["namespace"], metadata["name"])
        await self.apply(manifest)

    async def ensure_peering(self, name: str, namespaces: list[str]) -> None:
        """The peering objects replicas announce themselves in: one per watched namespace, or one for the cluster."""
        if not namespaces:
            await self.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}})
        for namespace in namespaces:
            peering = {
                "apiVersion": "kopf.dev/v1",
                "kind": "KopfPeering",
                "metadata": {"name": name, "namespace": namespace},
            }
            await self.apply(peering)

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get_or_none(Job, namespace, name)

    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get_or_none(Deployment, namespace, name)

    async def _get_or_none(self, resource: Any, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return (await self._client.get(resource, name, namespace=namespace)).to_dict()
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    async def set_job_suspended(self, namespace: str, name: str, suspend: bool) -> dict[str, Any]:
        """Suspend or resume a Job without touching its (immutable) pod template."""
        patched = await self._client.patch(
            Job, name, {"spec": {"suspend": suspend}}, namespace=namespace, patch_type=PatchType.MERGE
        )
        return patched.to_dict()

    async def delete_job(self, namespace: str, name: str, wait_for_pods: bool = False) -> None:
        """Delete a Job; with wait_for_pods it stays (terminating) until its pods are gone, so that a replacement
        never trains beside them."""
        cascade = CascadeType.FOREGROUND if wait_for_pods else CascadeType.BACKGROUND
        try:
            await self._client.delete(Job, name, namespace=namespace, cascade=cascade)
        except ApiError as exc:
            # Already gone: the watch that showed it had not seen the deletion yet.
            if exc.status.code != 404:
                raise

    async def delete_serving(self, namespace: str, name: str, owner_uid: str) -> bool:
        """Delete the serving Deployment, Service and NetworkPolicy that this owner owns; whether any was deleted."""
        deleted = False
        for resource in (Deployment, Service, NetworkPolicy):
            existing = await self._get_or_none(resource, namespace, name)
            if existing is None or not owned_by(existing, owner_uid):
                continue
            try:
                await self._client.delete(resource, name, namespace=namespace, cascade=CascadeType.BACKGROUND)
                deleted = True
            except ApiError as exc:
                if exc.status.code != 404:
                    raise
        return deleted

    async def get_workload(self, namespace: str, job: dict[str, Any]) -> dict[str, Any] | None:
        """The Kueue Workload of this Job (owned by it, labelled with its UID); None without one, or without Kueue."""
        uid = job["metadata"]["uid"]
        try:
            listed = [
                item.to_dict()
                async for item in self._client.list(Workload, namespace=namespace, labels={KUEUE_JOB_UID_LABEL: uid})
            ]
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise
        owned = [workload for workload in listed if owned_by(workload, uid)]
        return max(owned, key=lambda workload: workload["metadata"]["creationTimestamp"], default=None)

    async def list_job_warnings(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """Warning Events about a Job (the Job controller reports pods it could not create only there)."""
        fields = {"involvedObject.kind": "Job", "involvedObject.name": job_name, "type": "Warning"}
        return [event.to_dict() async for event in self._client.list(Event, namespace=namespace, fields=fields)]

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await self._client.patch(
            FineTuneJobResource.Status, name, {"status": patch}, namespace=namespace, patch_type=PatchType.MERGE
        )
