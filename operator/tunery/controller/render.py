"""Pure builders of a FineTuneJob's training children: the trainer ConfigMap, the Job and the headless Service."""

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tunery.api import contract
from tunery.api.resource import API_VERSION, GROUP, KIND, PLURAL, FineTuneJob
from tunery.api.spec import FineTuneJobSpec
from tunery.api.trainer_config import TrainerConfig
from tunery.controller import naming
from tunery.controller.claims import ClaimMounts, claim_mounts


@dataclass(frozen=True)
class TrainingTarget:
    """What the builders need to know about one FineTuneJob revision."""

    name: str
    namespace: str
    uid: str
    spec: FineTuneJobSpec
    revision: str
    image: str
    queue_name: str | None = None
    termination_grace_seconds: int = contract.TERMINATION_GRACE_SECONDS

    @property
    def job_name(self) -> str:
        return naming.job_name(self.name, self.revision)

    @property
    def output_prefix(self) -> str:
        """Each revision publishes under its own prefix, so a new revision never overwrites the served model."""
        return f"{self.spec.output.uri.rstrip('/')}/{self.revision}/"

    @property
    def distributed(self) -> bool:
        return self.spec.resources.nodes > 1 or self.spec.resources.gpus > 1


def training_target(
    finetunejob: FineTuneJob, revision: str, image: str, termination_grace_seconds: int
) -> TrainingTarget:
    """A revision of the FineTuneJob, with the operator's grace period for its pods; a Kueue queue label is passed on."""
    metadata = finetunejob.metadata
    return TrainingTarget(
        name=metadata.name,
        namespace=metadata.namespace,
        uid=metadata.uid,
        spec=finetunejob.spec,
        revision=revision,
        image=image,
        queue_name=metadata.labels.get(naming.KUEUE_QUEUE_LABEL),
        termination_grace_seconds=termination_grace_seconds,
    )


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(target: TrainingTarget, name: str, component: str, per_revision: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": target.namespace,
        "labels": naming.labels(target.name, target.revision if per_revision else None, component),
        "ownerReferences": [owner_reference(target.name, target.uid)],
    }


def trainer_config(target: TrainingTarget) -> TrainerConfig:
    """The trainer's configuration: the defaulted spec plus where this revision writes. Never a secret."""
    return TrainerConfig.model_validate(
        {
            "finetuneJob": {"name": target.name, "namespace": target.namespace, "uid": target.uid},
            "revision": target.revision,
            "outputUri": target.output_prefix,
            "checkpointUri": f"{target.output_prefix}checkpoints/",
            "spec": target.spec.model_dump(by_alias=True, mode="json", exclude_none=True),
        }
    )


def render_config_map(target: TrainingTarget) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(target, naming.config_map_name(target.name, target.revision), "trainer-config"),
        "data": {
            contract.CONFIG_FILE: json.dumps(
                trainer_config(target).model_dump(by_alias=True, mode="json", exclude_none=True),
                indent=2,
                sort_keys=True,
            )
        },
    }


def render_trainer_identity(target: TrainingTarget) -> list[dict[str, Any]]:
    """The trainer's ServiceAccount, allowed only to read and patch the status of its own FineTuneJob."""
    name = naming.trainer_account_name(target.name)

    def metadata() -> dict[str, Any]:
        return _metadata(target, name, "trainer-identity", per_revision=False)

    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(), "automountServiceAccountToken": False},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(),
            "rules": [
                {
                    "apiGroups": [GROUP],
                    "resources": [f"{PLURAL}/status"],
                    "resourceNames": [target.name],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": target.namespace}],
        },
    ]


