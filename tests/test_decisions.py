"""Status decisions: the phase, conditions and failure reasons computed from observed Jobs and pods."""

from datetime import UTC, datetime, timedelta
from typing import get_args

from tunery.api.status import ConditionType, FineTuneJobStatus, ModelRecord, Phase, ServingStatus
from tunery.api.validation import FieldError
from tunery.controller.decisions import (
    Observation,
    ServingObservation,
    changed_fields,
    decide,
    operator_status,
    serving_status,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def job(*conditions: tuple[str, str, str], suspend: bool = False, **status) -> dict:
    return {
        "metadata": {"name": "ft-1234abcd"},
        "spec": {"suspend": suspend},
        "status": {
            "conditions": [
                {"type": kind, "status": "True", "reason": reason, "message": message}
                for kind, reason, message in conditions
            ],
            **status,
        },
    }


def pod(
    phase: str = "Pending", conditions=(), container_state=None, last_state=None, created: str = "2026-11-22T11:00:00Z"
) -> dict:
    container = {
        "name": "trainer",
        "image": "ghcr.io/tunery/trainer:1",
        "state": container_state or {},
        "lastState": last_state or {},
    }
    return {
        "metadata": {"name": f"ft-1234abcd-{created[-3:-1]}", "creationTimestamp": created},
        "status": {"phase": phase, "conditions": list(conditions), "containerStatuses": [container]},
    }


def status_of(observation: Observation, previous: dict, now: datetime) -> dict:
    """The status as the API server would store it."""
    status = operator_status(observation, decide(observation), FineTuneJobStatus.model_validate(previous), now)
    return status.model_dump(by_alias=True, mode="json", exclude_none=True)


def patch_between(wanted: dict, stored: dict) -> dict:
    return changed_fields(FineTuneJobStatus.model_validate(wanted), FineTuneJobStatus.model_validate(stored))


def observe(**fields) -> Observation:
    return Observation(**{"generation": 3, "revision": "1234abcd", **fields})


def test_invalid_spec_fails_and_stalls_with_the_field_message() -> None:
    observation = observe(spec_errors=[FieldError("spec.resources.gpus", "qlora needs a GPU")])
    status = status_of(observation, {}, NOW)
    assert status["phase"] == "Failed"
    assert status["failure"] == {"reason": "InvalidSpec", "message": "spec.resources.gpus: qlora needs a GPU"}
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Validated"]["status"] == "False" and "spec.resources.gpus" in conditions["Validated"]["message"]
    assert conditions["Stalled"]["status"] == "True" and conditions["Ready"]["status"] == "False"
    assert conditions["Reconciling"]["status"] == "False"
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


def test_lifecycle_phases() -> None:
    assert decide(observe()).phase == "Pending"
    assert decide(observe(job=job(), pods=[pod()])).reason == "Starting"
    assert decide(observe(job=job(), pods=[pod("Running")])).phase == "Running"
    assert decide(observe(job=job(("Complete", "Completed", "")))).phase == "Succeeded"
    assert decide(observe(job=job(suspend=True))).phase == "Suspended"
    assert decide(observe(job=job(suspend=True), queued=True)).phase == "Queued"


def test_succeeded_is_ready_and_complete() -> None:
    status = status_of(observe(job=job(("Complete", "Completed", ""), succeeded=1)), {}, NOW)
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {
        "Validated": "True",
        "Ready": "True",
        "Reconciling": "False",
        "Stalled": "False",
        "Complete": "True",
        "Failed": "False",
        "ModelPublished": "False",
        "Serving": "False",
    }
    assert "failure" not in status and status["attempts"] == 1


def test_oom_killed_is_named_with_a_fix() -> None:
    failed = job(("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"), failed=4)
    oom = pod("Failed", container_state={"terminated": {"reason": "OOMKilled", "exitCode": 137}})
    verdict = decide(observe(job=failed, pods=[oom]))
    assert verdict.reason == "OOMKilled" and "spec.resources.memory" in verdict.message


def test_trainer_termination_message_wins() -> None:
    failed = job(("Failed", "PodFailurePolicy", "Container trainer exited with 65"))
    message = '{"reason": "DataError", "message": "s3://data/train.jsonl row 17: missing column text"}'
    crashed = pod("Failed", container_state={"terminated": {"exitCode": 65, "message": message}})
    assert decide(observe(job=failed, pods=[crashed])).reason == "DataError"
    assert "row 17" in decide(observe(job=failed, pods=[crashed])).message


def test_kubernetes_reason_when_the_trainer_said_nothing() -> None:
    failed = job(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline"))
    verdict = decide(
        observe(
            job=failed, pods=[pod("Failed", container_state={"terminated": {"exitCode": 143, "message": "Killed"}})]
        )
    )
    assert verdict.reason == "DeadlineExceeded" and "activeDeadlineSeconds" in verdict.message


def test_unschedulable_keeps_the_scheduler_message() -> None:
    unschedulable = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    }
    verdict = decide(observe(job=job(), pods=[pod(conditions=[unschedulable])]))
    assert (
        verdict.phase == "Pending"
        and verdict.reason == "Unschedulable"
        and "Insufficient nvidia.com/gpu" in verdict.message
    )


def test_image_pull_errors_are_named() -> None:
    waiting = {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}
    verdict = decide(observe(job=job(), pods=[pod(container_state=waiting)]))
    assert verdict.reason == "ImagePullBackOff" and "ghcr.io/tunery/trainer:1" in verdict.message


def test_unchanged_status_patches_nothing_and_keeps_transition_times() -> None:
    first = status_of(observe(job=job(), pods=[pod("Running")]), {}, NOW)
    second = status_of(observe(job=job(), pods=[pod("Running")]), first, NOW + timedelta(minutes=5))
    assert patch_between(second, first) == {}
    finished = status_of(observe(job=job(("Complete", "Completed", ""))), first, NOW + timedelta(minutes=9))
    times = {c["type"]: c["lastTransitionTime"] for c in finished["conditions"]}
    assert times["Validated"] == "2026-11-22T12:00:00Z" and times["Complete"] == "2026-11-22T12:09:00Z"
    assert set(patch_between(finished, first)) == {"phase", "conditions"}


def test_pods_the_job_could_not_create() -> None:
    warnings = [
        {"reason": "FailedCreate", "message": "older", "lastTimestamp": "2026-11-22T11:00:00Z"},
        {
            "reason": "FailedCreate",
            "message": 'pods "ft-" is forbidden: exceeded quota: gpus',
            "lastTimestamp": "2026-11-22T11:05:00Z",
        },
    ]
    verdict = decide(observe(job=job(), job_warnings=warnings))
    assert verdict.phase == "Pending" and verdict.reason == "FailedCreate" and "exceeded quota" in verdict.message
    assert decide(observe(job=job(), pods=[pod("Running")], job_warnings=warnings)).phase == "Running"


def test_the_model_changes_only_when_a_revision_succeeds() -> None:
    model = ModelRecord(uri="s3://models/out/chat/1234abcd/", name="chat")
    running = status_of(observe(job=job(), pods=[pod("Running")], model=model), {}, NOW)
    assert "model" not in running and running["modelRevision"] == ""
    published = {c["type"]: c for c in running["conditions"]}["ModelPublished"]
    assert published["status"] == "False" and published["reason"] == "NotPublished"
    done = status_of(observe(job=job(("Complete", "Completed", "")), model=model), running, NOW)
    assert done["model"] == {"uri": model.uri, "name": "chat"} and done["modelRevision"] == "1234abcd"
    published = {c["type"]: c for c in done["conditions"]}["ModelPublished"]
    assert published["status"] == "True" and model.uri in published["message"]
    retraining = status_of(observe(job=job(), pods=[pod("Running")], revision="5678efgh"), done, NOW)
    assert retraining["model"] == done["model"] and retraining["modelRevision"] == "1234abcd"
    assert {c["type"]: c["status"] for c in retraining["conditions"]}["ModelPublished"] == "True"


ENDPOINT = "http://chat-serving.team-a.svc.cluster.local/v1"


def deployment(generation: int = 2, replicas: int = 2, conditions=(), **status) -> dict:
    return {
        "metadata": {"name": "chat-serving", "generation": generation},
        "spec": {"replicas": replicas, "progressDeadlineSeconds": 600},
        "status": {"observedGeneration": generation, "conditions": list(conditions), **status},
    }


def serving(deployment_: dict, pods=()) -> ServingObservation:
    return ServingObservation(deployment_, list(pods), ENDPOINT)


def test_serving_is_ready_only_when_every_replica_runs_the_new_model() -> None:
    rolling = deployment(replicas=2, updatedReplicas=1, readyReplicas=2, availableReplicas=2)
    rolling["status"]["replicas"] = 3
    assert serving_status(serving(rolling)).phase == "Deploying"
    stale = deployment(replicas=2, updatedReplicas=2, readyReplicas=2)
    stale["status"]["observedGeneration"] = 1
    assert serving_status(serving(stale)).phase == "Deploying"
    done = deployment(replicas=2, updatedReplicas=2, readyReplicas=2)
    done["status"]["replicas"] = 2
    assert serving_status(serving(done)) == ServingStatus(phase="Ready", endpoint=ENDPOINT, ready_replicas=2)


def test_a_rollout_past_its_deadline_fails_and_says_the_old_model_keeps_serving() -> None:
    stuck = deployment(
        replicas=1,
        conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}],
        updatedReplicas=1,
        readyReplicas=1,
    )
    unschedulable = pod(
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes: Insufficient nvidia.com/gpu",
            }
        ]
    )
    result = serving_status(serving(stuck, [unschedulable]))
    assert result.phase == "Failed" and result.ready_replicas == 1
    assert "within 600s" in result.message and "Insufficient nvidia.com/gpu" in result.message
    assert "keep serving the previous model" in result.message


