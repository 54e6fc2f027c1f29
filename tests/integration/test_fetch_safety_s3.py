"""A published manifest from SeaweedFS whose paths climb out (`..`, a leading `/`) writes nothing outside the target.

SeaweedFS itself refuses object keys with `..` and folds `//` (AWS S3 stores both): hostile keys under a prefix
are tested in test_storage_local.py with botocore's stubbed listing.
"""

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


@pytest.mark.parametrize("path", ["../escaped.txt", "/tmp/escaped.txt"])
def test_a_manifest_path_that_climbs_out_is_refused(storage: Storage, tmp_path: Path, path: str) -> None:
    prefix = f"hostile-manifest-{len(path)}/"
    storage.client.put_object(Bucket=BUCKET, Key=prefix + "escaped.txt", Body=b"planted")
    manifest = {"files": [{"path": path, "size": 7, "sha256": "0" * 64}]}
    storage.client.put_object(Bucket=BUCKET, Key=prefix + MANIFEST_NAME, Body=json.dumps(manifest).encode())
    with pytest.raises(StorageError, match="outside") as refused:
        storage.fetch_published(f"s3://{BUCKET}/{prefix}", tmp_path / "a" / "fetched")
    assert refused.value.reason == "UnsafePath" and path in refused.value.message
    assert not list(tmp_path.rglob("escaped.txt")) and not Path("/tmp/escaped.txt").exists()
