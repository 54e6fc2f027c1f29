"""The operator's children as its watches last saw them (Kopf indexes), so that a reconciliation lists nothing."""

from collections.abc import Iterable, Mapping
from typing import Any

from tunery.controller.naming import FINETUNEJOB_LABEL

JOBS_INDEX = "tunery_jobs"
PODS_INDEX = "tunery_pods"
DEPLOYMENTS_INDEX = "tunery_deployments"
SERVING_COMPONENT = "serving"


def finetunejob_key(namespace: str, labels: Mapping[str, str]) -> tuple[str, str]:
    """Jobs and Deployments by their FineTuneJob."""
    return (namespace, labels[FINETUNEJOB_LABEL])


def pod_key(namespace: str, labels: Mapping[str, str]) -> tuple[str, str, str] | None:
    """Serving pods by their FineTuneJob, training pods by their Job; other pods are not indexed."""
    if labels.get("app.kubernetes.io/component") == SERVING_COMPONENT:
        return (SERVING_COMPONENT, namespace, labels[FINETUNEJOB_LABEL])
    job = labels.get("batch.kubernetes.io/job-name")
    return ("training", namespace, job) if job else None


class Watched:
    """Reads of the indexes; empty until the first handler call hands them over (Kopf fills every index first)."""

    def __init__(self) -> None:
        self._indexes: Mapping[str, Mapping[Any, Iterable[dict[str, Any]]]] = {}

    def attach(self, indexes: Mapping[str, Mapping[Any, Iterable[dict[str, Any]]]]) -> None:
        if not self._indexes:
            self._indexes = indexes

    def jobs(self, namespace: str, finetunejob: str) -> list[dict[str, Any]]:
        return self._values(JOBS_INDEX, (namespace, finetunejob))

    def job(self, namespace: str, finetunejob: str, name: str) -> dict[str, Any] | None:
        return next((job for job in self.jobs(namespace, finetunejob) if job["metadata"]["name"] == name), None)

    def training_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        return self._values(PODS_INDEX, ("training", namespace, job_name))

    def serving_pods(self, namespace: str, finetunejob: str) -> list[dict[str, Any]]:
        return self._values(PODS_INDEX, (SERVING_COMPONENT, namespace, finetunejob))

    def deployment(self, namespace: str, finetunejob: str, name: str) -> dict[str, Any] | None:
        deployments = self._values(DEPLOYMENTS_INDEX, (namespace, finetunejob))
        return next((item for item in deployments if item["metadata"]["name"] == name), None)

    def _values(self, index: str, key: Any) -> list[dict[str, Any]]:
        return list(self._indexes.get(index, {}).get(key, ()))
