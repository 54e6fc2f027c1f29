"""The invalid manifests under tests/manifests/invalid, the ones the cluster refuses under tests/manifests/refused,
and what each must be rejected with."""

from dataclasses import dataclass
from pathlib import Path

INVALID_DIR = Path(__file__).resolve().parent / "manifests" / "invalid"
# Valid FineTuneJobs that the operator refuses in a cluster: local-only URIs and what the default policy forbids.
REFUSED_DIR = INVALID_DIR.parent / "refused"


@dataclass(frozen=True)
class InvalidCase:
    """An invalid manifest and the field path and message fragment expected for it."""

    path: Path
    field: str
    message: str
    rejected_by_api_server: bool


def load_cases(directory: Path = INVALID_DIR) -> list[InvalidCase]:
    cases = []
    for path in sorted(directory.glob("*.yaml")):
        header = dict(
            line[2:].split(": ", 1) for line in path.read_text().splitlines() if line.startswith("# ") and ": " in line
        )
        cases.append(
            InvalidCase(path, header["expect-path"], header["expect-message"], header["apiserver"] == "reject")
        )
    return cases
