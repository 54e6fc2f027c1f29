"""Tenant safety in what the operator decides and renders: the policy, local-only URIs, claims, literal strings."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLES, REPO_ROOT
from invalid_cases import REFUSED_DIR, InvalidCase, load_cases
from tunery.api import contract
from tunery.api.policy import NamePatterns, Policy, PolicyError, check_cluster, load_policy, validate_for_cluster
from tunery.api.resource import FineTuneJob
from tunery.api.spec import FineTuneJobSpec
from tunery.api.status import ModelRecord
from tunery.controller import naming
from tunery.controller.claims import claim_mounts
from tunery.controller.render import TrainingTarget, render_job
from tunery.controller.serving import ServingTarget, render_serving_children, serving_target
from tunery.controller.settings import OperatorSettings

REFUSED = load_cases(REFUSED_DIR)


def spec_of(example: str = "lora-sft-chat.yaml", **changes) -> FineTuneJobSpec:
    manifest = yaml.safe_load((REPO_ROOT / "examples" / example).read_text())
    manifest["spec"].update(changes)
    return FineTuneJobSpec.model_validate(manifest["spec"])


def kubelet_expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's expansion of command, args and env values (k8s.io/kubernetes third_party expansion)."""
    out, index = [], 0
    while index < len(value):
        if value[index] == "$" and index + 1 < len(value):
            following = value[index + 1]
            if following == "$":
                out.append("$")
                index += 2
                continue
            if following == "(":
                end = value.find(")", index + 2)
                if end != -1:
                    name = value[index + 2 : end]
                    out.append(env.get(name, value[index : end + 1]))
                    index = end + 1
                    continue
        out.append(value[index])
        index += 1
    return "".join(out)


def test_every_example_passes_the_default_policy() -> None:
    for example in EXAMPLES:
        manifest = yaml.safe_load(example.read_text())
        assert validate_for_cluster(manifest, Policy()) == [], example


@pytest.mark.parametrize("case", REFUSED, ids=lambda case: case.path.stem)
def test_the_cluster_refuses_each_attack_naming_field_and_setting(case: InvalidCase) -> None:
    manifest = yaml.safe_load(case.path.read_text())
    errors = validate_for_cluster(manifest, Policy())
    assert [str(error) for error in errors if error.path == case.field and case.message in error.message], errors


def test_a_policy_file_allows_what_the_default_refuses(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        "allowTrustRemoteCode: true\npriorityClasses: {allowed: [training], denied: []}\nmaxGpus: 4\n"
    )
    policy = load_policy(policy_file)
    remote = spec_of(baseModel={"uri": "s3://models/llama/", "trustRemoteCode": True})
    assert check_cluster(remote, "team-a", policy) == []
    critical = spec_of(resources={"priorityClassName": "system-node-critical"})
    assert [e.path for e in check_cluster(critical, "team-a", policy)] == ["spec.resources.priorityClassName"]
    eight = spec_of(resources={"gpus": 8})
    assert "maxGpus" in check_cluster(eight, "team-a", policy)[0].message


def test_output_prefixes_tie_outputs_to_the_namespace() -> None:
    policy = Policy.model_validate({"outputUriPrefixes": ["s3://models/{namespace}/"]})
    mine = spec_of(output={"uri": "s3://models/team-a/bot/"})
    theirs = spec_of(output={"uri": "s3://models/team-b/bot/"})
    assert check_cluster(mine, "team-a", policy) == []
    (error,) = check_cluster(theirs, "team-a", policy)
    assert error.path == "spec.output.uri" and "s3://models/team-a/" in error.message


def test_name_patterns_deny_wins() -> None:
    patterns = NamePatterns(allowed=["*"], denied=["system-*"])
    assert patterns.permits("training") and not patterns.permits("system-cluster-critical")


