"""The trainer's side of the progress channel: rate-limited server-side applies of status.progress and status.metrics."""

import json
import logging
import math
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.api.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION
from tunery.api.status import Progress
from tunery_trainer.redaction import redact_all

FIELD_MANAGER = "tunery-trainer"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatusEndpoint:
    """Where and as whom the trainer writes its FineTuneJob's status."""

    server: str
    token: str
    ca_file: str | None
    namespace: str
    name: str

    @classmethod
    def in_cluster(cls, namespace: str, name: str) -> "StatusEndpoint":
        """The pod's ServiceAccount token, which may patch only this FineTuneJob's status."""
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        return cls(
            server=f"https://{host}:{port}",
            token=(SERVICE_ACCOUNT_DIR / "token").read_text().strip(),
            ca_file=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
            namespace=namespace,
            name=name,
        )

    @property
    def status_url(self) -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}/{self.name}/status"
        return f"{self.server}{path}?fieldManager={FIELD_MANAGER}&force=true"


def send_apply(endpoint: StatusEndpoint, body: dict[str, Any]) -> None:
    """One server-side apply of the status subresource."""
    request = urllib.request.Request(
        endpoint.status_url,
        data=json.dumps(body).encode(),
        method="PATCH",
        headers={"Authorization": f"Bearer {endpoint.token}", "Content-Type": "application/apply-patch+yaml"},
    )
    context = ssl.create_default_context(cafile=endpoint.ca_file)
    with urllib.request.urlopen(request, timeout=10, context=context):
        pass


class ProgressReporter:
    """Reports step, epoch, ETA, metrics and checkpoints at most every `min_interval_s`, and always when told it is final.

    Reporting never stops training: a failed report is logged and the next one tries again.
    """

    def __init__(
        self,
        endpoint: StatusEndpoint,
        min_interval_s: float = 15.0,
        send: Callable[[StatusEndpoint, dict[str, Any]], None] = send_apply,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._endpoint = endpoint
        self._min_interval_s = min_interval_s
        self._send = send
        self._clock = clock
        self._last_sent: float | None = None
        self._first: tuple[float, int] | None = None

    def report(
        self,
        step: int,
        total_steps: int,
        epoch: float,
        metrics: dict[str, float],
        final: bool = False,
        checkpoints: list[dict[str, Any]] | None = None,
    ) -> bool:
        now = self._clock()
        if self._first is None:
            self._first = (now, step)
        if not final and self._last_sent is not None and now - self._last_sent < self._min_interval_s:
            return False
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": self._endpoint.name, "namespace": self._endpoint.namespace},
            "status": {
                "progress": self._progress(now, step, total_steps, epoch).model_dump(by_alias=True, exclude_none=True),
                # JSON has no NaN or infinity; a diverged loss is left out rather than breaking the report.
                "metrics": {key: value for key, value in metrics.items() if math.isfinite(value)},
            },
        }
        if checkpoints:
            body["status"]["checkpoints"] = checkpoints
        try:
            self._send(self._endpoint, redact_all(body))
        except (urllib.error.URLError, OSError) as exc:
            logger.warning("could not report progress to the FineTuneJob status: %s", exc)
            return False
        self._last_sent = now
        return True

    def _progress(self, now: float, step: int, total_steps: int, epoch: float) -> Progress:
        percent = min(100, int(100 * step / total_steps)) if total_steps > 0 else 0
        eta = None
        started, first_step = self._first or (now, step)
        if step > first_step and now > started and total_steps >= step:
            seconds_per_step = (now - started) / (step - first_step)
            eta = int(seconds_per_step * (total_steps - step))
        return Progress.model_validate(
            {"step": step, "totalSteps": total_steps, "epoch": round(epoch, 4), "percent": percent, "etaSeconds": eta}
        )
