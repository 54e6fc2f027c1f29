"""Build the serving children of a FineTuneJob: a Deployment (fetch init container + server), its Service and the
NetworkPolicy that says who may reach it."""

from dataclasses import dataclass, field
from typing import Any

from tunery.api import contract
from tunery.api.policy import Policy
from tunery.api.resource import FineTuneJob
from tunery.api.spec import FineTuneJobSpec
from tunery.api.status import ModelRecord
from tunery.controller import naming
from tunery.controller.claims import ClaimMounts, claim_mounts
from tunery.controller.render import (
    literal,
    owner_reference,
    restricted_container_security,
    restricted_pod_security,
    storage_env,
)
from tunery.controller.settings import OperatorSettings

MODEL_VOLUME = "model"
MODEL_MOUNT = "/models"
# The init container fetches the published model here; a model without merged weights also gets its base (base/).
MODEL_DIR = f"{MODEL_MOUNT}/current"
SERVICE_PORT = 80


@dataclass(frozen=True)
class ServingTarget:
    """What the builders need to serve one published model."""

    name: str
    namespace: str
    uid: str
    spec: FineTuneJobSpec
    model_uri: str
    model_revision: str
    model_name: str
    image: str
    vllm_image: str
    progress_deadline_seconds: int
    platform_client_namespace_labels: dict[str, str] = field(default_factory=dict)
    """Namespaces with these labels may reach every endpoint (the operator's policy)."""

    @property
    def deployment_name(self) -> str:
        return naming.serving_name(self.name)

    @property
    def endpoint(self) -> str:
        """The in-cluster base URL of the OpenAI-compatible API."""
        return f"http://{self.deployment_name}.{self.namespace}.svc.cluster.local/v1"


def serving_target(
    finetunejob: FineTuneJob, model: ModelRecord, model_revision: str, settings: OperatorSettings, policy: Policy
) -> ServingTarget:
    """The target that serves `model` of the FineTuneJob."""
    metadata, spec = finetunejob.metadata, finetunejob.spec
    return ServingTarget(
        name=metadata.name,
        namespace=metadata.namespace,
        uid=metadata.uid,
        spec=spec,
        model_uri=model.uri,
        model_revision=model_revision,
        model_name=model.name,
        image=spec.image or settings.trainer_image,
        vllm_image=settings.vllm_image,
        progress_deadline_seconds=settings.serving_progress_deadline_seconds,
        platform_client_namespace_labels=policy.serving_client_namespace_labels,
    )


def render_serving_children(target: ServingTarget) -> list[dict[str, Any]]:
    """The NetworkPolicy first, so that the pods never answer before it applies."""
    return [render_network_policy(target), render_service(target), render_deployment(target)]


def render_network_policy(target: ServingTarget) -> dict[str, Any]:
    """The API port answers pods of this namespace and of namespaces the spec or the platform names; the metrics
    port (request counts and latencies, no content) answers any namespace, where Prometheus may run."""
    clients: list[dict[str, Any]] = [{"podSelector": {}}]
    for labels in (target.spec.serving.client_namespace_labels, target.platform_client_namespace_labels):
        if labels:
            clients.append({"namespaceSelector": {"matchLabels": dict(labels)}})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(target),
        "spec": {
            "podSelector": {"matchLabels": _selector(target)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": clients, "ports": [{"protocol": "TCP", "port": contract.SERVING_PORT}]},
                {
                    "from": [{"namespaceSelector": {}}],
                    "ports": [{"protocol": "TCP", "port": contract.SERVING_METRICS_PORT}],
                },
            ],
        },
    }


def _metadata(target: ServingTarget) -> dict[str, Any]:
    return {
        "name": target.deployment_name,
        "namespace": target.namespace,
        "labels": naming.labels(target.name, None, "serving"),
        "ownerReferences": [owner_reference(target.name, target.uid)],
    }


def render_service(target: ServingTarget) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(target),
        "spec": {
            "selector": _selector(target),
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http"}],
        },
    }


def _selector(target: ServingTarget) -> dict[str, str]:
    return {naming.FINETUNEJOB_LABEL: target.name, "app.kubernetes.io/component": "serving"}


def render_deployment(target: ServingTarget) -> dict[str, Any]:
    """Rolling, never below the ready replicas: the previous model serves until the new one's pods are ready."""
    serving = target.spec.serving
    labels = {**naming.labels(target.name, None, "serving"), naming.MODEL_REVISION_LABEL: target.model_revision}
    disk = serving.resources.ephemeral_storage
    claims = _fetch_claims(target)
    pod_spec: dict[str, Any] = {
        "securityContext": restricted_pod_security(),
        "initContainers": [_fetch_container(target, claims)],
        "containers": [_vllm_container(target) if serving.runtime == "vllm" else _builtin_container(target)],
        "volumes": [
            {"name": MODEL_VOLUME, "emptyDir": {"sizeLimit": disk}},
            {"name": "tmp", "emptyDir": {"sizeLimit": disk}},
            {"name": "cache", "emptyDir": {"sizeLimit": disk}},
            *claims.volumes,
        ],
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
    }
    if serving.resources.gpus:
        pod_spec["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(target),
        "spec": {
            "replicas": serving.replicas,
            "selector": {"matchLabels": _selector(target)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "progressDeadlineSeconds": target.progress_deadline_seconds,
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {"tunery.dev/model-uri": target.model_uri},
                },
                "spec": pod_spec,
            },
        },
    }


