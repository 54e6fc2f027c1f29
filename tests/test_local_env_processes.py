"""hack/local-env's process records: `down` stops exactly the processes `up` started, never a reused pid."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from localenv import processes


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    (tmp_path / "logs").mkdir()
    return tmp_path


def test_stop_all_stops_what_it_started(state_dir: Path) -> None:
    pid = processes.start(state_dir, "sleeper", ["/bin/sleep", "60"])
    assert processes.running(state_dir) == {"sleeper": pid}
    assert processes.stop_all(state_dir) == ["sleeper"]
    time.sleep(0.2)
    assert processes.running(state_dir) == {}
    assert not Path(f"/proc/{pid}/cmdline").exists() or Path(f"/proc/{pid}/cmdline").read_bytes() == b""


def test_a_reused_pid_is_left_alone(state_dir: Path) -> None:
    stranger = subprocess.Popen(["/bin/sleep", "60"])
    try:
        (state_dir / processes.PIDS_FILE).write_text(
            f'{{"etcd": {{"pid": {stranger.pid}, "executable": "/opt/etcd"}}}}'
        )
        assert processes.running(state_dir) == {}
        assert processes.stop_all(state_dir) == []
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_process_that_dies_while_starting_is_reported_with_its_log(state_dir: Path) -> None:
    processes.start(state_dir, "failing", ["/bin/sh", "-c", "echo cannot bind port >&2; exit 3"])
    with pytest.raises(RuntimeError, match="failing exited while starting:\ncannot bind port"):
        processes.wait_http("http://127.0.0.1:9/", "failing", state_dir, timeout=10)


def test_status_reports_nothing_running_for_a_fresh_state_dir(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "hack" / "local-env"), "status", f"--state-dir={tmp_path}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "nothing running"
