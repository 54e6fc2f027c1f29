"""The CRD is generated from the API models: the checked-in copies match, and the generator sees model changes."""

from pathlib import Path

import pytest
from pydantic import Field

from tunery.api import crd
from tunery.api.rules import SPEC_RULES
from tunery.api.spec import FineTuneJobSpec, Hyperparameters

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKED_IN = [REPO_ROOT / "crds" / crd.CRD_FILE_NAME, REPO_ROOT / "charts" / "tunery" / "crds" / crd.CRD_FILE_NAME]


@pytest.mark.parametrize("path", CHECKED_IN, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_checked_in_crd_matches_the_models(path: Path) -> None:
    assert path.read_text() == crd.render_crd_yaml(), f"{path} is stale: run `make generate`"


def test_a_changed_model_field_changes_the_rendered_crd(monkeypatch: pytest.MonkeyPatch) -> None:
    class ChangedHyperparameters(Hyperparameters):
        label_smoothing: float = Field(0.0, ge=0)
        """A field added without regenerating."""

    class ChangedSpec(FineTuneJobSpec):
        hyperparameters: ChangedHyperparameters = Field(default_factory=ChangedHyperparameters)
        """Optimisation settings."""

    monkeypatch.setattr(crd, "FineTuneJobSpec", ChangedSpec)
    rendered = crd.render_crd_yaml()
    assert "labelSmoothing" in rendered
    assert rendered != CHECKED_IN[0].read_text()


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural_and_described() -> None:
    spec_schema = crd.render_schema()["properties"]["spec"]
    status_schema = crd.render_schema()["properties"]["status"]
    for root, schema in (("spec", spec_schema), ("status", status_schema)):
        for path, node in _walk(schema, root):
            typed = (
                "type" in node
                or node.get("x-kubernetes-int-or-string")
                or node.get("x-kubernetes-preserve-unknown-fields")
            )
            assert typed, f"{path} has no type"
            assert not {"$ref", "anyOf", "title"} & node.keys() or node.get("x-kubernetes-int-or-string"), path
            if "{}" not in path and "[]" not in path.rsplit(".", 1)[-1]:
                assert node.get("description"), f"{path} has no description"


def test_every_rule_is_in_the_crd_with_its_field_path() -> None:
    validations = crd.render_schema()["properties"]["spec"]["x-kubernetes-validations"]
    assert [(v["rule"], v["fieldPath"], v["message"]) for v in validations] == [
        (rule.rule, rule.field_path, rule.message) for rule in SPEC_RULES
    ]


def test_crd_names_printer_columns_and_status_subresource() -> None:
    rendered = crd.render_crd()
    assert rendered["spec"]["names"]["shortNames"] == ["ftj"]
    version = rendered["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [column["name"] for column in version["additionalPrinterColumns"]] == [
        "Phase",
        "Progress",
        "Loss",
        "Model",
        "Age",
    ]


def test_object_defaults_cascade_and_factory_defaults_are_emitted() -> None:
    spec = crd.render_schema()["properties"]["spec"]["properties"]
    assert spec["method"]["default"] == {}
    assert spec["hyperparameters"]["properties"]["learningRate"]["default"] == 2.0e-4
    assert spec["evaluation"]["properties"]["metrics"]["default"] == ["loss"]
    assert "default" not in spec["method"]["properties"]["lora"], "optional blocks must not appear by default"
    assert spec["hyperparameters"]["properties"]["learningRate"]["exclusiveMinimum"] is True
