"""`tunery-trainer fetch`, the serving init container: the published model, and its base when only an adapter was."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunery_trainer import cli
from tunery_trainer.storage import MANIFEST_NAME, S3Settings, Storage


def base_model(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "model.safetensors").write_bytes(b"\x01" * 64)
    return root


def publish(tmp_path: Path, name: str, layout: dict[str, str]) -> str:
    """A published directory holding only what `layout` names (adapter/, model/), on the file:// base."""
    local = tmp_path / "layout" / name
    for folder in layout.values():
        (local / folder).mkdir(parents=True)
        (local / folder / "weights.safetensors").write_bytes(b"\x02" * 32)
    uri = f"file://{tmp_path}/published/{name}/"
    metadata = {"task": "causal-lm", "baseModel": f"file://{tmp_path}/base", **layout}
    Storage(S3Settings()).publish(local, uri, metadata)
    return uri


def fetch(uri: str, dest: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunery_trainer", "fetch", f"--uri={uri}", f"--dest={dest}"],
        capture_output=True,
        text=True,
        env={**os.environ, "TUNERY_TERMINATION_MESSAGE_PATH": str(dest.parent / "termination.json")},
        timeout=120,
    )


def test_an_adapter_alone_comes_with_its_base_and_a_merged_model_without(tmp_path: Path) -> None:
    base = base_model(tmp_path / "base")
    adapter_only = publish(tmp_path, "adapter-only", {"adapter": "adapter/"})
    merged = publish(tmp_path, "merged", {"adapter": "adapter/", "model": "model/"})

    result = fetch(adapter_only, tmp_path / "served-adapter")
    assert result.returncode == 0, result.stderr
    served = tmp_path / "served-adapter"
    assert (served / MANIFEST_NAME).is_file() and (served / "adapter" / "weights.safetensors").is_file()
    assert (served / "base" / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    assert json.loads(result.stdout)["dest"] == str(served)

    result = fetch(merged, tmp_path / "served-merged")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "served-merged" / "model" / "weights.safetensors").is_file()
    assert not (tmp_path / "served-merged" / "base").exists()


def test_a_hub_base_is_copied_out_of_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub's snapshot is links into its blob cache: DEST/base gets the files themselves."""
    blobs = base_model(tmp_path / "blobs")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for blob in blobs.iterdir():
        (snapshot / blob.name).symlink_to(blob)
    monkeypatch.setattr(cli, "download_from_hub", {"hf://org/base": snapshot}.__getitem__)
    local = tmp_path / "layout"
    (local / "adapter").mkdir(parents=True)
    (local / "adapter" / "weights.safetensors").write_bytes(b"\x02" * 32)
    storage = Storage(S3Settings())
    uri = f"file://{tmp_path}/published/"
    storage.publish(local, uri, {"task": "causal-lm", "baseModel": "hf://org/base", "adapter": "adapter/"})

    cli._fetch_model(storage, uri, tmp_path / "served")
    copied = tmp_path / "served" / "base" / "model.safetensors"
    assert not copied.is_symlink() and copied.read_bytes() == (blobs / "model.safetensors").read_bytes()
