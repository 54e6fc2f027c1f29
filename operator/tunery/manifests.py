"""Read Kubernetes manifests from YAML files (multi-document), telling unreadable files from bad content."""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class UnreadableManifest(Exception):
    """The file cannot be read or is not YAML."""


@dataclass(frozen=True)
class Document:
    """One YAML document of a file, with where it came from."""

    source: str
    index: int
    content: Any

    @property
    def label(self) -> str:
        kind = self.content.get("kind", "?") if isinstance(self.content, dict) else "?"
        metadata = self.content.get("metadata") if isinstance(self.content, dict) else None
        name = metadata.get("name", "?") if isinstance(metadata, dict) else "?"
        return f"{self.source} (document {self.index}, {kind} {name})"


def read_documents(source: str) -> list[Document]:
    """The non-empty documents of a YAML file, or of standard input for '-'."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableManifest(f"{source}: cannot read: {exc}") from exc
    try:
        contents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise UnreadableManifest(f"{source}: not valid YAML: {exc}") from exc
    return [Document(source, index, content) for index, content in enumerate(contents, start=1) if content is not None]
