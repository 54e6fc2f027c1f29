"""`tunery validate` and `tunery crd` as a user runs them: output, exit codes, no tracebacks."""

import subprocess
from pathlib import Path

import pytest

from conftest import EXAMPLES, REPO_ROOT
from invalid_cases import load_cases
from tunery.api.crd import render_crd_yaml


def tunery(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["tunery", *args], capture_output=True, text=True, env=env, input=stdin, cwd=REPO_ROOT)


def test_examples_validate(cli_env) -> None:
    result = tunery("validate", *map(str, EXAMPLES), env=cli_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("valid") == len(EXAMPLES)


def test_each_invalid_manifest_exits_1_with_its_field_path(cli_env) -> None:
    cases = load_cases()
    result = tunery("validate", *(str(case.path) for case in cases), env=cli_env)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    reports = result.stdout.split("✗ ")[1:]
    assert len(reports) == len(cases)
    for case, report in zip(cases, reports, strict=True):
        assert report.startswith(str(case.path)), report
        assert f"    {case.field}: " in report and case.message in report, report


def test_multi_document_with_other_kinds(tmp_path: Path, cli_env) -> None:
    bundle = tmp_path / "bundle.yaml"
    invalid = load_cases()[0].path.read_text()
    bundle.write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s3-creds}\nstringData: {AWS_ACCESS_KEY_ID: x}\n---\n"
        + EXAMPLES[0].read_text()
        + "\n---\n"
        + invalid
        + "\n---\n"
    )
    result = tunery("validate", str(bundle), env=cli_env)
    assert result.returncode == 1
    assert "document 1, Secret s3-creds): skipped" in result.stdout
    assert "(document 2, FineTuneJob" in result.stdout and ": valid" in result.stdout
    assert "(document 3, FineTuneJob" in result.stdout and "1 error" in result.stdout


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "cannot read"), ("spec: [unclosed\n", "not valid YAML"), ("a: b\n  c: d\n", "not valid YAML")],
)
def test_unreadable_exits_2(tmp_path: Path, cli_env, content, fragment) -> None:
    path = tmp_path / "manifest.yaml"
    if content is not None:
        path.write_text(content)
    result = tunery("validate", str(path), str(EXAMPLES[0]), env=cli_env)
    assert result.returncode == 2
    assert fragment in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_scalar_document_is_invalid_not_a_crash(tmp_path: Path, cli_env) -> None:
    path = tmp_path / "scalar.yaml"
    path.write_text("just a string\n")
    result = tunery("validate", str(path), env=cli_env)
    assert result.returncode == 1
    assert "expected a Kubernetes object" in result.stdout


def test_reads_stdin(cli_env) -> None:
    result = tunery("validate", "-", env=cli_env, stdin=EXAMPLES[0].read_text())
    assert result.returncode == 0, result.stdout


def test_crd_command_prints_the_generated_crd(cli_env) -> None:
    result = tunery("crd", env=cli_env)
    assert result.returncode == 0
    assert result.stdout == render_crd_yaml()