def render_headless_service(target: TrainingTarget) -> dict[str, Any]:
    """Stable DNS names for the Indexed Job's pods (JOB-0.JOB), so index 0 can be torchrun's rendezvous."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(target, target.job_name, "trainer"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"batch.kubernetes.io/job-name": target.job_name},
            "ports": [{"name": "rendezvous", "port": contract.RENDEZVOUS_PORT, "targetPort": contract.RENDEZVOUS_PORT}],
        },
    }


def literal(value: str) -> str:
    """A spec string as the kubelet must pass it: it expands $(VAR) in command, args and env values, and $$ to $."""
    return value.replace("$", "$$")


def storage_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "AWS_REGION", "value": literal(spec.storage.region)}]
    if spec.storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": literal(spec.storage.endpoint)})
    if spec.storage.credentials_secret:
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": spec.storage.credentials_secret, "key": key}}}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        ]
    return env


def _command(target: TrainingTarget) -> tuple[list[str], list[dict[str, Any]]]:
    """The trainer command, under torchrun when there is more than one process; with its rendezvous env."""
    config = f"--config={contract.CONFIG_DIR}/{contract.CONFIG_FILE}"
    resources = target.spec.resources
    if not target.distributed:
        return ["tunery-trainer", "train", config], []
    processes = f"--nproc-per-node={max(resources.gpus, 1)}"
    if resources.nodes == 1:
        return ["torchrun", "--standalone", processes, "-m", "tunery_trainer", "train", config], []
    env = [
        {"name": "NNODES", "value": str(resources.nodes)},
        {"name": "MASTER_ADDR", "value": f"{target.job_name}-0.{target.job_name}"},
        {"name": "MASTER_PORT", "value": str(contract.RENDEZVOUS_PORT)},
        {
            "name": "NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
    ]
    command = [
        "torchrun",
        "--nnodes=$(NNODES)",
        processes,
        "--node-rank=$(NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "-m",
        "tunery_trainer",
        "train",
        config,
    ]
    return command, env


def training_claims(spec: FineTuneJobSpec) -> ClaimMounts:
    """The trainer reads its inputs from claims read-only and writes only its output."""
    tokenizer = spec.base_model.tokenizer.uri if spec.base_model.tokenizer else None
    return claim_mounts(
        [spec.base_model.uri, tokenizer],
        [*(source.uri for source in spec.dataset.sources()), spec.dataset.validation],
        [spec.output.uri],
    )


def _resources(target: TrainingTarget) -> dict[str, Any]:
    resources = target.spec.resources
    disk = resources.ephemeral_storage
    requests = {"cpu": resources.cpu, "memory": resources.memory, "ephemeral-storage": disk}
    limits: dict[str, Any] = {"memory": resources.memory, "ephemeral-storage": disk}
    if resources.gpus:
        requests[resources.gpu_resource] = str(resources.gpus)
        limits[resources.gpu_resource] = str(resources.gpus)
    return {"requests": requests, "limits": limits}


def restricted_pod_security() -> dict[str, Any]:
    """The pod-level half of the restricted Pod Security Standard, as user 1000 of the Tunery images."""
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_container_security() -> dict[str, Any]:
    """The container-level half: no privilege escalation, no capabilities, a read-only root."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def render_job(target: TrainingTarget) -> dict[str, Any]:
    """The batch/v1 Job that trains one revision: Indexed across nodes, restricted security, final exit codes not retried."""
    spec = target.spec
    command, rendezvous_env = _command(target)
    claims = training_claims(spec)
    # Each scratch volume is bounded by the job's disk, so a full disk fails this pod, not the node.
    disk = spec.resources.ephemeral_storage
    labels = naming.labels(target.name, target.revision, "trainer")
    if target.queue_name:
        labels[naming.KUEUE_QUEUE_LABEL] = target.queue_name
    container = {
        "name": "trainer",
        "image": target.image,
        "command": command,
        "env": [
            *storage_env(spec),
            {"name": "TUNERY_FINETUNEJOB", "value": literal(target.name)},
            {"name": "TUNERY_NAMESPACE", "value": target.namespace},
            {"name": "TUNERY_REVISION", "value": target.revision},
            {"name": "TUNERY_METRICS_PORT", "value": str(contract.TRAINER_METRICS_PORT)},
            {"name": "HF_HOME", "value": "/var/cache/tunery/huggingface"},
            {"name": "TMPDIR", "value": "/tmp"},
            {"name": contract.GRACE_SECONDS_ENV, "value": str(target.termination_grace_seconds)},
            *rendezvous_env,
        ],
        "resources": _resources(target),
        "ports": [{"name": "metrics", "containerPort": contract.TRAINER_METRICS_PORT}]
        + (
            [{"name": "rendezvous", "containerPort": contract.RENDEZVOUS_PORT}]
            if target.spec.resources.nodes > 1
            else []
        ),
        "volumeMounts": [
            {"name": "config", "mountPath": contract.CONFIG_DIR, "readOnly": True},
            {"name": "cache", "mountPath": "/var/cache/tunery"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *claims.mounts,
        ],
        "securityContext": restricted_container_security(),
        "terminationMessagePath": contract.TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if target.distributed:
        # torchrun passes the SIGTERM on to its workers and kills them 30 s later unless told otherwise (a torch
        # that predates the variable keeps the 30 s).
        container["env"].append(
            {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(target.termination_grace_seconds)}
        )
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # Operator policy, not a tenant's: how long a preempted pod may hold its node to checkpoint its step.
        "terminationGracePeriodSeconds": target.termination_grace_seconds,
        "securityContext": restricted_pod_security(),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": naming.config_map_name(target.name, target.revision)}},
            {"name": "cache", "emptyDir": {"sizeLimit": disk}},
            {"name": "tmp", "emptyDir": {"sizeLimit": disk}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _shm_size(spec)}},
            *claims.volumes,
        ],
        "enableServiceLinks": False,
        # The token is the progress channel: it may only patch this FineTuneJob's status (render_trainer_identity).
        "serviceAccountName": naming.trainer_account_name(target.name),
        "automountServiceAccountToken": True,
    }
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [
            toleration.model_dump(by_alias=True, exclude_none=True) for toleration in spec.resources.tolerations
        ]
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": "trainer",
                        "operator": "In",
                        "values": list(contract.FINAL_EXIT_CODES),
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
    }
    # Kueue owns spec.suspend of queued Jobs: the operator leaves the field alone for them.
    if not target.queue_name:
        job_spec["suspend"] = spec.suspend
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.resources.nodes > 1:
        pod_spec["subdomain"] = target.job_name
        job_spec.update(
            completionMode="Indexed",
            completions=spec.resources.nodes,
            parallelism=spec.resources.nodes,
        )
    metadata = _metadata(target, target.job_name, "trainer")
    metadata["labels"] = labels
    metadata["annotations"] = {
        naming.TEMPLATE_HASH_ANNOTATION: template_hash(job_spec["template"]),
        naming.STORAGE_HASH_ANNOTATION: naming.storage_hash(spec),
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def template_hash(template: dict[str, Any]) -> str:
    """Which rendering a Job's (immutable) pod template came from."""
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _shm_size(spec: FineTuneJobSpec) -> str:
    """Shared memory for data-loader workers and NCCL: 1Gi per GPU, at least 1Gi."""
    return f"{max(spec.resources.gpus, 1)}Gi"


def render_training_children(target: TrainingTarget) -> list[dict[str, Any]]:
    """Every child of the revision, in the order they must be applied (the Job last)."""
    children = [*render_trainer_identity(target), render_config_map(target)]
    if target.spec.resources.nodes > 1:
        children.append(render_headless_service(target))
    children.append(render_job(target))
    return children
