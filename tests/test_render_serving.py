"""The serving children rendered for a published model: golden files for builtin and vLLM, and the rollout rules."""

import os

import pytest
import yaml

from conftest import REPO_ROOT
from tunery.api.spec import FineTuneJobSpec
from tunery.controller.serving import MODEL_DIR, ServingTarget, render_serving_children

GOLDEN = REPO_ROOT / "tests" / "golden"
UPDATE = os.environ.get("TUNERY_UPDATE_GOLDEN") == "1"


def target(runtime: str = "builtin", **serving) -> ServingTarget:
    manifest = yaml.safe_load((REPO_ROOT / "examples" / "lora-sft-chat.yaml").read_text())
    manifest["spec"]["serving"] = {**manifest["spec"]["serving"], "runtime": runtime, **serving}
    return ServingTarget(
        name="support-bot",
        namespace="team-a",
        uid="00000000-0000-0000-0000-000000000001",
        spec=FineTuneJobSpec.model_validate(manifest["spec"]),
        model_uri="s3://models/out/support-bot/cd266867/",
        model_revision="cd266867",
        model_name="support-bot",
        image="ghcr.io/tunery/trainer:test",
        vllm_image="vllm/vllm-openai:v0.11.0",
        progress_deadline_seconds=900,
    )


@pytest.mark.parametrize(
    ("name", "serving_target"),
    [
        ("serving-builtin.yaml", target()),
        ("serving-vllm.yaml", target("vllm", resources={"gpus": 1, "cpu": "8", "memory": "32Gi"})),
    ],
)
def test_serving_children_match_golden_files(name: str, serving_target: ServingTarget) -> None:
    rendered = yaml.safe_dump_all(render_serving_children(serving_target), sort_keys=False, width=120)
    if UPDATE:
        (GOLDEN / name).write_text(rendered)
    assert rendered == (GOLDEN / name).read_text(), f"rendering changed; if intended, regenerate tests/golden/{name}"


def test_the_old_model_serves_until_the_new_pods_are_ready() -> None:
    _, service, deployment = render_serving_children(target())
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"]["tunery.dev/model-revision"] == "cd266867"
    (fetch,) = pod["spec"]["initContainers"]
    assert fetch["command"] == [
        "tunery-trainer",
        "fetch",
        "--uri=s3://models/out/support-bot/cd266867/",
        f"--dest={MODEL_DIR}",
        "--addressing=path",
    ]
    (server,) = pod["spec"]["containers"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_a_new_model_changes_the_pod_template_and_a_replica_change_does_not() -> None:
    first = render_serving_children(target())[2]
    scaled = render_serving_children(target(replicas=3))[2]
    assert scaled["spec"]["replicas"] == 3 and scaled["spec"]["template"] == first["spec"]["template"]
    newer = ServingTarget(**{**target().__dict__, "model_uri": "s3://models/out/support-bot/abcdef12/"})
    assert render_serving_children(newer)[2]["spec"]["template"] != first["spec"]["template"]


def test_vllm_serves_the_merged_model_or_the_adapter_on_its_base() -> None:
    _, _, deployment = render_serving_children(target("vllm", resources={"gpus": 1, "cpu": "8", "memory": "32Gi"}))
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    script = server["command"][-1]
    assert f"vllm serve {MODEL_DIR}/model" in script and "--enable-lora --lora-modules" in script
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
