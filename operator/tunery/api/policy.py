"""The platform's policy for what a FineTuneJob may ask of the cluster, and the checks of a spec against it."""

import fnmatch
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from tunery.api.base import ApiModel
from tunery.api.spec import FineTuneJobSpec
from tunery.api.validation import FieldError, Parsed, parse_manifest

_CONTROL_PLANE_KEYS = ["node-role.kubernetes.io/*"]


class NamePatterns(ApiModel):
    """Names allowed by shell-style patterns; a name that a denied pattern matches is refused even if allowed."""

    allowed: list[str] = Field(default_factory=lambda: ["*"])
    """Patterns of names that may be used (fnmatch: * and ?)."""
    denied: list[str] = Field(default_factory=list)
    """Patterns of names that are refused, whatever allowed says."""

    def permits(self, name: str) -> bool:
        matches = lambda patterns: any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)  # noqa: E731
        return matches(self.allowed) and not matches(self.denied)


class Policy(ApiModel):
    """What the operator lets a FineTuneJob do beyond its namespace; the chart's `policy` values, one file."""

    allow_image_override: bool = False
    """Whether spec.image may replace the trainer image (the image's code runs with the job's credentials)."""
    allow_trust_remote_code: bool = False
    """Whether spec.baseModel.trustRemoteCode may run a model's own Python code in the trainer and server."""
    max_gpus: int = Field(64, ge=0)
    """Most GPUs one FineTuneJob may train on: resources.gpus x resources.nodes."""
    max_nodes: int = Field(16, ge=1)
    """Most training nodes (resources.nodes) of one FineTuneJob."""
    max_serving_replicas: int = Field(16, ge=0)
    """Most serving replicas (serving.replicas) of one FineTuneJob."""
    priority_classes: NamePatterns = Field(default_factory=lambda: NamePatterns(denied=["system-*"]))
    """PriorityClasses the training pods may use (resources.priorityClassName); the system-* classes preempt
    cluster-critical pods."""
    node_selector_keys: NamePatterns = Field(
        default_factory=lambda: NamePatterns(denied=[*_CONTROL_PLANE_KEYS, "kubernetes.io/hostname"])
    )
    """Node label keys resources.nodeSelector may name (control-plane roles and single hosts are refused)."""
    toleration_keys: NamePatterns = Field(
        default_factory=lambda: NamePatterns(denied=[*_CONTROL_PLANE_KEYS, "node.kubernetes.io/*"])
    )
    """Taint keys resources.tolerations may tolerate (control-plane and node-condition taints are refused)."""
    allow_keyless_tolerations: bool = False
    """Whether a toleration without a key (operator Exists: tolerate every taint, every node) is allowed."""
    output_uri_prefixes: list[str] = Field(default_factory=list)
    """Prefixes output.uri must start with; {namespace} stands for the FineTuneJob's namespace (for example
    s3://models/{namespace}/). Empty allows any output."""
    serving_client_namespace_labels: dict[str, str] = Field(default_factory=dict)
    """Namespaces with all these labels may reach every serving endpoint (for example the ingress controller's);
    empty adds none."""


class PolicyError(Exception):
    """A policy file that cannot be read or is not a policy."""


def load_policy(path: Path) -> Policy:
    """The policy in a YAML file (the chart mounts its `policy` values as one)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return Policy.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: cannot read the policy: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
        raise PolicyError(f"{path}: not a valid policy: {problems}") from exc


def parse_for_cluster(manifest: Any, policy: Policy) -> Parsed:
    """A manifest as the operator reads it: its schema and rules first, then what the cluster forbids."""
    parsed = parse_manifest(manifest)
    if parsed.finetunejob is None:
        return parsed
    errors = check_cluster(parsed.finetunejob.spec, parsed.finetunejob.metadata.namespace or None, policy)
    return Parsed(None, errors) if errors else parsed


def validate_for_cluster(manifest: Any, policy: Policy) -> list[FieldError]:
    """Everything the operator refuses of a manifest; an empty list means it may run."""
    return parse_for_cluster(manifest, policy).errors


def check_cluster(spec: FineTuneJobSpec, namespace: str | None, policy: Policy) -> list[FieldError]:
    """What a spec asks that the cluster's operator refuses: local-only URIs and everything the policy forbids."""
    return _local_only_uris(spec) + _policy_errors(spec, namespace, policy)


