"""Deterministic names, labels and revisions of a FineTuneJob's children."""

import hashlib
import json

from tunery.api.spec import FineTuneJobSpec

FIELD_MANAGER = "tunery-operator"
MANAGED_BY = "tunery-operator"
FINETUNEJOB_LABEL = "tunery.dev/finetunejob"
REVISION_LABEL = "tunery.dev/revision"
# The revision whose model a serving pod serves.
MODEL_REVISION_LABEL = "tunery.dev/model-revision"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Fields that do not change what is trained: editing them never starts a new revision.
_NOT_TRAINING = {"serving", "suspend", "backoff_limit", "active_deadline_seconds"}


# Fields added since the first release, and the value that trains as before they existed: left out of the hash
# while they hold it, so that upgrading the operator does not start a new revision (a retraining) of every job.
_ADDED_SINCE_FIRST_RELEASE = {
    ("resources", "strategy"): "ddp",
    ("resources", "ephemeral_storage"): "100Gi",
    ("checkpoints", "resume_from_uid"): None,
}


def revision(spec: FineTuneJobSpec) -> str:
    """A short hash of the training-relevant spec, defaults included."""
    fields = spec.model_dump(mode="json", exclude=_NOT_TRAINING)
    for (section, name), unchanged in _ADDED_SINCE_FIRST_RELEASE.items():
        if fields[section][name] == unchanged:
            del fields[section][name]
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def job_name(finetunejob: str, revision_id: str) -> str:
    return f"{finetunejob}-{revision_id}"


def config_map_name(finetunejob: str, revision_id: str) -> str:
    return f"{finetunejob}-{revision_id}-config"


def serving_name(finetunejob: str) -> str:
    """One Deployment and Service per FineTuneJob, whatever the revision: new models roll out in place."""
    return f"{finetunejob}-serving"


def trainer_account_name(finetunejob: str) -> str:
    return f"{finetunejob}-trainer"


def labels(finetunejob: str, revision_id: str | None, component: str) -> dict[str, str]:
    """Standard labels; children that serve every revision (the trainer identity) carry no revision label."""
    result = {
        "app.kubernetes.io/name": "tunery",
        "app.kubernetes.io/instance": finetunejob,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "tunery",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        FINETUNEJOB_LABEL: finetunejob,
    }
    if revision_id:
        result[REVISION_LABEL] = revision_id
    return result
