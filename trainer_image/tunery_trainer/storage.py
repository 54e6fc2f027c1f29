"""Object storage for the trainer: fetch data and models, publish a directory with its manifest written last."""

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from tunery.api import contract
from tunery_trainer.redaction import redact

MANIFEST_NAME = "tunery-manifest.json"
_MIB = 1024 * 1024


class StorageError(Exception):
    """A storage problem the user must fix; `reason` is the CamelCase class reported in the FineTuneJob status."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = redact(message)
        super().__init__(self.message)


def download_from_hub(uri: str) -> Path:
    """A model snapshot named hf://NAME[@REVISION], from the Hugging Face Hub (where the network reaches it)."""
    from huggingface_hub import snapshot_download

    name, _, revision = uri.removeprefix("hf://").partition("@")
    try:
        return Path(snapshot_download(name, revision=revision or None))
    except Exception as error:  # noqa: BLE001 - the hub raises many kinds; all mean the same to the user
        raise StorageError(
            "ObjectMissing", f"{uri}: cannot download from the Hugging Face Hub ({error}): copy it to S3 instead"
        ) from error


@dataclass(frozen=True)
class Location:
    """A parsed storage URI: an S3 bucket and key, or a local directory (file://, or pvc:// under its mount)."""

    uri: str
    bucket: str | None
    key: str
    local: Path | None

    @property
    def is_prefix(self) -> bool:
        return self.uri.endswith("/")

    @classmethod
    def parse(cls, uri: str) -> "Location":
        scheme, _, rest = uri.partition("://")
        if scheme == "s3":
            bucket, _, key = rest.partition("/")
            return cls(uri, bucket, key, None)
        if scheme == "file":
            return cls(uri, None, "", Path(rest))
        if scheme == "pvc":
            claim, _, path = rest.partition("/")
            mount = Path(contract.PVC_MOUNT_ROOT) / claim
            local = Path(os.path.normpath(mount / path))
            if claim in ("", ".", "..") or not local.is_relative_to(mount):
                raise StorageError(
                    "UnsafePath", f"{uri}: leads outside the claim's mount {mount}: name a path inside it, without '..'"
                )
            return cls(uri, None, "", local)
        raise StorageError(
            "UnsupportedUri", f"{uri}: only s3://, file:// and pvc:// locations can be read or written here"
        )


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3: spec.storage, with credentials from the environment or the pod's identity."""

    endpoint: str | None = None
    region: str = "us-east-1"
    addressing: str = "auto"


_TRANSFER = TransferConfig(multipart_threshold=64 * _MIB, multipart_chunksize=64 * _MIB, max_concurrency=8)