def _local_only_uris(spec: FineTuneJobSpec) -> list[FieldError]:
    uris = {
        "spec.baseModel.uri": spec.base_model.uri,
        "spec.baseModel.tokenizer.uri": spec.base_model.tokenizer.uri if spec.base_model.tokenizer else None,
        "spec.dataset.train": spec.dataset.train,
        **{f"spec.dataset.mixture[{index}].uri": source.uri for index, source in enumerate(spec.dataset.mixture or [])},
        "spec.dataset.validation": spec.dataset.validation,
        "spec.output.uri": spec.output.uri,
    }
    return [
        FieldError(
            path,
            "file:// is for `tunery run` on your own machine; in a cluster use s3://BUCKET/KEY or pvc://CLAIM/PATH",
        )
        for path, uri in uris.items()
        if uri and uri.startswith("file://")
    ]


def _refused(path: str, what: str, setting: str, fix: str = "") -> FieldError:
    fix = f"{fix}, or ask the platform team to allow it" if fix else "ask the platform team to allow it"
    return FieldError(path, f"{what} is not allowed by the operator's policy ({setting}): {fix}")


def _policy_errors(spec: FineTuneJobSpec, namespace: str | None, policy: Policy) -> list[FieldError]:
    errors: list[FieldError] = []
    resources = spec.resources
    if spec.image and not policy.allow_image_override:
        errors.append(_refused("spec.image", "a trainer image override", "allowImageOverride", "remove spec.image"))
    if spec.base_model.trust_remote_code and not policy.allow_trust_remote_code:
        errors.append(
            _refused(
                "spec.baseModel.trustRemoteCode",
                "running the model's own code",
                "allowTrustRemoteCode",
                "set it to false",
            )
        )
    if resources.gpus * resources.nodes > policy.max_gpus:
        errors.append(
            FieldError(
                "spec.resources.gpus",
                f"{resources.gpus} GPUs x {resources.nodes} nodes is more than the {policy.max_gpus} GPUs the "
                "operator's policy allows one FineTuneJob (maxGpus): ask for fewer",
            )
        )
    if resources.nodes > policy.max_nodes:
        errors.append(
            FieldError(
                "spec.resources.nodes",
                f"{resources.nodes} nodes is more than the {policy.max_nodes} the operator's policy allows one "
                "FineTuneJob (maxNodes): ask for fewer",
            )
        )
    if spec.serving.enabled and spec.serving.replicas > policy.max_serving_replicas:
        errors.append(
            FieldError(
                "spec.serving.replicas",
                f"{spec.serving.replicas} replicas is more than the {policy.max_serving_replicas} the operator's "
                "policy allows one FineTuneJob (maxServingReplicas): ask for fewer",
            )
        )
    if resources.priority_class_name and not policy.priority_classes.permits(resources.priority_class_name):
        errors.append(
            _refused(
                "spec.resources.priorityClassName",
                f"PriorityClass {resources.priority_class_name!r}",
                "priorityClasses",
                "leave it empty",
            )
        )
    for key in resources.node_selector:
        if not policy.node_selector_keys.permits(key):
            errors.append(
                _refused(f"spec.resources.nodeSelector[{key}]", f"selecting nodes by {key!r}", "nodeSelectorKeys")
            )
    for index, toleration in enumerate(resources.tolerations):
        path = f"spec.resources.tolerations[{index}].key"
        if not toleration.key:
            if not policy.allow_keyless_tolerations:
                errors.append(
                    _refused(
                        path,
                        "a toleration without a key (it tolerates every taint)",
                        "allowKeylessTolerations",
                        "name the taint key, for example nvidia.com/gpu",
                    )
                )
        elif not policy.toleration_keys.permits(toleration.key):
            errors.append(_refused(path, f"tolerating the taint {toleration.key!r}", "tolerationKeys"))
    if policy.output_uri_prefixes:
        allowed = [prefix.replace("{namespace}", namespace or "NAMESPACE") for prefix in policy.output_uri_prefixes]
        if not any(spec.output.uri.startswith(prefix) for prefix in allowed):
            errors.append(
                FieldError(
                    "spec.output.uri",
                    f"the operator's policy (outputUriPrefixes) allows outputs only under {', '.join(allowed)}: "
                    "publish there",
                )
            )
    return errors
