"""Object keys from SeaweedFS that climb out of the prefix (`..`, a leading `/`) are never written outside the target."""

import json
from pathlib import Path

import pytest

from tunery_trainer.storage import MANIFEST_NAME, S3Settings, Storage, StorageError

pytestmark = pytest.mark.integration

BUCKET = "fetch-safety"


@pytest.fixture
def storage(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Storage:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env["AWS_SECRET_ACCESS_KEY"])
    storage = Storage(S3Settings(endpoint=s3_env["TUNERY_S3_ENDPOINT"], addressing="path"))
    try:
        storage.client.create_bucket(Bucket=BUCKET)
    except storage.client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return storage


@pytest.mark.parametrize("name", ["../../escaped.txt", "/escaped.txt"])
def test_a_key_that_climbs_out_of_the_prefix_is_refused(storage: Storage, tmp_path: Path, name: str) -> None:
    prefix = f"hostile-{len(name)}/"
    storage.client.put_object(Bucket=BUCKET, Key=prefix + "ok.txt", Body=b"fine")
    storage.client.put_object(Bucket=BUCKET, Key=prefix + name, Body=b"planted")
    keys = [item["Key"] for item in storage.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    assert prefix + name in keys, f"SeaweedFS normalised the key: {keys}"
    destination = tmp_path / "a" / "b" / "fetched"
    with pytest.raises(StorageError, match="outside") as refused:
        storage.fetch(f"s3://{BUCKET}/{prefix}", destination)
    assert refused.value.reason == "UnsafePath" and name in refused.value.message
    assert not list(tmp_path.rglob("escaped.txt")) and not Path("/escaped.txt").exists()


def test_a_manifest_path_that_climbs_out_is_refused(storage: Storage, tmp_path: Path) -> None:
    prefix = "hostile-manifest/"
    storage.client.put_object(Bucket=BUCKET, Key=prefix + "../escaped.txt", Body=b"planted")
    manifest = {"files": [{"path": "../escaped.txt", "size": 7, "sha256": "0" * 64}]}
    storage.client.put_object(Bucket=BUCKET, Key=prefix + MANIFEST_NAME, Body=json.dumps(manifest).encode())
    with pytest.raises(StorageError, match="outside") as refused:
        storage.fetch_published(f"s3://{BUCKET}/{prefix}", tmp_path / "a" / "fetched")
    assert refused.value.reason == "UnsafePath"
    assert not list(tmp_path.rglob("escaped.txt"))