class Storage:
    """Fetch and publish through boto3's transfer manager (multipart, parallel, retried with backoff)."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bytes_downloaded = 0
        self.bytes_uploaded = 0
        config = Config(
            region_name=settings.region,
            retries={"mode": "standard", "max_attempts": 5},
            s3={"addressing_style": settings.addressing},
        )
        # A session of its own: boto3's default session caches the credentials it resolved first.
        self.client = boto3.session.Session().client("s3", endpoint_url=settings.endpoint, config=config)

    def fetch(self, uri: str, destination: Path) -> list[Path]:
        """Copy a file, or every object under a prefix (URI ending in /), into `destination`; return the files."""
        location = Location.parse(uri)
        destination.mkdir(parents=True, exist_ok=True)
        if location.local is not None:
            return self._fetch_local(location, destination)
        with self._explained(location):
            if not location.is_prefix:
                name = Path(location.key).name
                return [self._download(location.bucket, location.key, _inside(destination, name, uri))]
            return [
                self._download(
                    location.bucket,
                    key,
                    _inside(destination, key[len(location.key) :], f"s3://{location.bucket}/{key}"),
                )
                for key in self._list(location)
            ]

    def fetch_published(self, uri: str, destination: Path) -> list[Path]:
        """Fetch a published directory's files and manifest, refusing a directory without one or a file that differs."""
        prefix = _as_prefix(uri)
        manifest = self.read_manifest(prefix)
        if manifest is None:
            raise StorageError(
                "ModelIncomplete",
                f"{prefix} has no {MANIFEST_NAME}: the upload was interrupted or never finished; publish it again",
            )
        location = Location.parse(prefix)
        files = []
        with self._explained(location):
            for entry in manifest["files"]:
                target = _inside(destination, entry["path"], prefix + entry["path"])
                if location.local is not None:
                    # Resolved: a link in the published directory must not lead the copy out of it.
                    source = _inside(location.local.resolve(), entry["path"], prefix + entry["path"]).resolve()
                    if not source.is_relative_to(location.local.resolve()):
                        raise _unsafe(prefix + entry["path"])
                    if source.is_file():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(source, target)
                else:
                    self._download(location.bucket, location.key + entry["path"], target)
                if not target.is_file() or _sha256(target) != entry["sha256"]:
                    raise StorageError(
                        "ModelIncomplete", f"{prefix}{entry['path']} is missing or differs from the manifest"
                    )
                files.append(target)
        # The copy describes itself like the original (what it holds, its task and labels).
        (destination / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        return files

    def children(self, uri: str) -> list[str]:
        """The URIs of the 'directories' directly under a prefix, sorted; none when the prefix does not exist."""
        location = Location.parse(_as_prefix(uri))
        if location.local is not None:
            if not location.local.is_dir():
                return []
            return sorted(f"{location.uri}{path.name}/" for path in location.local.iterdir() if path.is_dir())
        with self._explained(location):
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=location.bucket, Prefix=location.key, Delimiter="/")
            keys = [common["Prefix"] for page in pages for common in page.get("CommonPrefixes", [])]
        return sorted(f"s3://{location.bucket}/{key}" for key in keys)

    def delete(self, uri: str) -> None:
        """Remove a published directory, its manifest first so that it never looks complete while half deleted."""
        location = Location.parse(_as_prefix(uri))
        if location.local is not None:
            (location.local / MANIFEST_NAME).unlink(missing_ok=True)
            shutil.rmtree(location.local, ignore_errors=True)
            return
        with self._explained(location):
            self.client.delete_object(Bucket=location.bucket, Key=location.key + MANIFEST_NAME)
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=location.bucket, Prefix=location.key):
                objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if objects:
                    self.client.delete_objects(Bucket=location.bucket, Delete={"Objects": objects, "Quiet": True})

    def holds_files(self, uri: str) -> bool:
        """Whether anything but directory markers is stored under a prefix (deleting leaves empty ones on some stores)."""
        location = Location.parse(_as_prefix(uri))
        if location.local is not None:
            return location.local.is_dir() and any(path.is_file() for path in location.local.rglob("*"))
        with self._explained(location):
            listed = self.client.list_objects_v2(Bucket=location.bucket, Prefix=location.key, MaxKeys=10)
        return any(not item["Key"].endswith("/") for item in listed.get("Contents", []))

    def read_manifest(self, uri: str) -> dict[str, Any] | None:
        """The manifest of a published directory, or None when it has none (yet)."""
        location = Location.parse(_as_prefix(uri))
        if location.local is not None:
            path = location.local / MANIFEST_NAME
            return json.loads(path.read_text()) if path.is_file() else None
        with self._explained(location):
            try:
                body = self.client.get_object(Bucket=location.bucket, Key=location.key + MANIFEST_NAME)["Body"]
            except self.client.exceptions.NoSuchKey:
                return None
            return json.loads(body.read())

    def publish(self, source: Path, uri: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload every file under `source` below the prefix `uri`, then the manifest: present only when all is there."""
        location = Location.parse(_as_prefix(uri))
        files = sorted(path for path in source.rglob("*") if path.is_file() and path.name != MANIFEST_NAME)
        manifest = {
            "files": [
                {"path": str(path.relative_to(source)), "size": path.stat().st_size, "sha256": _sha256(path)}
                for path in files
            ],
            **(metadata or {}),
        }
        if location.local is not None:
            for path in files:
                target = location.local / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
            staging = location.local / (MANIFEST_NAME + ".partial")
            staging.write_text(json.dumps(manifest, indent=2))
            staging.replace(location.local / MANIFEST_NAME)
            return manifest
        with self._explained(location):
            for path in files:
                key = location.key + str(path.relative_to(source))
                self.client.upload_file(str(path), location.bucket, key, Config=_TRANSFER)
                self.bytes_uploaded += path.stat().st_size
            self.client.put_object(
                Bucket=location.bucket, Key=location.key + MANIFEST_NAME, Body=json.dumps(manifest, indent=2).encode()
            )
        return manifest

    def _download(self, bucket: str | None, key: str, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(bucket, key, str(target), Config=_TRANSFER)
        self.bytes_downloaded += target.stat().st_size
        return target

    def _list(self, location: Location) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        keys = [
            item["Key"]
            for page in paginator.paginate(Bucket=location.bucket, Prefix=location.key)
            for item in page.get("Contents", [])
            if not item["Key"].endswith("/")
        ]
        if not keys:
            raise StorageError("ObjectMissing", f"{location.uri}: nothing is stored under this prefix; check the URI")
        return sorted(keys)

    def _fetch_local(self, location: Location, destination: Path) -> list[Path]:
        source = location.local
        assert source is not None
        if source.is_file():
            target = destination / source.name
            shutil.copyfile(source, target)
            return [target]
        if not source.is_dir() or not any(source.iterdir()):
            raise StorageError("ObjectMissing", f"{location.uri}: no such file or directory, or it is empty")
        files = []
        root = source.resolve()
        for path in sorted(source.rglob("*")):
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                # On a pvc:// claim the tenant places links: one to the pod's token or another mount would copy it.
                raise StorageError(
                    "UnsafePath",
                    f"{location.uri}: {path.relative_to(source)} is a link to outside the directory: refusing to "
                    "follow it; put the file itself there",
                )
            if path.is_file():
                target = destination / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                files.append(target)
        return files

    @contextmanager
    def _explained(self, location: Location) -> Iterator[None]:
        """Turn botocore errors into StorageErrors that name the URI, what went wrong and the fix."""
        uri, endpoint = location.uri, self.settings.endpoint or "AWS S3"
        try:
            yield
        except NoCredentialsError as error:
            raise StorageError(
                "StorageCredentials",
                f"{uri}: no S3 credentials: set spec.storage.credentialsSecret, or give the pod an identity (IRSA)",
            ) from error
        except EndpointConnectionError as error:
            raise StorageError(
                "StorageUnreachable", f"{uri}: cannot reach {endpoint}: check spec.storage.endpoint"
            ) from error
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
                raise StorageError(
                    "StorageCredentials",
                    f"{uri}: {endpoint} refused the credentials ({code}): check the keys in the Secret named by "
                    "spec.storage.credentialsSecret, and that they may read and write this bucket",
                ) from error
            if code in ("NoSuchBucket", "NoSuchKey", "404", "NotFound"):
                if code == "NoSuchBucket" or not self._bucket_exists(location.bucket):
                    raise StorageError(
                        "BucketMissing",
                        f"{uri}: bucket {location.bucket} does not exist at {endpoint}: create it or fix the URI",
                    ) from error
                raise StorageError("ObjectMissing", f"{uri}: no such object; check the URI") from error
            raise

    def _bucket_exists(self, bucket: str | None) -> bool:
        """A missing object and a missing bucket both answer a HEAD with a bare 404; ask about the bucket."""
        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as error:
            return error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound")
        return True


def _inside(root: Path, relative: str, uri: str) -> Path:
    """root/relative, refused (naming the object's URI) when a hostile name with '..' or a leading '/' leaves root."""
    root = Path(os.path.normpath(root))
    target = Path(os.path.normpath(root / relative))
    if target == root or not target.is_relative_to(root):
        raise _unsafe(uri)
    return target


def _unsafe(uri: str) -> StorageError:
    return StorageError(
        "UnsafePath",
        f"{uri}: leads outside the directory it is fetched into (a name with '..' or a leading '/'): "
        "refusing it; remove or rename that object",
    )


def _as_prefix(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(4 * _MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()
