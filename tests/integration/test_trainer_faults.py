"""Storage and disk faults end the real trainer with a reason, the right exit code and no traceback (SeaweedFS, tmpfs)."""

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
from fault_proxy import FaultyProxy
from tiny_models import decoder, sentences

from tunery.api import contract
from tunery.api.spec import FineTuneJobSpec
from tunery.controller import naming
from tunery.controller.render import TrainingTarget, render_config_map

pytestmark = pytest.mark.integration

BUCKET = "trainer-faults"


def s3_client(s3_env: dict):
    return boto3.client(
        "s3",
        endpoint_url=s3_env["TUNERY_S3_ENDPOINT"],
        aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


@pytest.fixture(scope="module")
def bucket(s3_env, tmp_path_factory) -> str:
    s3 = s3_client(s3_env)
    s3.create_bucket(Bucket=BUCKET)
    rows = "".join(json.dumps({"text": sentence}) + "\n" for sentence in sentences(40))
    s3.put_object(Bucket=BUCKET, Key="data/train.jsonl", Body=rows.encode())
    model = decoder(tmp_path_factory.mktemp("decoder"))
    for path in model.iterdir():
        s3.upload_file(str(path), BUCKET, f"models/decoder/{path.name}")
    return BUCKET


def trainer_config(tmp_path: Path, endpoint: str, retry_seconds: int = 300) -> Path:
    """A full fine-tune of the tiny decoder that checkpoints after its first step, rendered as the operator does."""
    spec = FineTuneJobSpec.model_validate(
        {
            "baseModel": {"uri": f"s3://{BUCKET}/models/decoder/"},
            "dataset": {"train": f"s3://{BUCKET}/data/train.jsonl", "maxLength": 32},
            "method": {"type": "full"},
            "hyperparameters": {"maxSteps": 2, "batchSize": 4},
            "checkpoints": {"everySteps": 1},
            "output": {"uri": f"s3://{BUCKET}/out/{tmp_path.name}/"},
            "serving": {"enabled": False},
            "storage": {"endpoint": endpoint, "addressing": "path", "retryTimeoutSeconds": retry_seconds},
        }
    )
    target = TrainingTarget("faults", "team-a", "uid-1", spec, naming.revision(spec), "trainer:test")
    path = tmp_path / contract.CONFIG_FILE
    path.write_text(render_config_map(target)["data"][contract.CONFIG_FILE])
    return path


def train(config: Path, workdir: Path, access_key: str, secret_key: str) -> tuple[int, str, dict | None]:
    termination = config.parent / "termination-log"
    env = {
        "PATH": str(Path(sys.executable).parent),
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_REGION": "us-east-1",
        "TUNERY_TERMINATION_MESSAGE_PATH": str(termination),
    }
    result = subprocess.run(
        ["tunery-trainer", "train", f"--config={config}", f"--workdir={workdir}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    message = json.loads(termination.read_text()) if termination.exists() else None
    return result.returncode, result.stderr, message


def published(s3_env: dict, tmp_path: Path) -> bool:
    listing = s3_client(s3_env).list_objects_v2(Bucket=BUCKET, Prefix=f"out/{tmp_path.name}/")
    return any(item["Key"].endswith("tunery-manifest.json") for item in listing.get("Contents", []))


@contextmanager
def full_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `path` (as root; skipped elsewhere): writes past it fail with ENOSPC."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_keys_fail_the_first_checkpoint_upload_for_good(s3_env, bucket, tmp_path) -> None:
    """AccessDenied arrives wrapped in boto3's S3UploadFailedError: a final reason naming the operation and URI."""
    config = trainer_config(tmp_path, s3_env["TUNERY_S3_ENDPOINT"])
    code, stderr, message = train(
        config,
        tmp_path / "work",
        s3_env["TUNERY_S3_READER_ACCESS_KEY_ID"],
        s3_env["TUNERY_S3_READER_SECRET_ACCESS_KEY"],
    )
    assert code == contract.EXIT_STORAGE_ERROR and code in contract.FINAL_EXIT_CODES, stderr
    assert message["reason"] == "StorageCredentials", message
    assert "AccessDenied" in message["message"] and "step-00000001/" in message["message"]
    assert any(operation in message["message"] for operation in ("PutObject", "CreateMultipartUpload"))
    assert "Traceback" not in stderr and not published(s3_env, tmp_path)


def test_a_store_answering_500_for_a_while_is_waited_out(s3_env, bucket, tmp_path) -> None:
    with FaultyProxy(s3_env["TUNERY_S3_ENDPOINT"]) as proxy:
        config = trainer_config(tmp_path, proxy.endpoint, retry_seconds=120)
        # Failing from the first request (the data fetch) for longer than botocore's own few retries.
        proxy.fail_for(8)
        code, stderr, message = train(
            config, tmp_path / "work", s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"]
        )
    assert code == 0 and message is None, stderr
    assert proxy.failed_requests > 3 and "HTTP 500" in stderr and "retrying in" in stderr
    assert published(s3_env, tmp_path)


def test_a_store_failing_past_the_retry_timeout_is_a_retryable_failure(s3_env, bucket, tmp_path) -> None:
    with FaultyProxy(s3_env["TUNERY_S3_ENDPOINT"]) as proxy:
        config = trainer_config(tmp_path, proxy.endpoint, retry_seconds=4)
        proxy.fail_for(math.inf)
        code, stderr, message = train(
            config, tmp_path / "work", s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"]
        )
    # Not final: the Job's backoffLimit retries it, resuming from the latest checkpoint.
    assert code == contract.EXIT_RETRYABLE and code not in contract.FINAL_EXIT_CODES
    assert message["reason"] == "StorageUnavailable", message
    assert (
        "answered HeadObject with HTTP 500: the store is failing" in message["message"]
        and "retryTimeoutSeconds" in message["message"]
    )
    assert "data/train.jsonl" in message["message"] and "Traceback" not in stderr


def test_a_disk_too_small_for_the_base_model_is_out_of_disk(s3_env, bucket, tmp_path) -> None:
    config = trainer_config(tmp_path, s3_env["TUNERY_S3_ENDPOINT"])
    with full_disk(tmp_path / "work", "64k") as workdir:
        code, stderr, message = train(config, workdir, s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"])
    assert code == contract.EXIT_OUT_OF_DISK and code in contract.FINAL_EXIT_CODES, stderr
    assert message["reason"] == "OutOfDisk", message
    text = message["message"]
    assert f"s3://{BUCKET}/models/decoder/" in text and str(workdir) in text and "it needs about" in text
    assert "ephemeralStorage" in text and "Traceback" not in stderr


def test_a_checkpoint_that_does_not_fit_is_out_of_disk(s3_env, bucket, tmp_path) -> None:
    """The model and data fit, the checkpoint (weights and optimiser state) does not: torch's failed write."""
    config = trainer_config(tmp_path, s3_env["TUNERY_S3_ENDPOINT"])
    with full_disk(tmp_path / "work", "400k") as workdir:
        code, stderr, message = train(config, workdir, s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"])
    assert code == contract.EXIT_OUT_OF_DISK, stderr
    assert message["reason"] == "OutOfDisk", message
    assert "checkpoint s3://" in message["message"] and "step-00000001/" in message["message"]
    assert str(workdir / "checkpoint") in message["message"] and "Traceback" not in stderr
    assert not published(s3_env, tmp_path)
