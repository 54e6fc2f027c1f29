"""Find a published model (s3://, file://, pvc:// or a local directory) and bring its files onto this disk."""

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery_trainer.storage import MANIFEST_NAME, Location, S3Settings, Storage, StorageError, download_from_hub

logger = logging.getLogger("tunery_server")
# The published layout (tunery_trainer.publishing, which imports the training stack: not imported here).
MODEL_DIR, ADAPTER_DIR = "model", "adapter"
_CLASSIFIERS = ("sequence-classification", "token-classification")
SERVABLE_TASKS = ("causal-lm", *_CLASSIFIERS)


class SourceError(Exception):
    """The URI does not lead to a servable published model; the message says why and what to do."""


@dataclass(frozen=True)
class Source:
    """A published model: its URI, its manifest, and where its files are (None for S3 until fetched)."""

    uri: str
    manifest: dict[str, Any]
    local: Path | None

    @property
    def default_name(self) -> str:
        """The manifest's name, or else the directory's name."""
        name = self.manifest.get("name")
        if name:
            return str(name)
        return Path(self.uri.rstrip("/").partition("://")[2] or self.uri.rstrip("/")).name or "model"


def storage_from_environment() -> Storage:
    """S3 as the AWS variables describe it; path-style addressing for a custom endpoint (MinIO, SeaweedFS)."""
    return Storage(S3Settings.from_env())


def locate(uri: str) -> Source:
    """Read the manifest (cheap, so done before the server starts): a bad URI fails the process at once."""
    source = _located(uri)
    task = source.manifest.get("task")
    if task not in SERVABLE_TASKS:
        what = f"a {task} model" if task else "a model of unknown task"
        raise SourceError(
            f"{uri} holds {what}: tunery serve serves causal-lm (completions, chat) and sequence- or "
            "token-classification (classify) models"
        )
    return source


def _located(uri: str) -> Source:
    if uri.startswith("s3://"):
        prefix = uri if uri.endswith("/") else uri + "/"
        try:
            manifest = storage_from_environment().read_manifest(prefix)
        except StorageError as error:
            raise SourceError(error.message) from error
        if manifest is None:
            raise SourceError(
                f"{prefix} has no {MANIFEST_NAME}: it is not a published tunery model, or its upload never finished"
            )
        return Source(prefix, manifest, None)
    directory = local_path(uri)
    manifest_path = directory / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            return Source(uri, json.loads(manifest_path.read_text()), directory)
        except (OSError, ValueError) as error:
            raise SourceError(f"{manifest_path}: unreadable manifest ({error})") from error
    what = "is not a directory" if not directory.is_dir() else f"has no {MANIFEST_NAME}"
    raise SourceError(
        f"{uri} {what}: give the URI of a published tunery model (the output of a FineTuneJob), "
        "or a directory fetched from one with `tunery-trainer fetch`"
    )


def local_path(uri: str) -> Path:
    """A file:// or pvc:// URI, or a plain path, as a local directory."""
    if "://" not in uri:
        return Path(uri)
    try:
        location = Location.parse(uri)
    except StorageError as error:
        raise SourceError(error.message) from error
    if location.local is None:
        raise SourceError(f"{uri}: only s3://, file://, pvc:// URIs and local paths can be served")
    return location.local


def materialize(source: Source, workdir: Path | None) -> Path:
    """The local directory holding the model: as is when local, else fetched (and checked) into workdir."""
    if source.local is not None:
        return source.local
    target = workdir or Path(tempfile.mkdtemp(prefix="tunery-serve-"))
    try:
        storage_from_environment().fetch_published(source.uri, target)
    except StorageError as error:
        raise SourceError(error.message) from error
    return target


def fetch_base_model(uri: str | None, directory: Path, workdir: Path) -> Path:
    """The base model an adapter applies to: beside it when `tunery-trainer fetch` put it there, else from its URI."""
    if (directory / "base").is_dir():
        return directory / "base"
    if not uri:
        raise SourceError("the manifest names no baseModel and has no model/ directory: nothing to load")
    if uri.startswith("hf://"):
        try:
            return download_from_hub(uri)
        except StorageError as error:
            raise SourceError(error.message) from error
    if not uri.startswith("s3://"):
        directory = local_path(uri)
        if not directory.is_dir():
            raise SourceError(f"the base model {uri} is not a directory on this machine")
        return directory
    target = workdir / "base-model"
    try:
        storage_from_environment().fetch(uri if uri.endswith("/") else uri + "/", target)
    except StorageError as error:
        raise SourceError(error.message) from error
    return target
