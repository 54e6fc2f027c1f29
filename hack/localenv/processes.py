"""Start background processes, record them in the state directory, and stop exactly those later."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

PIDS_FILE = "processes.json"


def free_port(also_free_at: int = 0) -> int:
    """A free loopback port (in a range where port + also_free_at is a valid free port too)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if also_free_at == 0:
            return port
        if port + also_free_at < 65536 and _is_free(port + also_free_at):
            return port
    raise RuntimeError("no free port pair found")


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start(state_dir: Path, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Start `argv` detached from this process, logging to NAME.log; record it for `stop_all`."""
    log = open(state_dir / "logs" / f"{name}.log", "ab")
    process = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
    )
    record = {"pid": process.pid, "executable": argv[0]}
    records = _records(state_dir)
    records[name] = record
    (state_dir / PIDS_FILE).write_text(json.dumps(records, indent=2))
    # Popen returns while the kernel may still be loading a large binary; /proc/PID/cmdline is empty until then.
    deadline = time.monotonic() + 10
    while not _is_ours(record) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return process.pid


def running(state_dir: Path) -> dict[str, int]:
    """The recorded processes that are still alive and still the executable we started."""
    return {name: record["pid"] for name, record in _records(state_dir).items() if _is_ours(record)}


def stop_all(state_dir: Path, timeout: float = 15.0) -> list[str]:
    """Stop the processes this state directory started (newest first), and only those."""
    records = _records(state_dir)
    stopped = []
    for name, record in reversed(list(records.items())):
        if _is_ours(record):
            os.killpg(record["pid"], signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _is_ours(record) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _is_ours(record):
                os.killpg(record["pid"], signal.SIGKILL)
            stopped.append(name)
    (state_dir / PIDS_FILE).unlink(missing_ok=True)
    return stopped


def wait_http(
    url: str, name: str, state_dir: Path, timeout: float = 120.0, headers: dict | None = None, context=None
) -> None:
    """Wait until `url` answers 200, failing early (with the log's tail) if the process died."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers=headers or {})
    while time.monotonic() < deadline:
        if name not in running(state_dir):
            raise RuntimeError(f"{name} exited while starting:\n{tail(state_dir, name)}")
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{name} did not become ready at {url} within {timeout:.0f}s:\n{tail(state_dir, name)}")


def tail(state_dir: Path, name: str, lines: int = 30) -> str:
    path = state_dir / "logs" / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def _records(state_dir: Path) -> dict[str, dict]:
    path = state_dir / PIDS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _is_ours(record: dict) -> bool:
    """True when the pid runs the executable we recorded: pids get reused, and a zombie's cmdline is empty."""
    try:
        cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return cmdline == record["executable"]