def _fetch_claims(target: ServingTarget) -> ClaimMounts:
    """The published model, and its base (fetched too when only an adapter was published), read-only."""
    return claim_mounts([target.model_uri, target.spec.base_model.uri])


def _fetch_container(target: ServingTarget, claims: ClaimMounts) -> dict[str, Any]:
    command = [
        "tunery-trainer",
        "fetch",
        f"--uri={literal(target.model_uri)}",
        f"--dest={MODEL_DIR}",
        f"--addressing={target.spec.storage.addressing}",
    ]
    retry_seconds = target.spec.storage.retry_timeout_seconds
    if retry_seconds != contract.STORAGE_RETRY_SECONDS:
        # Only when set: Deployments rendered before the field existed keep their template (no rollout on upgrade).
        command.append(f"--retry-seconds={retry_seconds}")
    disk = target.spec.serving.resources.ephemeral_storage
    return {
        "name": "fetch-model",
        "image": target.image,
        "command": command,
        "env": [*storage_env(target.spec), {"name": "HOME", "value": "/tmp"}],
        "volumeMounts": [
            {"name": MODEL_VOLUME, "mountPath": MODEL_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
            *claims.mounts,
        ],
        "resources": {
            "requests": {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": disk},
            "limits": {"memory": "2Gi", "ephemeral-storage": disk},
        },
        "securityContext": restricted_container_security(),
        "terminationMessagePath": contract.TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _resources(target: ServingTarget) -> dict[str, Any]:
    resources = target.spec.serving.resources
    disk = resources.ephemeral_storage
    requests: dict[str, Any] = {"cpu": resources.cpu, "memory": resources.memory, "ephemeral-storage": disk}
    limits: dict[str, Any] = {"memory": resources.memory, "ephemeral-storage": disk}
    if resources.gpus:
        gpu = target.spec.resources.gpu_resource
        requests[gpu] = str(resources.gpus)
        limits[gpu] = str(resources.gpus)
    return {"requests": requests, "limits": limits}


def _api_key_env(target: ServingTarget, name: str) -> list[dict[str, Any]]:
    secret = target.spec.serving.api_key_secret
    if not secret:
        return []
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": contract.API_KEY_SECRET_KEY}}}]


def _server_container(
    target: ServingTarget, image: str, command: list[str], ready_path: str, api_key_env: str, metrics_port: bool
) -> dict[str, Any]:
    ports = [{"name": "http", "containerPort": contract.SERVING_PORT}]
    if metrics_port:
        ports.append({"name": "metrics", "containerPort": contract.SERVING_METRICS_PORT})
    return {
        "name": "server",
        "image": image,
        "command": command,
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "HF_HOME", "value": "/var/cache/tunery/huggingface"},
            *_api_key_env(target, api_key_env),
        ],
        "ports": ports,
        "resources": _resources(target),
        "volumeMounts": [
            {"name": MODEL_VOLUME, "mountPath": MODEL_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/var/cache/tunery"},
            *([{"name": "dshm", "mountPath": "/dev/shm"}] if target.spec.serving.resources.gpus else []),
        ],
        # Loading a model can take minutes: the startup probe holds liveness off until it is up.
        "startupProbe": {
            "httpGet": {"path": ready_path, "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 120,
        },
        "readinessProbe": {"httpGet": {"path": ready_path, "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz" if ready_path == "/readyz" else ready_path, "port": "http"}},
        "securityContext": restricted_container_security(),
    }


def _builtin_container(target: ServingTarget) -> dict[str, Any]:
    command = [
        "tunery",
        "serve",
        MODEL_DIR,
        "--host=0.0.0.0",
        f"--port={contract.SERVING_PORT}",
        f"--metrics-port={contract.SERVING_METRICS_PORT}",
        f"--name={literal(target.model_name)}",
    ]
    return _server_container(target, target.image, command, "/readyz", contract.API_KEY_ENV, metrics_port=True)


def _vllm_container(target: ServingTarget) -> dict[str, Any]:
    """vLLM's OpenAI server on the merged model, or on the base model with the adapter (--enable-lora)."""
    command = [
        "/bin/sh",
        "-c",
        # The manifest says what was published; the merged model wins, an adapter is served on its base.
        f'if [ -d {MODEL_DIR}/model ]; then exec vllm serve {MODEL_DIR}/model --served-model-name "$MODEL_NAME" '
        f"--host 0.0.0.0 --port {contract.SERVING_PORT}; "
        f'else exec vllm serve {MODEL_DIR}/base --enable-lora --lora-modules "$MODEL_NAME={MODEL_DIR}/adapter" '
        f"--host 0.0.0.0 --port {contract.SERVING_PORT}; fi",
    ]
    # vLLM reads VLLM_API_KEY itself and then refuses /v1 requests without it.
    container = _server_container(
        target, target.vllm_image, command, "/health", contract.VLLM_API_KEY_ENV, metrics_port=False
    )
    container["env"].append({"name": "MODEL_NAME", "value": literal(target.model_name)})
    return container
