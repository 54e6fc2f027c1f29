"""The training children rendered from a FineTuneJob: golden files, plus the properties that must always hold."""

import json
import os

import pytest
import yaml
from pydantic import ValidationError

from conftest import REPO_ROOT
from tunery.api import contract
from tunery.api.policy import Policy
from tunery.api.spec import FineTuneJobSpec
from tunery.api.validation import parse_manifest
from tunery.controller import naming
from tunery.controller.preview import preview
from tunery.controller.render import TrainingTarget, render_training_children
from tunery.controller.settings import OperatorSettings

GOLDEN = REPO_ROOT / "tests" / "golden"
# Regenerate the golden files after an intended change with: TUNERY_UPDATE_GOLDEN=1 make test-unit
UPDATE = os.environ.get("TUNERY_UPDATE_GOLDEN") == "1"


def target_for(example: str, **overrides) -> TrainingTarget:
    manifest = yaml.safe_load((REPO_ROOT / "examples" / example).read_text())
    spec = FineTuneJobSpec.model_validate(manifest["spec"])
    fields = dict(
        name=manifest["metadata"]["name"],
        namespace="team-a",
        uid="00000000-0000-0000-0000-000000000001",
        spec=spec,
        revision=naming.revision(spec),
        image="ghcr.io/tunery/trainer:test",
        queue_name=(manifest["metadata"].get("labels") or {}).get(naming.KUEUE_QUEUE_LABEL),
    )
    return TrainingTarget(**{**fields, **overrides})


@pytest.mark.parametrize("example", ["lora-sft-chat.yaml", "qlora-multinode.yaml", "pretrain-from-scratch.yaml"])
def test_children_match_golden_files(example: str) -> None:
    children = render_training_children(target_for(example))
    # The trainer config is JSON in the ConfigMap; the golden file shows it parsed, so that diffs are readable.
    for child in children:
        if child["kind"] == "ConfigMap":
            child["data"] = {key: json.loads(value) for key, value in child["data"].items()}
    rendered = yaml.safe_dump_all(children, sort_keys=False, width=120)
    golden = GOLDEN / example
    if UPDATE:
        golden.write_text(rendered)
    assert rendered == golden.read_text(), f"rendering changed; if intended, regenerate {golden}"


