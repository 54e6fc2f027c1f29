"""The published model's card: front matter, the spec as YAML, data and results tables, and the loss curve."""

import re
from pathlib import Path

import yaml

from conftest import REPO_ROOT
from tunery.api.spec import FineTuneJobSpec
from tunery_trainer.model_card import write_model_card

PNG_SIGNATURE = b"\x89PNG"


def example_spec(example: str) -> dict:
    manifest = yaml.safe_load((REPO_ROOT / "examples" / example).read_text())
    return FineTuneJobSpec.model_validate(manifest["spec"]).model_dump(by_alias=True, exclude_none=True, mode="json")


def write_card(directory: Path, spec: dict, **overrides) -> str:
    arguments = dict(
        name="support-bot",
        spec=spec,
        data_stats={"trainExamples": 900, "validationExamples": 100, "trainTokens": 123456},
        final_metrics={"evalLoss": 0.812345678, "evalPerplexity": 2.2531, "trainLoss": 0.7},
        train_loss=[(1, 2.5), (2, 2.1), (3, 1.7), (4, float("nan")), (5, 1.2)],
        eval_loss=[(2, 2.2), (5, 1.3)],
        base_model="s3://models/llama-3.2-1b-instruct/",
        revision="abc123",
    )
    write_model_card(directory, **(arguments | overrides))
    return (directory / "README.md").read_text()


def fenced_block(readme: str, language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)\n```", readme, re.DOTALL)
    assert match, f"no {language} block"
    return match.group(1)


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_front_matter_names_the_library_base_model_and_tags(tmp_path: Path) -> None:
    readme = write_card(tmp_path, example_spec("lora-sft-chat.yaml"))
    assert front_matter(readme) == {
        "library_name": "peft",
        "base_model": "s3://models/llama-3.2-1b-instruct/",
        "tags": ["tunery", "causal-lm", "lora"],
    }
    assert "tags: [tunery, causal-lm, lora]" in readme
    assert "\n# support-bot\n" in readme
    assert "revision `abc123`" in readme


def test_full_weight_methods_are_transformers_models(tmp_path: Path) -> None:
    spec = example_spec("ner-bitfit.yaml")
    readme = write_card(tmp_path, spec)
    assert front_matter(readme)["library_name"] == "transformers"
    assert front_matter(readme)["tags"] == ["tunery", "token-classification", "bitfit"]
    usage = fenced_block(readme, "python")
    assert "transformers.AutoModelForTokenClassification.from_pretrained(path)" in usage
    assert "peft" not in usage


def test_adapter_usage_loads_the_adapter_onto_the_task_class(tmp_path: Path) -> None:
    usage = fenced_block(write_card(tmp_path, example_spec("sentiment-classifier-ia3.yaml")), "python")
    assert "transformers.AutoTokenizer.from_pretrained(path)" in usage
    assert "transformers.AutoModelForSequenceClassification.from_pretrained(" in usage
    assert "peft.PeftModel.from_pretrained(base, path)" in usage
    compile(usage, "usage", "exec")


def test_the_spec_round_trips_through_the_yaml_block(tmp_path: Path) -> None:
    spec = example_spec("lora-sft-chat.yaml")
    readme = write_card(tmp_path, spec)
    assert yaml.safe_load(fenced_block(readme, "yaml")) == spec
    assert "credentialsSecret: s3-creds" in readme


def test_data_and_results_tables(tmp_path: Path) -> None:
    readme = write_card(tmp_path, example_spec("lora-sft-chat.yaml"))
    assert "## Data\n\n| Statistic | Value |\n| --- | --- |\n| trainExamples | 900 |" in readme
    assert "| trainTokens | 123456 |" in readme
    assert "## Results\n\n| Metric | Value |\n| --- | --- |\n| evalLoss | 0.8123 |" in readme
    assert "| evalPerplexity | 2.253 |" in readme
    assert "| trainLoss | 0.7 |" in readme


def test_the_loss_curve_is_a_png_linked_from_the_readme(tmp_path: Path) -> None:
    readme = write_card(tmp_path, example_spec("lora-sft-chat.yaml"))
    assert "## Training loss\n\n![loss curve](loss_curve.png)" in readme
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    # 6 x 3.5 inches at 100 dpi.
    assert int.from_bytes(png[16:20], "big") == 600 and int.from_bytes(png[20:24], "big") == 350


def test_no_loss_curve_without_training_loss(tmp_path: Path) -> None:
    readme = write_card(tmp_path, example_spec("lora-sft-chat.yaml"), train_loss=[], eval_loss=[], final_metrics={})
    assert not (tmp_path / "loss_curve.png").exists()
    assert "loss_curve.png" not in readme and "## Training loss" not in readme
    assert "## Results\n\nNone recorded." in readme
