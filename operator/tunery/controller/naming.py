"""Deterministic names, labels and revisions of a FineTuneJob's children."""

import base64
import hashlib
import json

from tunery.api import contract
from tunery.api.spec import FineTuneJobSpec

FIELD_MANAGER = "tunery-operator"
MANAGED_BY = "tunery-operator"
FINETUNEJOB_LABEL = "tunery.dev/finetunejob"
REVISION_LABEL = "tunery.dev/revision"
# The revision whose model a serving pod serves.
MODEL_REVISION_LABEL = "tunery.dev/model-revision"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The rendering a Job's pod template came from: a Job rendered otherwise (by an older operator) is left as it is.
TEMPLATE_HASH_ANNOTATION = "tunery.dev/template-hash"
# The storage settings a Job was created with: a Job whose storage changed is replaced (it resumes).
STORAGE_HASH_ANNOTATION = "tunery.dev/storage-hash"
# Fields that do not change what is trained: editing them never starts a new revision. Storage (endpoint, region,
# credentials) only says how to reach the data: rotating a Secret or moving the endpoint resumes the same revision.
_NOT_TRAINING = {"serving", "suspend", "backoff_limit", "active_deadline_seconds", "storage"}
# The first releases hashed the storage settings too.
_LEGACY_NOT_TRAINING = _NOT_TRAINING - {"storage"}


REVISION_LENGTH = 12
# Revisions named by the first releases: 8 hex digits (32 bits, few enough to search for a collision).
_LEGACY_LENGTH = 8

# Fields added since the first release, and the value that trains as before they existed: left out of the hash
# while they hold it, so that upgrading the operator does not start a new revision (a retraining) of every job.
_ADDED_SINCE_FIRST_RELEASE = {
    ("resources", "strategy"): "ddp",
    ("resources", "ephemeral_storage"): "100Gi",
    ("storage", "retry_timeout_seconds"): contract.STORAGE_RETRY_SECONDS,
    ("hyperparameters", "compile"): False,
    ("dataset", "mixture"): None,
    ("dataset", "columns", "chosen"): "chosen",
    ("dataset", "columns", "rejected"): "rejected",
    ("objective",): {"type": "sft", "beta": None},
    ("method", "lora", "use_dora"): False,
    ("method", "lora", "use_rslora"): False,
}
# Nested fields that do not change what is trained: whose checkpoints a run may adopt must not move the run to a
# new revision, whose empty checkpoint prefix would hold none of them.
_NOT_TRAINING_NESTED = {("checkpoints", "resume_from_uid")}


def revision(spec: FineTuneJobSpec, running: str | None = None) -> str:
    """A hash of the training-relevant spec, defaults included: 12 base32 characters (60 bits), so that no spec can
    be crafted to share another's revision (and so its output prefix); names stay within 63 characters.

    `running` is the FineTuneJob's status.revision: a revision named before revisions grew (the first 8 hex digits
    of the hash as it was, storage included) is kept for the same spec, so that upgrading the operator does not
    retrain it.
    """
    if running is not None and running == _digest(spec, _LEGACY_NOT_TRAINING).hex()[:_LEGACY_LENGTH]:
        return running
    return base64.b32encode(_digest(spec, _NOT_TRAINING)).decode().lower()[:REVISION_LENGTH]


def storage_hash(spec: FineTuneJobSpec) -> str:
    """A short hash of spec.storage, which reaches the training pods but not the revision."""
    fields = _without_added_defaults({"storage": spec.storage.model_dump(mode="json")})["storage"]
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _digest(spec: FineTuneJobSpec, not_training: set[str]) -> bytes:
    fields = _without_added_defaults(spec.model_dump(mode="json", exclude=not_training))
    for section, name in _NOT_TRAINING_NESTED:
        del fields[section][name]
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest()


def _without_added_defaults(fields: dict) -> dict:
    """The dumped spec (sections of it) without the fields added since the first release that hold their old value."""
    for (*parents, name), unchanged in _ADDED_SINCE_FIRST_RELEASE.items():
        holder = fields
        for key in parents:
            # A section left out of the dump, or an optional block that is absent (None), holds nothing to drop.
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and name in holder and holder[name] == unchanged:
            del holder[name]
    return fields


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
