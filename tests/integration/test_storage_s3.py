"""The trainer's storage against SeaweedFS: prefixes, the manifest, and clear errors for keys, buckets and objects."""

from pathlib import Path

import boto3
import pytest

from tunery_trainer.storage import MANIFEST_NAME, S3Settings, Storage, StorageError

pytestmark = pytest.mark.integration


@pytest.fixture
def storage(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Storage:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env["AWS_SECRET_ACCESS_KEY"])
    return Storage(S3Settings(endpoint=s3_env["TUNERY_S3_ENDPOINT"], addressing="path"))


@pytest.fixture
def bucket(storage: Storage) -> str:
    name = "trainer-storage"
    try:
        storage.client.create_bucket(Bucket=name)
    except storage.client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return name


def test_publish_and_fetch_a_prefix(storage: Storage, bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "model"
    (source / "shards").mkdir(parents=True)
    for index in range(3):
        (source / "shards" / f"part-{index}.bin").write_bytes(bytes([index]) * 2048)
    storage.publish(source, f"s3://{bucket}/runs/r1/")
    keys = [item["Key"] for item in storage.client.list_objects_v2(Bucket=bucket, Prefix="runs/r1/")["Contents"]]
    assert f"runs/r1/{MANIFEST_NAME}" in keys and len(keys) == 4
    fetched = storage.fetch_published(f"s3://{bucket}/runs/r1/", tmp_path / "fetched")
    assert sorted(path.name for path in fetched) == ["part-0.bin", "part-1.bin", "part-2.bin"]
    assert (tmp_path / "fetched" / "shards" / "part-2.bin").read_bytes() == bytes([2]) * 2048
    assert storage.bytes_uploaded == 3 * 2048 and storage.bytes_downloaded >= 3 * 2048


def test_a_half_written_upload_is_not_taken_for_a_model(storage: Storage, bucket: str, tmp_path: Path) -> None:
    storage.client.put_object(Bucket=bucket, Key="runs/half/model.safetensors", Body=b"partial")
    assert storage.read_manifest(f"s3://{bucket}/runs/half/") is None
    with pytest.raises(StorageError) as refused:
        storage.fetch_published(f"s3://{bucket}/runs/half/", tmp_path / "fetched")
    assert refused.value.reason == "ModelIncomplete"


def test_wrong_keys_are_named_with_the_fix(
    s3_env, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    wrong = Storage(S3Settings(endpoint=s3_env["TUNERY_S3_ENDPOINT"], addressing="path"))
    with pytest.raises(StorageError) as refused:
        wrong.fetch(f"s3://{bucket}/runs/r1/", tmp_path / "fetched")
    assert refused.value.reason == "StorageCredentials"
    assert (
        "spec.storage.credentialsSecret" in refused.value.message and f"s3://{bucket}/runs/r1/" in refused.value.message
    )


def test_missing_bucket_and_object(storage: Storage, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError) as no_bucket:
        storage.fetch("s3://no-such-bucket/train.jsonl", tmp_path / "a")
    assert no_bucket.value.reason == "BucketMissing" and "no-such-bucket" in no_bucket.value.message
    with pytest.raises(StorageError) as no_object:
        storage.fetch(f"s3://{bucket}/absent/train.jsonl", tmp_path / "b")
    assert no_object.value.reason == "ObjectMissing"
    with pytest.raises(StorageError) as empty_prefix:
        storage.fetch(f"s3://{bucket}/absent/", tmp_path / "c")
    assert empty_prefix.value.reason == "ObjectMissing"


def test_multipart_upload_of_a_large_file(storage: Storage, bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "big"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"\x01" * (70 * 1024 * 1024))
    storage.publish(source, f"s3://{bucket}/runs/big/")
    head = boto3.client("s3", endpoint_url=storage.settings.endpoint, region_name="us-east-1").head_object(
        Bucket=bucket, Key="runs/big/weights.bin"
    )
    assert head["ContentLength"] == 70 * 1024 * 1024 and "-" in head["ETag"], "expected a multipart upload"