def test_every_child_is_owned_and_labelled() -> None:
    target = target_for("qlora-multinode.yaml")
    for child in render_training_children(target):
        owner = child["metadata"]["ownerReferences"][0]
        assert owner == {
            "apiVersion": "tunery.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": target.name,
            "uid": target.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tunery-operator"
        assert child["metadata"]["labels"].get(naming.REVISION_LABEL, target.revision) == target.revision
        assert len(child["metadata"]["name"]) <= 63


def test_credentials_only_as_secret_references() -> None:
    target = target_for("lora-sft-chat.yaml")
    *_, config_map, job = render_training_children(target)
    env = {item["name"]: item for item in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": key}}}
    config = config_map["data"][contract.CONFIG_FILE]
    assert "AWS_SECRET_ACCESS_KEY" not in config and "AWS_ACCESS_KEY_ID" not in config
    assert json.loads(config)["spec"]["storage"]["credentialsSecret"] == "s3-creds"


def test_pod_identity_when_no_secret() -> None:
    job = render_training_children(target_for("prompt-tuning.yaml"))[-1]
    names = [item["name"] for item in job["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert "AWS_ACCESS_KEY_ID" not in names and "AWS_SECRET_ACCESS_KEY" not in names


def test_restricted_pod_security() -> None:
    pod = render_training_children(target_for("lora-sft-chat.yaml"))[-1]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert {"/tmp", "/dev/shm", contract.CONFIG_DIR} <= mounts
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod["volumes"]
    assert container["terminationMessagePath"] == contract.TERMINATION_MESSAGE_PATH


def test_gpus_requested_and_limited() -> None:
    resources = render_training_children(target_for("qlora-multinode.yaml"))[-1]["spec"]["template"]["spec"][
        "containers"
    ][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "4"
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "256Gi"


def test_bad_config_exit_codes_fail_the_job_without_retries() -> None:
    job = render_training_children(target_for("lora-sft-chat.yaml"))[-1]
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == list(contract.FINAL_EXIT_CODES)
    assert job["spec"]["backoffLimit"] == 3


def test_multi_node_is_an_indexed_job_with_a_rendezvous() -> None:
    target = target_for("qlora-multinode.yaml")
    *_, service, job = render_training_children(target)
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == target.job_name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    env = {item["name"]: item for item in pod["containers"][0]["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{target.job_name}-0.{target.job_name}"
    assert env["NNODES"]["value"] == "2"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert pod["containers"][0]["command"][:2] == ["torchrun", "--nnodes=$(NNODES)"]
    assert "--nproc-per-node=4" in pod["containers"][0]["command"]


@pytest.mark.parametrize("example", ["lora-sft-chat.yaml", "qlora-multinode.yaml"])
def test_the_operators_grace_period_reaches_the_trainer_pod(example: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNERY_TRAINER_TERMINATION_GRACE_SECONDS", "900")
    finetunejob = parse_manifest(yaml.safe_load((REPO_ROOT / "examples" / example).read_text())).finetunejob
    (job,) = [child for child in preview(finetunejob, OperatorSettings(), Policy()) if child["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 900
    env = {item["name"]: item["value"] for item in pod["containers"][0]["env"] if "value" in item}
    assert env[contract.GRACE_SECONDS_ENV] == "900"
    # torchrun's own SIGTERM-to-SIGKILL wait follows the pod's, where there is a torchrun.
    assert env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") == (
        "900" if "torchrun" in pod["containers"][0]["command"] else None
    )


def test_a_grace_period_of_zero_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Zero deletes the pod at once: no step would ever be checkpointed on preemption.
    monkeypatch.setenv("TUNERY_TRAINER_TERMINATION_GRACE_SECONDS", "0")
    with pytest.raises(ValidationError, match="trainer_termination_grace_seconds"):
        OperatorSettings()


def test_kueue_owns_suspend_of_queued_jobs() -> None:
    queued = render_training_children(target_for("qlora-multinode.yaml"))[-1]
    assert "suspend" not in queued["spec"]
    assert queued["metadata"]["labels"][naming.KUEUE_QUEUE_LABEL] == "gpu-queue"
    suspended = render_training_children(target_for("ner-bitfit.yaml"))[-1]
    assert suspended["spec"]["suspend"] is True


def test_revision_ignores_serving_and_suspend_but_not_training_fields() -> None:
    spec = target_for("lora-sft-chat.yaml").spec
    same = spec.model_copy(update={"suspend": True, "serving": spec.serving.model_copy(update={"replicas": 5})})
    assert naming.revision(same) == naming.revision(spec)
    other = spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(update={"learning_rate": 1e-5})})
    assert naming.revision(other) != naming.revision(spec)


def test_a_field_added_since_the_first_release_keeps_old_revisions_at_its_default() -> None:
    spec = target_for("lora-sft-chat.yaml").spec
    # Pinned: the revision this spec had before resources.strategy existed (an upgrade must not retrain it).
    assert spec.resources.strategy == "ddp" and naming.revision(spec, running="cd266867") == "cd266867"
    sharded = spec.model_copy(update={"resources": spec.resources.model_copy(update={"strategy": "fsdp"})})
    assert naming.revision(sharded) != naming.revision(spec)
    # Nested and top-level additions too (objective, dataset.columns.chosen, method.lora.useDora), once set.
    dpo = spec.model_copy(update={"objective": spec.objective.model_copy(update={"type": "dpo"})})
    lora = spec.method.lora.model_copy(update={"use_dora": True})
    dora = spec.model_copy(update={"method": spec.method.model_copy(update={"lora": lora})})
    assert len({naming.revision(spec), naming.revision(dpo), naming.revision(dora)}) == 3


def test_storage_settings_keep_the_revision_but_not_a_legacy_one() -> None:
    """Rotating credentials or moving the endpoint resumes; the first releases' revisions hashed storage."""
    spec = target_for("lora-sft-chat.yaml").spec
    moved = spec.model_copy(
        update={
            "storage": spec.storage.model_copy(update={"endpoint": "http://s3.other:9000", "credentials_secret": "new"})
        }
    )
    assert naming.revision(moved) == naming.revision(spec)
    assert naming.storage_hash(moved) != naming.storage_hash(spec)
    assert naming.revision(moved, running="cd266867") != "cd266867"


def test_a_storage_field_added_later_keeps_every_hash_while_it_holds_its_default() -> None:
    """spec.storage.retryTimeoutSeconds came after Jobs were annotated: an upgrade must not replace them."""
    spec = target_for("lora-sft-chat.yaml").spec
    assert naming.storage_hash(spec) == "4c32828bfa5380f0"
    assert naming.revision(spec, running="cd266867") == "cd266867"
    patient = spec.model_copy(update={"storage": spec.storage.model_copy(update={"retry_timeout_seconds": 1800})})
    assert naming.storage_hash(patient) != naming.storage_hash(spec)
    assert naming.revision(patient) == naming.revision(spec)


def test_adopting_another_jobs_checkpoints_keeps_the_revision() -> None:
    spec = target_for("lora-sft-chat.yaml").spec
    adopting = spec.model_copy(
        update={
            "checkpoints": spec.checkpoints.model_copy(
                update={"resume_from_uid": "0" * 8 + "-0000-0000-0000-" + "0" * 12}
            )
        }
    )
    assert naming.revision(adopting) == naming.revision(spec)


def test_revisions_are_long_and_a_legacy_revision_is_kept_only_for_its_own_spec() -> None:
    spec = target_for("lora-sft-chat.yaml").spec
    current = naming.revision(spec)
    assert len(current) == naming.REVISION_LENGTH and current.isalnum() and current.islower()
    # Pinned, like the legacy revision: the hash of an unchanged spec never changes.
    assert current == naming.revision(spec, running=current) == "uflpko6kciy3"
    other = spec.model_copy(update={"task": "masked-lm"})
    assert naming.revision(other, running="cd266867") == naming.revision(other) != "cd266867"
    assert naming.revision(spec, running="0123abcd") == current


def test_each_revision_writes_under_its_own_prefix() -> None:
    target = target_for("lora-sft-chat.yaml")
    config = json.loads(render_training_children(target)[-2]["data"][contract.CONFIG_FILE])
    assert config["outputUri"] == f"s3://models/out/support-bot/{target.revision}/"
    assert config["spec"]["method"]["type"] == "lora" and config["revision"] == target.revision


def test_trainer_may_only_patch_its_own_status() -> None:
    target = target_for("lora-sft-chat.yaml")
    account, role, binding = render_training_children(target)[:3]
    assert role["rules"] == [
        {
            "apiGroups": ["tunery.dev"],
            "resources": ["finetunejobs/status"],
            "resourceNames": [target.name],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "team-a"}
    ]
    pod = render_training_children(target)[-1]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "support-bot-trainer"
