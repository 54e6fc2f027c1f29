"""Storage on local paths (file://, pvc://): fetch, publish with the manifest last, and refusing incomplete uploads."""

import json
from pathlib import Path

import pytest

from tunery_trainer.checkpoints import Owner, stored
from tunery_trainer.storage import MANIFEST_NAME, Location, S3Settings, Storage, StorageError, download_from_hub


@pytest.fixture
def storage() -> Storage:
    return Storage(S3Settings())


def model_dir(root: Path) -> Path:
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 1000)
    (root / "config.json").write_text('{"model_type": "llama"}')
    return root


def test_locations() -> None:
    assert Location.parse("s3://models/out/run/") == Location("s3://models/out/run/", "models", "out/run/", None)
    assert Location.parse("pvc://model-store/bert").local == Path("/mnt/pvc/model-store/bert")
    assert Location.parse("file:///data/train.jsonl").local == Path("/data/train.jsonl")
    with pytest.raises(StorageError, match="only s3://, file:// and pvc://"):
        Location.parse("hf://org/name")


def test_publish_then_fetch_published(storage: Storage, tmp_path: Path) -> None:
    source = model_dir(tmp_path / "model")
    manifest = storage.publish(source, f"file://{tmp_path}/published/", {"revision": "1234abcd"})
    assert [entry["path"] for entry in manifest["files"]] == ["adapter/adapter_model.safetensors", "config.json"]
    assert (tmp_path / "published" / MANIFEST_NAME).is_file()
    fetched = storage.fetch_published(f"file://{tmp_path}/published/", tmp_path / "fetched")
    assert sorted(path.relative_to(tmp_path / "fetched").as_posix() for path in fetched) == [
        "adapter/adapter_model.safetensors",
        "config.json",
    ]


def test_an_upload_without_manifest_is_not_a_model(storage: Storage, tmp_path: Path) -> None:
    half = model_dir(tmp_path / "half")
    with pytest.raises(StorageError) as refused:
        storage.fetch_published(f"file://{half}/", tmp_path / "fetched")
    assert refused.value.reason == "ModelIncomplete" and "interrupted" in refused.value.message


def test_a_file_that_differs_from_the_manifest_is_refused(storage: Storage, tmp_path: Path) -> None:
    storage.publish(model_dir(tmp_path / "model"), f"file://{tmp_path}/published/")
    (tmp_path / "published" / "config.json").write_text("{}")
    with pytest.raises(StorageError, match="config.json is missing or differs"):
        storage.fetch_published(f"file://{tmp_path}/published/", tmp_path / "fetched")


def test_missing_local_source(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageError) as missing:
        storage.fetch(f"file://{tmp_path}/nothing-here.jsonl", tmp_path / "out")
    assert missing.value.reason == "ObjectMissing"


def test_an_unreachable_hub_model_says_to_copy_it_to_s3(monkeypatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        StorageError, match=r"hf://nobody/no-model@main: cannot download .* copy it to S3 instead"
    ) as raised:
        download_from_hub("hf://nobody/no-model@main")
    assert raised.value.reason == "ObjectMissing"


@pytest.mark.parametrize("uri", ["pvc://claim/../other", "pvc://claim/a/../../..", "pvc://../etc", "pvc:///etc"])
def test_pvc_paths_cannot_leave_their_claim(uri: str) -> None:
    with pytest.raises(StorageError, match="outside") as refused:
        Location.parse(uri)
    assert refused.value.reason == "UnsafePath"


def test_a_published_manifest_cannot_write_or_read_outside(storage: Storage, tmp_path: Path) -> None:
    storage.publish(model_dir(tmp_path / "model"), f"file://{tmp_path}/published/")
    manifest_path = tmp_path / "published" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    (tmp_path / "outside.txt").write_text("not part of the model")
    for path in ("../outside.txt", str(tmp_path / "outside.txt")):
        manifest["files"] = [{"path": path, "size": 1, "sha256": "0" * 64}]
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(StorageError, match="outside") as refused:
            storage.fetch_published(f"file://{tmp_path}/published/", tmp_path / "fetched" / "deep")
        assert refused.value.reason == "UnsafePath" and path in refused.value.message


def test_links_out_of_a_local_source_are_not_followed(storage: Storage, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "token").write_text("the pod's token")
    source = model_dir(tmp_path / "model")
    (source / "adapter" / "inner-link.safetensors").symlink_to(source / "adapter" / "adapter_model.safetensors")
    (source / "token").symlink_to(secret / "token")
    with pytest.raises(StorageError, match="token.*outside") as refused:
        storage.fetch(f"file://{source}/", tmp_path / "fetched")
    assert refused.value.reason == "UnsafePath"
    (source / "token").unlink()
    (source / "secrets").symlink_to(secret)
    with pytest.raises(StorageError, match="secrets.*outside"):
        storage.fetch(f"file://{source}/", tmp_path / "fetched-again")
    (source / "secrets").unlink()
    fetched = storage.fetch(f"file://{source}/", tmp_path / "fetched-inside")
    assert (tmp_path / "fetched-inside" / "adapter" / "inner-link.safetensors").read_bytes() == b"\x00" * 1000
    assert len(fetched) == 3


@pytest.mark.parametrize("name", ["../../escaped.txt", "/escaped.txt"])
def test_an_s3_key_that_climbs_out_of_the_prefix_is_refused(tmp_path: Path, name: str) -> None:
    """AWS S3 stores such keys (SeaweedFS does not): the listing is botocore's stub, nothing is downloaded."""
    from botocore.stub import Stubber

    storage = Storage(S3Settings(endpoint="http://127.0.0.1:9"))
    with Stubber(storage.client) as stub:
        listing = {
            "Contents": [{"Key": f"models/{name}", "Size": 1}, {"Key": "models/ok.txt", "Size": 1}],
            "KeyCount": 2,
        }
        stub.add_response("list_objects_v2", listing, {"Bucket": "bucket", "Prefix": "models/"})
        with pytest.raises(StorageError, match="outside") as refused:
            storage.fetch("s3://bucket/models/", tmp_path / "a" / "b" / "fetched")
    assert refused.value.reason == "UnsafePath" and f"models/{name}" in refused.value.message
    assert not list(tmp_path.rglob("*.txt"))


def test_empty_checkpoint_prefixes_are_skipped_quietly(storage: Storage, tmp_path: Path, caplog) -> None:
    """Deleting a checkpoint leaves an empty prefix on some stores: not a half-written checkpoint to report."""
    root = tmp_path / "checkpoints"
    (root / "step-00000003").mkdir(parents=True)
    (root / "step-00000006").mkdir()
    (root / "step-00000006" / "trainable.safetensors").write_bytes(b"half")
    caplog.set_level("INFO", logger="tunery_trainer.checkpoints")
    assert stored(storage, f"file://{root}/", "rev", Owner("uid-1")) == []
    assert "step-00000006" in caplog.text and "step-00000003" not in caplog.text


def test_settings_from_the_environment_the_operator_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_ENDPOINT_URL_S3 and AWS_REGION as render.storage_env sets them; path-style only by default, for an endpoint."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    assert S3Settings.from_env() == S3Settings(None, "us-east-1", "auto")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://seaweedfs:8333")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert S3Settings.from_env() == S3Settings("http://seaweedfs:8333", "eu-west-3", "path")
    assert S3Settings.from_env("virtual", retry_seconds=0) == S3Settings(
        "http://seaweedfs:8333", "eu-west-3", "virtual", 0
    )
