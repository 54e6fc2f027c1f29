"""Object storage for the trainer: fetch data and models, publish a directory with its manifest written last."""

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from tunery.api import contract
from tunery.api.spec import Dataset
from tunery.api.spec import Storage as StorageSpec
from tunery_trainer import disk
from tunery_trainer.data import SourceFiles
from tunery_trainer.redaction import redact

logger = logging.getLogger(__name__)

MANIFEST_NAME = "tunery-manifest.json"
_MIB = 1024 * 1024
# A store that cannot be reached or answers 5xx may be back in a moment: these are retried, then the Job retries.
RETRYABLE_REASONS = ("StorageUnreachable", "StorageUnavailable")
_FIRST_RETRY_DELAY = 1.0
_MAX_RETRY_DELAY = 60.0
_CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden")
_MISSING_CODES = ("NoSuchBucket", "NoSuchKey", "404", "NotFound")
_THROTTLING_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable")

T = TypeVar("T")


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
    retry_seconds: float = contract.STORAGE_RETRY_SECONDS
    """How long one operation retries an unreachable or failing store before it fails (spec.storage.retryTimeoutSeconds)."""

    @classmethod
    def from_spec(cls, storage: StorageSpec) -> "S3Settings":
        return cls(storage.endpoint, storage.region, storage.addressing, storage.retry_timeout_seconds)

    @classmethod
    def from_env(
        cls, addressing: str | None = None, retry_seconds: float = contract.STORAGE_RETRY_SECONDS
    ) -> "S3Settings":
        """S3 as the AWS variables describe it (the operator renders them from spec.storage: render.storage_env).

        addressing None is path-style for a custom endpoint (MinIO and SeaweedFS want it), else auto.
        """
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3")
        if addressing is None:
            addressing = "path" if endpoint else "auto"
        return cls(endpoint, os.environ.get("AWS_REGION", "us-east-1"), addressing, retry_seconds)


_TRANSFER = TransferConfig(multipart_threshold=64 * _MIB, multipart_chunksize=64 * _MIB, max_concurrency=8)


