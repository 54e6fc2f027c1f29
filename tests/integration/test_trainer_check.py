"""`tunery-trainer check` as the training pod runs it: the config the operator renders, S3 keys as env, SeaweedFS."""

import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from tunery.api import contract
from tunery.api.spec import FineTuneJobSpec
from tunery.controller import naming
from tunery.controller.render import TrainingTarget, render_config_map

pytestmark = pytest.mark.integration

BUCKET = "trainer-check"


@pytest.fixture(scope="module")
def bucket(s3_env) -> str:
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_env["TUNERY_S3_ENDPOINT"],
        aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=BUCKET)
    rows = [{"review": f"review {index}", "stars": "pos" if index % 2 else "neg"} for index in range(40)]
    s3.put_object(
        Bucket=BUCKET, Key="reviews/train.jsonl", Body="".join(json.dumps(row) + "\n" for row in rows).encode()
    )
    s3.put_object(Bucket=BUCKET, Key="reviews/no-label.jsonl", Body=b'{"review": "x"}\n{"review": "y"}\n')
    return BUCKET


def rendered_config(tmp_path: Path, s3_env: dict, train: str) -> Path:
    """The trainer.json exactly as the operator puts it into the ConfigMap."""
    spec = FineTuneJobSpec.model_validate(
        {
            "baseModel": {"uri": "s3://models/minilm/"},
            "task": "sequence-classification",
            "dataset": {"train": train, "columns": {"text": "review", "label": "stars"}, "validationSplit": 0.25},
            "output": {"uri": f"s3://{BUCKET}/out/"},
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


def run_check(config: Path, s3_env: dict, tmp_path: Path, secret: str | None = None) -> tuple[int, str, dict | None]:
    termination = tmp_path / "termination-log"
    env = {
        "PATH": str(Path(sys.executable).parent),
        "AWS_ACCESS_KEY_ID": s3_env["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": secret or s3_env["AWS_SECRET_ACCESS_KEY"],
        "AWS_REGION": "us-east-1",
        "TUNERY_TERMINATION_MESSAGE_PATH": str(termination),
    }
    result = subprocess.run(
        ["tunery-trainer", "check", f"--config={config}"], capture_output=True, text=True, env=env, timeout=120
    )
    message = json.loads(termination.read_text()) if termination.exists() else None
    return result.returncode, result.stdout, message


def test_good_data_is_reported(s3_env, bucket, tmp_path) -> None:
    code, output, message = run_check(
        rendered_config(tmp_path, s3_env, f"s3://{bucket}/reviews/train.jsonl"), s3_env, tmp_path
    )
    assert code == 0 and message is None
    report = json.loads(output)
    assert report["trainExamples"] == 30 and report["validationExamples"] == 10 and report["labels"] == ["neg", "pos"]


def test_wrong_keys_exit_66_with_a_termination_message(s3_env, bucket, tmp_path) -> None:
    config = rendered_config(tmp_path, s3_env, f"s3://{bucket}/reviews/train.jsonl")
    code, _, message = run_check(config, s3_env, tmp_path, secret="wrong")
    assert code == contract.EXIT_STORAGE_ERROR
    assert message["reason"] == "StorageCredentials" and "spec.storage.credentialsSecret" in message["message"]


def test_missing_bucket_exit_66(s3_env, bucket, tmp_path) -> None:
    code, _, message = run_check(rendered_config(tmp_path, s3_env, "s3://no-such-bucket/train.jsonl"), s3_env, tmp_path)
    assert code == contract.EXIT_STORAGE_ERROR and message["reason"] == "BucketMissing"


def test_missing_column_exit_65(s3_env, bucket, tmp_path) -> None:
    code, _, message = run_check(
        rendered_config(tmp_path, s3_env, f"s3://{bucket}/reviews/no-label.jsonl"), s3_env, tmp_path
    )
    assert code == contract.EXIT_DATA_ERROR and message["reason"] == "DataError"
    assert "no-label.jsonl" in message["message"] and "'stars'" in message["message"]


def test_unreadable_config_exit_64(s3_env, tmp_path) -> None:
    broken = tmp_path / "trainer.json"
    broken.write_text('{"kind": "TrainerConfig"}')
    code, _, message = run_check(broken, s3_env, tmp_path)
    assert (
        code == contract.EXIT_INVALID_CONFIG
        and message["reason"] == "InvalidConfig"
        and "finetuneJob" in message["message"]
    )