def test_a_model_the_init_container_cannot_fetch_fails_with_its_reason() -> None:
    failing = pod()
    failing["status"]["initContainerStatuses"] = [
        {
            "name": "fetch-model",
            "lastState": {
                "terminated": {
                    "exitCode": 66,
                    "message": '{"reason": "ModelIncomplete", "message": "s3://m/out/ has no tunery-manifest.json"}',
                }
            },
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        }
    ]
    result = serving_status(serving(deployment(replicas=1, updatedReplicas=1), [failing]))
    assert result.phase == "Failed" and result.message.startswith("ModelIncomplete: s3://m/out/")


def test_ready_waits_for_the_endpoint_when_serving_is_enabled() -> None:
    succeeded = job(("Complete", "Completed", ""), succeeded=1)
    deploying = deployment(replicas=1, updatedReplicas=1, readyReplicas=0)
    observation = observe(job=succeeded, serving_enabled=True, serving=serving(deploying))
    status = status_of(observation, {}, NOW)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Succeeded" and conditions["Complete"]["status"] == "True"
    assert conditions["Ready"]["status"] == "False" and conditions["Ready"]["reason"] == "Deploying"
    assert conditions["Reconciling"]["status"] == "True" and conditions["Serving"]["status"] == "False"
    ready = deployment(replicas=1, updatedReplicas=1, readyReplicas=1)
    ready["status"]["replicas"] = 1
    status = status_of(observe(job=succeeded, serving_enabled=True, serving=serving(ready)), {}, NOW)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["Serving"]["status"] == "True"
    assert conditions["Reconciling"]["status"] == "False" and status["serving"]["endpoint"] == ENDPOINT


