"""The trainer as the training pod runs it: the config the operator renders, S3 keys as env, SeaweedFS; check and train."""

import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
from tiny_models import minilm_path

from tunery.api import contract
from tunery.api.spec import FineTuneJobSpec
from tunery.controller import naming
from tunery.controller.render import TrainingTarget, render_config_map

pytestmark = pytest.mark.integration

BUCKET = "trainer-check"


POSITIVE = ["great", "wonderful", "excellent", "delightful", "fantastic", "lovely"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "disgusting", "poor"]
# Held-out adjectives never appear in training: only what the pretrained encoder already knows can classify them.
HELD_OUT = {"pos": ["amazing", "superb", "pleasant", "perfect"], "neg": ["bad", "nasty", "miserable", "unpleasant"]}
NOUNS = ["food", "service", "room", "movie", "book", "trip", "staff", "coffee"]
TEMPLATES = ["the {noun} was {adjective}", "what a {adjective} {noun}", "i found the {noun} {adjective}"]


def s3_client(s3_env: dict):
    return boto3.client(
        "s3",
        endpoint_url=s3_env["TUNERY_S3_ENDPOINT"],
        aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def reviews(adjectives: dict[str, list[str]]) -> list[dict[str, str]]:
    return [
        {"review": template.format(noun=noun, adjective=adjective), "stars": label}
        for label, words in adjectives.items()
        for adjective in words
        for noun in NOUNS
        for template in TEMPLATES
    ]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture(scope="module")
def bucket(s3_env) -> str:
    s3 = s3_client(s3_env)
    s3.create_bucket(Bucket=BUCKET)
    rows = [{"review": f"review {index}", "stars": "pos" if index % 2 else "neg"} for index in range(40)]
    s3.put_object(
        Bucket=BUCKET, Key="reviews/train.jsonl", Body="".join(json.dumps(row) + "\n" for row in rows).encode()
    )
    s3.put_object(Bucket=BUCKET, Key="reviews/no-label.jsonl", Body=b'{"review": "x"}\n{"review": "y"}\n')
    s3.put_object(Bucket=BUCKET, Key="reviews/empty.jsonl", Body=b"")
    s3.put_object(
        Bucket=BUCKET, Key="reviews/malformed.jsonl", Body=b'{"review": "x", "stars": "pos"}\nnot json\n[1]\n'
    )
    s3.put_object(Bucket=BUCKET, Key="sentiment/train.jsonl", Body=jsonl(reviews({"pos": POSITIVE, "neg": NEGATIVE})))
    s3.put_object(Bucket=BUCKET, Key="sentiment/validation.jsonl", Body=jsonl(reviews(HELD_OUT)))
    for path in minilm_path().iterdir():
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"models/minilm/{path.name}")
    return BUCKET


def rendered_config(tmp_path: Path, s3_env: dict, train: str, **spec_fields) -> Path:
    """The trainer.json exactly as the operator puts it into the ConfigMap."""
    spec = FineTuneJobSpec.model_validate(
        {
            "baseModel": {"uri": f"s3://{BUCKET}/models/minilm/"},
            "task": "sequence-classification",
            "dataset": {"train": train, "columns": {"text": "review", "label": "stars"}, "validationSplit": 0.25},
            "output": {"uri": f"s3://{BUCKET}/out/{tmp_path.name}/"},
            **spec_fields,
            "storage": {
                "endpoint": s3_env["TUNERY_S3_ENDPOINT"],
                "addressing": "path",
                "credentialsSecret": "s3-creds",
            },
        }
    )
    target = TrainingTarget("reviews", "team-a", "uid-1", spec, naming.revision(spec), "trainer:test")
    path = tmp_path / contract.CONFIG_FILE
    path.write_text(render_config_map(target)["data"][contract.CONFIG_FILE])
    return path


