"""The images, checked statically (no Docker engine here): pinned bases, non-root users, real entrypoints."""

import re
import tomllib
from pathlib import Path

import pytest

from conftest import REPO_ROOT

DOCKERFILES = [REPO_ROOT / "Dockerfile", REPO_ROOT / "trainer_image" / "Dockerfile"]


def instructions(path: Path) -> list[tuple[str, str]]:
    lines = [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_bases_are_pinned(path: Path) -> None:
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), re.M))
    bases = [value.split()[0] for kind, value in instructions(path) if kind == "FROM"]
    assert bases
    for base in bases:
        image = defaults.get(base.removeprefix("${").removesuffix("}"), base)
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), f"unpinned base {image}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_runs_as_non_root(path: Path) -> None:
    users = [value for kind, value in instructions(path) if kind == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("0", "root")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_entrypoint_is_a_console_script_of_the_package(path: Path) -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    [entrypoint] = [value for kind, value in instructions(path) if kind == "ENTRYPOINT"]
    assert entrypoint.strip('[]"') in scripts


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_no_secrets_baked_in(path: Path) -> None:
    text = path.read_text().upper()
    assert not re.search(r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|PASSWORD|TOKEN)\s*=", text)


def test_operator_image_installs_the_base_package_only() -> None:
    installs = [
        value for kind, value in instructions(REPO_ROOT / "Dockerfile") if kind == "RUN" and "pip install" in value
    ]
    assert installs and all("[" not in value and "torch" not in value for value in installs)