def test_every_declared_phase_and_condition_is_produced() -> None:
    """The CRD declares the phases and condition types; each is reachable, so none is decoration."""
    model = ModelRecord(uri="s3://models/out/chat/1234abcd/", name="chat")
    succeeded = job(("Complete", "Completed", ""))
    observations = [
        observe(spec_errors=[FieldError("spec.resources.gpus", "qlora needs a GPU")]),
        observe(),
        observe(job=job(suspend=True), queued=True),
        observe(job=job(suspend=True)),
        observe(job=job(), pods=[pod("Running")]),
        observe(job=succeeded, model=model),
        observe(job=job(("Failed", "BackoffLimitExceeded", "too many retries"))),
    ]
    statuses = [status_of(observation, {}, NOW) for observation in observations]
    assert {status["phase"] for status in statuses} == set(get_args(Phase))
    holding = {c["type"] for status in statuses for c in status["conditions"] if c["status"] == "True"}
    ready = deployment(replicas=1, updatedReplicas=1, readyReplicas=1)
    ready["status"]["replicas"] = 1
    served = status_of(observe(job=succeeded, model=model, serving_enabled=True, serving=serving(ready)), {}, NOW)
    holding |= {c["type"] for c in served["conditions"] if c["status"] == "True"}
    assert holding == set(get_args(ConditionType))


def test_a_finished_trainer_keeps_the_job_running_until_the_job_completes() -> None:
    verdict = decide(observe(job=job(), pods=[pod("Succeeded")]))
    assert (verdict.phase, verdict.reason) == ("Running", "Finishing")