def run_trainer(
    command: str, config: Path, s3_env: dict, tmp_path: Path, secret: str | None = None
) -> tuple[int, str, dict | None]:
    termination = tmp_path / "termination-log"
    env = {
        "PATH": str(Path(sys.executable).parent),
        "AWS_ACCESS_KEY_ID": s3_env["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": secret or s3_env["AWS_SECRET_ACCESS_KEY"],
        "AWS_REGION": "us-east-1",
        "TUNERY_TERMINATION_MESSAGE_PATH": str(termination),
    }
    result = subprocess.run(
        ["tunery-trainer", command, f"--config={config}", f"--workdir={tmp_path / 'work'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    message = json.loads(termination.read_text()) if termination.exists() else None
    return result.returncode, result.stdout, message


def published_keys(s3_env: dict, tmp_path: Path) -> list[str]:
    listing = s3_client(s3_env).list_objects_v2(Bucket=BUCKET, Prefix=f"out/{tmp_path.name}/")
    return [item["Key"] for item in listing.get("Contents", [])]


def test_check_reports_good_data(s3_env, bucket, tmp_path) -> None:
    code, output, message = run_trainer(
        "check", rendered_config(tmp_path, s3_env, f"s3://{bucket}/reviews/train.jsonl"), s3_env, tmp_path
    )
    assert code == 0 and message is None
    report = json.loads(output)
    assert report["trainExamples"] == 30 and report["validationExamples"] == 10 and report["labels"] == ["neg", "pos"]


BAD_INPUTS = {
    "wrong-keys": (
        "reviews/train.jsonl",
        "wrong",
        contract.EXIT_STORAGE_ERROR,
        "StorageCredentials",
        "credentialsSecret",
    ),
    "missing-bucket": (None, None, contract.EXIT_STORAGE_ERROR, "BucketMissing", "no-such-bucket"),
    "missing-column": ("reviews/no-label.jsonl", None, contract.EXIT_DATA_ERROR, "DataError", "'stars'"),
    "empty-file": ("reviews/empty.jsonl", None, contract.EXIT_DATA_ERROR, "DataError", "empty.jsonl"),
    "malformed-rows": ("reviews/malformed.jsonl", None, contract.EXIT_DATA_ERROR, "DataError", "not JSON"),
}


@pytest.mark.parametrize("command", ["check", "train"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_with_a_reason_an_exit_code_and_nothing_published(
    s3_env, bucket, tmp_path, command: str, case: str
) -> None:
    key, secret, exit_code, reason, named = BAD_INPUTS[case]
    train = f"s3://{bucket}/{key}" if key else "s3://no-such-bucket/train.jsonl"
    code, _, message = run_trainer(command, rendered_config(tmp_path, s3_env, train), s3_env, tmp_path, secret)
    assert code == exit_code
    assert message["reason"] == reason and named in message["message"], message
    assert published_keys(s3_env, tmp_path) == []


def test_unreadable_config_exit_64(s3_env, tmp_path) -> None:
    broken = tmp_path / "trainer.json"
    broken.write_text('{"kind": "TrainerConfig"}')
    code, _, message = run_trainer("train", broken, s3_env, tmp_path)
    assert (
        code == contract.EXIT_INVALID_CONFIG
        and message["reason"] == "InvalidConfig"
        and "finetuneJob" in message["message"]
    )


@pytest.mark.slow
def test_fine_tuned_minilm_beats_the_untrained_baseline_on_held_out_words(s3_env, bucket, tmp_path) -> None:
    """A real fine-tune of a real pretrained encoder: data and model from S3, the model published back to S3."""
    config = rendered_config(
        tmp_path,
        s3_env,
        f"s3://{bucket}/sentiment/train.jsonl",
        dataset={
            "train": f"s3://{bucket}/sentiment/train.jsonl",
            "validation": f"s3://{bucket}/sentiment/validation.jsonl",
            "columns": {"text": "review", "label": "stars"},
        },
        method={"type": "full"},
        hyperparameters={"epochs": 2, "batchSize": 16, "learningRate": 5e-5, "warmupRatio": 0.1},
        evaluation={"metrics": ["loss", "accuracy", "f1"]},
        resources={"gpus": 0},
    )
    code, output, message = run_trainer("train", config, s3_env, tmp_path)
    assert code == 0, (message, output)
    keys = published_keys(s3_env, tmp_path)
    assert any(key.endswith("tunery-manifest.json") and "/checkpoints/" not in key for key in keys)
    revision = json.loads(config.read_text())["revision"]
    local = tmp_path / "published"
    s3 = s3_client(s3_env)
    prefix = f"out/{tmp_path.name}/{revision}/"
    for key in ("metrics.json", "model/config.json", "model/model.safetensors", "model/tokenizer.json"):
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(BUCKET, prefix + key, str(local / key))
    accuracy = json.loads((local / "metrics.json").read_text())["final"]["evalAccuracy"]
    baseline = untrained_accuracy(reviews(HELD_OUT))
    assert accuracy >= 0.8 and accuracy > baseline + 0.2, (accuracy, baseline)
    assert trained_accuracy(local / "model", reviews(HELD_OUT)) == pytest.approx(accuracy)


def untrained_accuracy(rows: list[dict[str, str]]) -> float:
    """The pretrained encoder with a fresh classification head, as training starts from it."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(42)
    return _accuracy(
        AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2), minilm_path(), rows
    )


def trained_accuracy(model_dir: Path, rows: list[dict[str, str]]) -> float:
    from transformers import AutoModelForSequenceClassification

    return _accuracy(AutoModelForSequenceClassification.from_pretrained(model_dir), model_dir, rows)


def _accuracy(model, tokenizer_dir: Path, rows: list[dict[str, str]]) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    labels = {"neg": 0, "pos": 1}
    model.eval()
    with torch.no_grad():
        inputs = tokenizer([row["review"] for row in rows], return_tensors="pt", padding=True)
        predicted = model(**inputs).logits.argmax(-1).tolist()
    return sum(p == labels[row["stars"]] for p, row in zip(predicted, rows, strict=True)) / len(rows)