class Storage:
    """Fetch and publish through boto3's transfer manager (multipart, parallel), each operation retried with backoff."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bytes_downloaded = 0
        self.bytes_uploaded = 0
        config = Config(
            region_name=settings.region,
            # botocore's own retries ride out a blip; longer outages are retried by _call, for retry_seconds.
            retries={"mode": "standard", "max_attempts": 3},
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
        if not location.is_prefix:
            name = Path(location.key).name
            size = self._call(uri, lambda: self.client.head_object(Bucket=location.bucket, Key=location.key))
            objects = [(location.key, _inside(destination, name, uri), size["ContentLength"])]
        else:
            objects = [
                (key, _inside(destination, key[len(location.key) :], f"s3://{location.bucket}/{key}"), size)
                for key, size in self._list(location)
            ]
        with disk.writing(destination, uri, sum(size for _, _, size in objects)):
            return [self._download(location.bucket, key, target) for key, target, _ in objects]

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
        with disk.writing(destination, prefix, sum(entry.get("size", 0) for entry in manifest["files"])):
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

        def listing() -> list[str]:
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=location.bucket, Prefix=location.key, Delimiter="/")
            return [common["Prefix"] for page in pages for common in page.get("CommonPrefixes", [])]

        return sorted(f"s3://{location.bucket}/{key}" for key in self._call(location.uri, listing))

    def delete(self, uri: str) -> None:
        """Remove a published directory, its manifest first so that it never looks complete while half deleted."""
        location = Location.parse(_as_prefix(uri))
        if location.local is not None:
            (location.local / MANIFEST_NAME).unlink(missing_ok=True)
            shutil.rmtree(location.local, ignore_errors=True)
            return

        def delete_all() -> None:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=location.bucket, Prefix=location.key):
                objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if objects:
                    self.client.delete_objects(Bucket=location.bucket, Delete={"Objects": objects, "Quiet": True})

        manifest_key = location.key + MANIFEST_NAME
        self._call(
            location.uri + MANIFEST_NAME, lambda: self.client.delete_object(Bucket=location.bucket, Key=manifest_key)
        )
        self._call(location.uri, delete_all)

    def holds_files(self, uri: str) -> bool:
        """Whether anything but directory markers is stored under a prefix (deleting leaves empty ones on some stores)."""
        location = Location.parse(_as_prefix(uri))
        if location.local is not None:
            return location.local.is_dir() and any(path.is_file() for path in location.local.rglob("*"))
        listed = self._call(
            location.uri, lambda: self.client.list_objects_v2(Bucket=location.bucket, Prefix=location.key, MaxKeys=10)
        )
        return any(not item["Key"].endswith("/") for item in listed.get("Contents", []))

    def read_manifest(self, uri: str) -> dict[str, Any] | None:
        """The manifest of a published directory, or None when it has none (yet)."""
        location = Location.parse(_as_prefix(uri))
        if location.local is not None:
            path = location.local / MANIFEST_NAME
            return json.loads(path.read_text()) if path.is_file() else None

        def read() -> dict[str, Any] | None:
            try:
                body = self.client.get_object(Bucket=location.bucket, Key=location.key + MANIFEST_NAME)["Body"]
            except self.client.exceptions.NoSuchKey:
                return None
            return json.loads(body.read())

        return self._call(location.uri + MANIFEST_NAME, read)

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
            with disk.writing(location.local, location.uri, sum(entry["size"] for entry in manifest["files"])):
                for path in files:
                    target = location.local / path.relative_to(source)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
                staging = location.local / (MANIFEST_NAME + ".partial")
                staging.write_text(json.dumps(manifest, indent=2))
                staging.replace(location.local / MANIFEST_NAME)
            return manifest
        for path in files:
            key = location.key + str(path.relative_to(source))
            self._call(
                f"s3://{location.bucket}/{key}",
                lambda path=path, key=key: self.client.upload_file(str(path), location.bucket, key, Config=_TRANSFER),
            )
            self.bytes_uploaded += path.stat().st_size
        body = json.dumps(manifest, indent=2).encode()
        self._call(
            location.uri + MANIFEST_NAME,
            lambda: self.client.put_object(Bucket=location.bucket, Key=location.key + MANIFEST_NAME, Body=body),
        )
        return manifest

    def _download(self, bucket: str | None, key: str, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        self._call(
            f"s3://{bucket}/{key}", lambda: self.client.download_file(bucket, key, str(target), Config=_TRANSFER)
        )
        self.bytes_downloaded += target.stat().st_size
        return target

    def _list(self, location: Location) -> list[tuple[str, int]]:
        """The keys (and sizes) of the files under a prefix, sorted."""

        def listing() -> list[tuple[str, int]]:
            paginator = self.client.get_paginator("list_objects_v2")
            return [
                (item["Key"], item["Size"])
                for page in paginator.paginate(Bucket=location.bucket, Prefix=location.key)
                for item in page.get("Contents", [])
                if not item["Key"].endswith("/")
            ]

        objects = self._call(location.uri, listing)
        if not objects:
            raise StorageError("ObjectMissing", f"{location.uri}: nothing is stored under this prefix; check the URI")
        return sorted(objects)

    def _fetch_local(self, location: Location, destination: Path) -> list[Path]:
        source = location.local
        assert source is not None
        if source.is_file():
            target = destination / source.name
            with disk.writing(destination, location.uri, source.stat().st_size):
                shutil.copyfile(source, target)
            return [target]
        if not source.is_dir() or not any(source.iterdir()):
            raise StorageError("ObjectMissing", f"{location.uri}: no such file or directory, or it is empty")
        root = source.resolve()
        paths = sorted(source.rglob("*"))
        for path in paths:
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                # On a pvc:// claim the tenant places links: one to the pod's token or another mount would copy it.
                raise StorageError(
                    "UnsafePath",
                    f"{location.uri}: {path.relative_to(source)} is a link to outside the directory: refusing to "
                    "follow it; put the file itself there",
                )
        files = [path for path in paths if path.is_file()]
        targets = []
        with disk.writing(destination, location.uri, sum(path.stat().st_size for path in files)):
            for path in files:
                target = destination / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                targets.append(target)
        return targets

    def _call(self, uri: str, operation: Callable[[], T]) -> T:
        """One S3 operation on `uri`, its errors explained; an unreachable or failing store is retried with
        exponential backoff for settings.retry_seconds."""
        started, delay, retried = time.monotonic(), _FIRST_RETRY_DELAY, False
        while True:
            try:
                with self._explained(uri):
                    return operation()
            except StorageError as error:
                waited = time.monotonic() - started
                if error.reason not in RETRYABLE_REASONS:
                    raise
                if waited + delay > self.settings.retry_seconds:
                    if not retried:
                        raise
                    raise StorageError(
                        error.reason,
                        f"{error.message}; still failing after {waited:.0f} s of retries: raise "
                        "spec.storage.retryTimeoutSeconds to wait out longer outages",
                    ) from error
                logger.warning("%s; retrying in %.0f s", error.message, delay)
                time.sleep(delay)
                delay, retried = min(delay * 2, _MAX_RETRY_DELAY), True

    @contextmanager
    def _explained(self, uri: str) -> Iterator[None]:
        """Turn botocore errors into StorageErrors that name the URI, the operation, what went wrong and the fix."""
        try:
            yield
        except (
            ClientError,
            S3UploadFailedError,
            RetriesExceededError,
            NoCredentialsError,
            BotoConnectionError,
            HTTPClientError,
        ) as error:
            explained = self._explanation(uri, error)
            if explained is error:
                raise
            raise explained from error

    def _explanation(self, uri: str, error: Exception) -> StorageError | Exception:
        """The StorageError an S3 failure means, or the error itself when it means none we know."""
        endpoint = self.settings.endpoint or "AWS S3"
        # boto3 raises the transfer manager's ClientError and network errors wrapped; the cause says what happened.
        if isinstance(error, S3UploadFailedError) and isinstance(error.__context__, ClientError | HTTPClientError):
            error = error.__context__
        if isinstance(error, RetriesExceededError) and isinstance(error.last_exception, Exception):
            error = error.last_exception
        if isinstance(error, NoCredentialsError):
            return StorageError(
                "StorageCredentials",
                f"{uri}: no S3 credentials: set spec.storage.credentialsSecret, or give the pod an identity (IRSA)",
            )
        if isinstance(error, BotoConnectionError | HTTPClientError):
            return StorageError(
                "StorageUnreachable",
                f"{uri}: cannot reach {endpoint} ({type(error).__name__}): check spec.storage.endpoint",
            )
        if not isinstance(error, ClientError):
            return error
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        operation = error.operation_name
        if status >= 500 or code in _THROTTLING_CODES:
            # A HEAD's error has no body: its code is the bare status.
            answer = f"HTTP {status}" + (f" {code}" if code and code != str(status) else "")
            return StorageError(
                "StorageUnavailable",
                f"{uri}: {endpoint} answered {operation} with {answer}: the store is failing or overloaded",
            )
        if code in _CREDENTIAL_CODES:
            return StorageError(
                "StorageCredentials",
                f"{uri}: {endpoint} refused {operation} ({code}): check that the keys in the Secret named by "
                "spec.storage.credentialsSecret are current and may read and write this bucket",
            )
        if code in _MISSING_CODES:
            bucket = Location.parse(uri).bucket
            if code == "NoSuchBucket" or not self._bucket_exists(bucket):
                return StorageError(
                    "BucketMissing", f"{uri}: bucket {bucket} does not exist at {endpoint}: create it or fix the URI"
                )
            return StorageError("ObjectMissing", f"{uri}: no such object; check the URI")
        return error

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


def fetch_sources(storage: Storage, dataset: Dataset, directory: Path) -> list[SourceFiles]:
    """Each training source's files (the mixture's, or train's), fetched into a directory of its own."""
    return [
        SourceFiles(source.uri, source.weight, storage.fetch(source.uri, directory / f"train-{number}"))
        for number, source in enumerate(dataset.sources())
    ]
