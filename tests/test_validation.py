"""Validation of FineTuneJob manifests: valid examples pass; each invalid one names its field and the fix."""

import copy

import pytest
import yaml

from conftest import EXAMPLES
from invalid_cases import InvalidCase, load_cases
from tunery.api.validation import validate_manifest

MINIMAL = {
    "apiVersion": "tunery.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "minimal"},
    "spec": {
        "baseModel": {"uri": "s3://models/llama/"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://models/out/"},
    },
}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_examples_are_valid(path) -> None:
    assert validate_manifest(yaml.safe_load(path.read_text())) == []


def test_examples_cover_every_task_and_five_methods() -> None:
    specs = [yaml.safe_load(path.read_text())["spec"] for path in EXAMPLES]
    assert len(specs) >= 6
    assert {spec.get("task", "causal-lm") for spec in specs} == {
        "causal-lm",
        "masked-lm",
        "sequence-classification",
        "token-classification",
    }
    assert len({spec.get("method", {}).get("type", "lora") for spec in specs}) >= 5


@pytest.mark.parametrize("case", load_cases(), ids=lambda case: case.path.stem)
def test_invalid_manifest_names_field_and_fix(case: InvalidCase) -> None:
    errors = validate_manifest(yaml.safe_load(case.path.read_text()))
    assert errors, "accepted an invalid manifest"
    matching = [error for error in errors if error.path == case.field]
    assert matching, f"no error at {case.field}: {errors}"
    assert any(case.message in error.message for error in matching), matching


def test_minimal_manifest_is_valid() -> None:
    assert validate_manifest(MINIMAL) == []


@pytest.mark.parametrize(
    ("mutate", "path", "fragment"),
    [
        (lambda m: m.update(apiVersion="tunery.dev/v1"), "apiVersion", "must be tunery.dev/v1alpha1"),
        (lambda m: m["metadata"].update(name="Bad_Name"), "metadata.name", "not a valid name"),
        (lambda m: m["metadata"].update(name="x" * 46), "metadata.name", "at most 45"),
        (lambda m: m["metadata"].pop("name"), "metadata.name", "required"),
        (lambda m: m.pop("spec"), "spec", "required"),
        (lambda m: m["spec"].update(method="lora"), "spec.method", "must be a mapping"),
        (lambda m: m["spec"]["dataset"].update(validationSplit=1.0), "spec.dataset.validationSplit", "less than 1"),
        (lambda m: m["spec"].update(storage={"endpoint": "minio:9000"}), "spec.storage.endpoint", "http(s) URL"),
        (
            lambda m: m["spec"].update(storage={"credentialsSecret": "S3 Creds"}),
            "spec.storage.credentialsSecret",
            "object name",
        ),
        (
            lambda m: m["spec"].update(resources={"gpuResource": "nvidia com/gpu"}),
            "spec.resources.gpuResource",
            "resource name",
        ),
        (
            lambda m: m["spec"].update(resources={"tolerations": [{"operator": "Maybe"}]}),
            "spec.resources.tolerations[0].operator",
            "'Exists' or 'Equal'",
        ),
        (
            lambda m: m["spec"].update(evaluation={"metrics": ["loss", "perplexity"]}, task="token-classification"),
            "spec.evaluation.metrics",
            "language-modelling metric",
        ),
        (
            lambda m: m["spec"].update(evaluation={"metrics": ["loss", "f1"]}, task="causal-lm"),
            "spec.evaluation.metrics",
            "use loss or perplexity for this task",
        ),
        (
            lambda m: m["spec"]["baseModel"].update(tokenizer={"trainVocabSize": 8000}),
            "spec.baseModel.tokenizer.trainVocabSize",
            "does not match",
        ),
        (lambda m: m["spec"].update(serving={"runtime": "vllm"}), "spec.serving.resources.gpus", "vllm needs a GPU"),
    ],
)
def test_field_errors(mutate, path: str, fragment: str) -> None:
    manifest = copy.deepcopy(MINIMAL)
    mutate(manifest)
    errors = validate_manifest(manifest)
    assert any(error.path == path and fragment in error.message for error in errors), errors


def test_quantities_accept_integers_and_strings() -> None:
    manifest = copy.deepcopy(MINIMAL)
    manifest["spec"]["resources"] = {"cpu": 8, "memory": "64Gi"}
    manifest["spec"]["serving"] = {"resources": {"cpu": "500m", "memory": 2.5}}
    assert validate_manifest(manifest) == []


def test_rules_see_defaults_like_the_api_server() -> None:
    """fp16 is fine with the default of one GPU, and rejected once the GPUs are set to zero."""
    manifest = copy.deepcopy(MINIMAL)
    manifest["spec"]["hyperparameters"] = {"precision": "fp16"}
    assert validate_manifest(manifest) == []
    manifest["spec"]["resources"] = {"gpus": 0}
    assert [error.path for error in validate_manifest(manifest)] == ["spec.hyperparameters.precision"]


def test_not_a_mapping() -> None:
    assert validate_manifest(["a", "list"])[0].message.startswith("expected a Kubernetes object")