def test_a_bad_policy_file_is_reported_with_its_field(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("maxGPUs: 4\n")
    with pytest.raises(PolicyError, match="maxGPUs"):
        load_policy(policy_file)


def test_claims_are_mounted_read_only_for_inputs_and_writable_for_the_output() -> None:
    mounts = claim_mounts(["pvc://store/models/base", None], ["pvc://data/sets/train.jsonl"], ["pvc://store/out/"])
    assert mounts.volumes == [
        {"name": "claim-0", "persistentVolumeClaim": {"claimName": "data"}},
        {"name": "claim-1", "persistentVolumeClaim": {"claimName": "store"}},
    ]
    root = contract.PVC_MOUNT_ROOT
    assert mounts.mounts == [
        {"name": "claim-0", "mountPath": f"{root}/data/sets", "readOnly": True, "subPath": "sets"},
        {"name": "claim-1", "mountPath": f"{root}/store/models/base", "readOnly": True, "subPath": "models/base"},
        {"name": "claim-1", "mountPath": f"{root}/store/out", "subPath": "out"},
    ]


def test_the_training_job_mounts_the_claims_its_uris_name() -> None:
    spec = spec_of("ner-bitfit.yaml", output={"uri": "pvc://model-store/out/ner/"})
    job = render_job(TrainingTarget("ner", "team-a", "uid-1", spec, naming.revision(spec), "trainer:test"))
    pod = job["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {"claimName": "model-store"}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]}
    assert mounts[f"{contract.PVC_MOUNT_ROOT}/model-store/distilbert-base-cased"]["readOnly"] is True
    assert "readOnly" not in mounts[f"{contract.PVC_MOUNT_ROOT}/model-store/out/ner"]


def test_every_source_of_a_mixture_is_mounted_read_only() -> None:
    mixture = [{"uri": "pvc://chats/2026/", "weight": 3}, {"uri": "pvc://code/python.jsonl", "weight": 1}]
    spec = spec_of("ner-bitfit.yaml", dataset={"mixture": mixture})
    job = render_job(TrainingTarget("ner", "team-a", "uid-1", spec, naming.revision(spec), "trainer:test"))
    pod = job["spec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    mounts = {
        (claims[m["name"]], m["mountPath"]): m.get("readOnly")
        for m in pod["containers"][0]["volumeMounts"]
        if m["name"] in claims
    }
    root = contract.PVC_MOUNT_ROOT
    assert mounts[("chats", f"{root}/chats/2026")] is True
    assert mounts[("code", f"{root}/code")] is True


def test_no_spec_string_is_expanded_by_the_kubelet() -> None:
    """output.uri "s3://bucket/out/$(AWS_SECRET_ACCESS_KEY)/" must reach the fetch container as written."""
    sneaky = "s3://bucket/out/$(AWS_SECRET_ACCESS_KEY)/"
    spec = spec_of(output={"uri": sneaky}, storage={"endpoint": "http://s3.local/$(AWS_SECRET_ACCESS_KEY)"})
    serving = serving_of(spec, model_uri=f"{sneaky}rev/")
    deployment = render_serving_children(serving)[-1]
    job = render_job(TrainingTarget("bot", "team-a", "uid-1", spec, naming.revision(spec), "trainer:test"))
    containers = [
        *deployment["spec"]["template"]["spec"]["initContainers"],
        *deployment["spec"]["template"]["spec"]["containers"],
        *job["spec"]["template"]["spec"]["containers"],
    ]
    secret_env = {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    seen = []
    for container in containers:
        seen += [kubelet_expand(arg, secret_env) for arg in container["command"]]
        seen += [kubelet_expand(item["value"], secret_env) for item in container.get("env", []) if "value" in item]
    assert f"--uri={sneaky}rev/" in seen
    assert "http://s3.local/$(AWS_SECRET_ACCESS_KEY)" in seen
    assert not any("s3cr3t" in value for value in seen)


def test_the_operators_own_references_still_expand() -> None:
    spec = spec_of("qlora-multinode.yaml")
    job = render_job(TrainingTarget("sql", "team-a", "uid-1", spec, naming.revision(spec), "trainer:test"))
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert kubelet_expand(command[1], {"NNODES": "2"}) == "--nnodes=2"


def serving_of(
    spec: FineTuneJobSpec, model_uri: str = "s3://models/out/bot/rev/", policy: Policy | None = None
) -> ServingTarget:
    """The serving target the operator builds for a published model of FineTuneJob team-a/bot."""
    finetunejob = FineTuneJob(metadata={"name": "bot", "namespace": "team-a", "uid": "uid-1"}, spec=spec)
    model = ModelRecord(uri=model_uri, name="bot")
    return serving_target(finetunejob, model, "rev", OperatorSettings(trainer_image="trainer:test"), policy or Policy())


def test_the_endpoint_answers_its_namespace_and_the_namespaces_named() -> None:
    spec = spec_of(serving={"clientNamespaceLabels": {"team": "a"}})
    target = serving_of(
        spec, policy=Policy.model_validate({"servingClientNamespaceLabels": {"tunery.dev/gateway": "true"}})
    )
    policy, service, _ = render_serving_children(target)
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    api, metrics = policy["spec"]["ingress"]
    assert api["from"] == [
        {"podSelector": {}},
        {"namespaceSelector": {"matchLabels": {"team": "a"}}},
        {"namespaceSelector": {"matchLabels": {"tunery.dev/gateway": "true"}}},
    ]
    assert api["ports"] == [{"protocol": "TCP", "port": contract.SERVING_PORT}]
    assert metrics["ports"] == [{"protocol": "TCP", "port": contract.SERVING_METRICS_PORT}]
    assert policy["spec"]["podSelector"]["matchLabels"] == service["spec"]["selector"]
    only_own = render_serving_children(serving_of(spec_of()))[0]
    assert only_own["spec"]["ingress"][0]["from"] == [{"podSelector": {}}]


@pytest.mark.parametrize(("runtime", "variable"), [("builtin", "TUNERY_API_KEY"), ("vllm", "VLLM_API_KEY")])
def test_the_api_key_comes_from_the_named_secret(runtime: str, variable: str) -> None:
    serving = {"runtime": runtime, "apiKeySecret": "bot-keys", "resources": {"gpus": 1}}
    deployment = render_serving_children(serving_of(spec_of(serving=serving)))[-1]
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    (key,) = [item for item in server["env"] if item["name"] == variable]
    assert key["valueFrom"] == {"secretKeyRef": {"name": "bot-keys", "key": "api-key"}}
    service = render_serving_children(serving_of(spec_of(serving=serving)))[1]
    assert [port["name"] for port in service["spec"]["ports"]] == ["http"]


def test_every_scratch_volume_and_container_has_a_disk_bound() -> None:
    spec = spec_of()
    job = render_job(TrainingTarget("bot", "team-a", "uid-1", spec, naming.revision(spec), "trainer:test"))
    deployment = render_serving_children(serving_of(spec))[-1]
    for pod in (job["spec"]["template"]["spec"], deployment["spec"]["template"]["spec"]):
        for volume in pod["volumes"]:
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), volume
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            assert container["resources"]["limits"]["ephemeral-storage"], container["name"]


def tunery(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["tunery", *args], capture_output=True, text=True, env=env, input=stdin, cwd=REPO_ROOT)


def test_validate_refuses_for_the_cluster_and_accepts_locally(cli_env, tmp_path: Path) -> None:
    result = tunery("validate", *(str(case.path) for case in REFUSED), env=cli_env)
    assert result.returncode == 1, result.stdout
    for case in REFUSED:
        assert f"    {case.field}: " in result.stdout and case.message in result.stdout, case.path
    environ = REFUSED_DIR / "environ-as-data.yaml"
    assert tunery("validate", "--local", str(environ), env=cli_env).returncode == 0
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("allowImageOverride: true\n")
    image = REFUSED_DIR / "image-override.yaml"
    assert tunery("validate", "--policy", str(policy_file), str(image), env=cli_env).returncode == 0
    both = tunery("validate", "--local", "--policy", str(policy_file), str(image), env=cli_env)
    assert both.returncode == 2 and "drop --policy" in both.stdout


def test_render_prints_every_child_or_the_same_refusals(cli_env) -> None:
    result = tunery("render", str(REPO_ROOT / "examples" / "lora-sft-chat.yaml"), env=cli_env)
    assert result.returncode == 0, result.stderr
    kinds = [document["kind"] for document in yaml.safe_load_all(result.stdout)]
    assert kinds == [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Job",
        "NetworkPolicy",
        "Service",
        "Deployment",
    ]
    refused = tunery("render", str(REFUSED_DIR / "system-priority.yaml"), env=cli_env)
    assert refused.returncode == 1 and refused.stdout == ""
    assert re.search(r"spec\.resources\.priorityClassName: PriorityClass 'system-node-critical'", refused.stderr)


def test_chart_values_hold_the_default_policy() -> None:
    """One source: the chart's `policy` values are Policy's defaults, so the chart changes nothing unasked."""
    values = yaml.safe_load((REPO_ROOT / "charts" / "tunery" / "values.yaml").read_text())
    assert values["policy"] == Policy().model_dump(by_alias=True, mode="json")
