"""A real Prometheus scrapes the operator, a trainer and the builtin server, with the chart's alert rules loaded:
every query of the dashboard and every alert expression evaluates, and those that should have data have it.

The scrape jobs mirror what the chart's ServiceMonitor and PodMonitor produce: job names tunery-operator,
tunery-trainer and tunery-serving, honor_labels for the operator alone (it labels its series by FineTuneJob), its
target in its release namespace, and the trainer and serving targets labelled with namespace and finetunejob (the
PodMonitor takes them from the pod, never from what the pod's code says). Targets come and go through file discovery the way pods do: a target appears when its process
starts (before it listens) and the trainer's disappears when it exits.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from monitoring_files import RULES, alert_rules, load_dashboard, query_panels, series_names
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import decoder, sentences, write_jsonl

from conftest import REPO_ROOT, Kube
from localenv.processes import free_port
from operator_harness import CRD_FILE, OperatorProcess, manifest, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BROKEN = REPO_ROOT / "tests" / "manifests" / "invalid" / "bad-target-modules.yaml"
TUNERY = str(Path(sys.executable).parent / "tunery")

NAMESPACE = "observability-e2e"
# The FineTuneJob that `tunery run` trains; the server serves its model under the same name.
TRAINED = "tiny-chat"
RELEASE_NAMESPACE = "tunery-system"
JOB_LABELS = {"namespace": NAMESPACE, "finetunejob": TRAINED}
# Grafana's $__rate_interval is max($__interval + scrape interval, 4 × scrape interval): 4s at the 1s scrape here.
VARIABLES = {"namespace": NAMESPACE, "finetunejob": TRAINED, "__rate_interval": "4s", "__interval": "1s"}

# Dashboard queries (panel title, refId) that may return nothing here, and why. Every other one must return a
# series with a finite value at some point of the run.
ALLOWED_EMPTY = {
    ("Reconciles and errors", "B"): "no reconciliation fails here: tunery_reconcile_errors_total has no series yet",
    ("GPU memory", "A"): "the trainer runs on CPU: it sets tunery_trainer_gpu_memory_bytes only with CUDA",
    ("S3 traffic", "A"): "the trainer reads and writes file:// storage: the S3 byte counters stay at 0",
    # kwok runs a training pod for a moment: the operator sees Pending, then Succeeded, and never observes a wait.
    ("Queue wait", "A"): "no job was seen in phase Running, so no queue wait was observed (the quantile is NaN)",
    ("Queue wait", "B"): "no job was seen in phase Running, so no queue wait was observed (the quantile is NaN)",
}
# Queries whose values may all be 0 here, and why (every other one must show a non-zero value at some point).
ZERO_OK = {
    ("GPUs in use", "A"): "the gauge counts GPUs of Running jobs, and no job was seen in phase Running",
}
# Alert expressions: "fires" must have data, "quiet" must have none (a series there would be a false alarm), and
# "either" is the reason either may happen.
ALERTS = {
    "TuneryFineTuneJobFailed": ("fires", "the invalid FineTuneJob is in phase Failed"),
    "TuneryOperatorDown": ("quiet", "the operator answered every scrape of the window"),
    "TuneryReconcileErrors": ("either", "no reconciliation should fail, but a conflict retried under load is fine"),
    "TuneryTrainingStalled": ("quiet", "steps come every few ms; before the first one the timestamp is 0"),
    "TuneryTrainingLossNotFinite": ("quiet", "the loss stays finite"),
    "TuneryServingDown": ("either", "the server's target exists before it listens: `for: 5m` absorbs the start"),
    "TuneryServingModelNotLoaded": ("either", "model_loaded is 0 while the model loads: `for: 15m` absorbs it"),
    "TuneryServingErrors": ("quiet", "no request fails with 5xx (the 404 is a client error)"),
}


class Prometheus:
    """Debian's Prometheus on loopback: 1s scrapes and rule evaluations, file-discovered targets, the chart's rules."""

    # job: honor_labels. Only the operator's own labels are honoured: workload pods may run tenant code.
    JOBS = {"tunery-operator": True, "tunery-trainer": False, "tunery-serving": False}

    def __init__(self, binary: Path, workdir: Path) -> None:
        self._binary = binary
        self._workdir = workdir
        self.url = f"http://127.0.0.1:{free_port()}"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        (self._workdir / "targets").mkdir()
        for job in self.JOBS:
            self.set_target(job, None)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": job,
                    "honor_labels": honor,
                    "file_sd_configs": [{"files": [str(self._targets(job))], "refresh_interval": "1s"}],
                }
                for job, honor in self.JOBS.items()
            ],
        }
        (self._workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._process = subprocess.Popen(
            [
                str(self._binary),
                f"--config.file={self._workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self._workdir / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=open(self._workdir / "prometheus.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not self._answers("/-/ready"):
            assert self._process.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.2)

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=30)

    def log(self) -> str:
        return (self._workdir / "prometheus.log").read_text(errors="replace")[-4000:]

    def _targets(self, job: str) -> Path:
        return self._workdir / "targets" / f"{job}.json"

    def set_target(self, job: str, port: int | None, labels: dict[str, str] | None = None) -> None:
        """Point `job` at a port (None: no target), written atomically so discovery never reads half a file."""
        groups = [{"targets": [f"127.0.0.1:{port}"], "labels": labels or {}}] if port else []
        staging = self._targets(job).with_suffix(".tmp")
        staging.write_text(json.dumps(groups))
        os.replace(staging, self._targets(job))

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def api(self, path: str, **params: str | float) -> dict:
        """The API's JSON answer, errors included (Prometheus answers a bad query with 400 and a JSON error)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read())

    def query_range(self, expr: str, start: float, end: float) -> dict:
        return self.api("query_range", query=expr, start=start, end=end, step=1)

    def wait_up(self, job: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            targets = self.api("targets", state="active")["data"]["activeTargets"]
            health = [target["health"] for target in targets if target["labels"]["job"] == job]
            if health == ["up"]:
                return
            assert time.monotonic() < deadline, f"{job} not up: {targets}\n{self.log()}"
            time.sleep(0.3)


@dataclass
class Observed:
    prometheus: Prometheus
    start: float
    end: float
    expositions: dict[str, str]
    trainer_log: str = field(repr=False)


def launch(argv: list[str], log: Path) -> subprocess.Popen:
    # A session of its own: `tunery run` starts the trainer as a child, and both must stop at the end.
    return subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


def fetch(url: str, body: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode() if body else None, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class MetricsRecorder(threading.Thread):
    """Keeps the trainer's latest /metrics text that has an evaluation in it: the process is gone by the checks."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self._url = f"http://127.0.0.1:{port}/metrics"
        self.text = ""
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                text = urllib.request.urlopen(self._url, timeout=5).read().decode()
                if re.search(r"^tunery_trainer_eval\{", text, re.M):
                    self.text = text
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.3)


def trainer_manifest(work: Path) -> Path:
    """Enough steps on the tiny decoder that Prometheus scrapes many of them (about 10 s of steps on a CPU)."""
    base = decoder(work / "base")
    data = write_jsonl(work / "train.jsonl", [{"text": text} for text in sentences(400)])
    path = work / "job.yaml"
    path.write_text(
        f"""apiVersion: tunery.dev/v1alpha1
kind: FineTuneJob
metadata: {{name: {TRAINED}, namespace: {NAMESPACE}}}
spec:
  baseModel: {{uri: "file://{base}/"}}
  dataset: {{train: "file://{data}", maxLength: 64, packing: false}}
  method: {{type: lora}}
  hyperparameters: {{maxSteps: 400, batchSize: 16, learningRate: 0.01}}
  evaluation: {{everySteps: 50, metrics: [loss, perplexity]}}
  checkpoints: {{everySteps: 100, keep: 1}}
  output: {{uri: "file://{work}/out/"}}
  resources: {{gpus: 0}}
"""
    )
    return path


def exercise_server(url: str) -> None:
    """Completions spread over a few scrapes (so rates are not zero), one streamed (time to first token), 404s, and
    a burst of concurrent ones."""
    completion = {"model": TRAINED, "prompt": "one apple is", "max_tokens": 8}
    for _ in range(4):
        status, body = fetch(f"{url}/v1/completions", completion)
        assert status == 200, body
        time.sleep(0.5)
    status, body = fetch(f"{url}/v1/completions", {**completion, "stream": True})
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]"), body
    time.sleep(0.5)
    # Two, a few scrapes apart: a series' first sample is its start, and only the second one makes a rate.
    for _ in range(2):
        assert fetch(f"{url}/v1/completions", {**completion, "model": "no-such-model"})[0] == 404
        time.sleep(1.5)
    assert fetch(f"{url}/v1/models")[0] == 200
    # One request lasts tens of ms, too short for a 1 s scrape to see it in flight; a burst queues for the model
    # and keeps tunery_server_in_flight_requests above 0 for a few seconds. As many as the server's default
    # --max-concurrent-requests (8), so that none is refused.
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(
            pool.map(lambda _: fetch(f"{url}/v1/completions", {**completion, "max_tokens": 150})[0], range(8))
        )
    assert statuses == [200] * 8


@pytest.fixture(scope="module")
def observed(kube: Kube, promtool: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    work = tmp_path_factory.mktemp("observability")
    prometheus = Prometheus(promtool.parent / "prometheus", work)
    operator_port, trainer_port, server_port, server_metrics_port = free_port(), free_port(), free_port(), free_port()
    operator = OperatorProcess(
        kube, work / "operator.log", NAMESPACE, TUNERY_METRICS_PORT=str(operator_port), TUNERY_HEALTH_PORT="0"
    )
    started: list[subprocess.Popen] = []
    prometheus.start()
    try:
        kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
        kube.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.tunery.dev", "--timeout=60s")
        kube.kubectl("create", "namespace", NAMESPACE, check=False)
        operator.start()
        # The ServiceMonitor's target is in the release namespace; honor_labels keeps the jobs' own namespace.
        prometheus.set_target("tunery-operator", operator_port, {"namespace": RELEASE_NAMESPACE})
        prometheus.wait_up("tunery-operator")
        # The window every query is checked over opens once the operator has been scraped.
        start = time.time()
        kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "observed-chat", NAMESPACE))
        kube.kubectl("apply", "-n", NAMESPACE, "-f", str(BROKEN))

        job = trainer_manifest(work)
        recorder = MetricsRecorder(trainer_port)
        recorder.start()
        trainer = launch([TUNERY, "run", str(job), f"--metrics-port={trainer_port}"], work / "trainer.log")
        started.append(trainer)
        prometheus.set_target("tunery-trainer", trainer_port, JOB_LABELS)
        prometheus.wait_up("tunery-trainer")
        for name, phase in (("observed-chat", "Succeeded"), ("bad-target-modules", "Failed")):
            wait_for(
                kube, operator, name, lambda status, phase=phase: status.get("phase") == phase, namespace=NAMESPACE
            )
        assert trainer.wait(timeout=240) == 0, (work / "trainer.log").read_text()[-3000:]
        recorder.done.set()
        prometheus.set_target("tunery-trainer", None)
        assert recorder.text, "never saw the trainer's metrics with an evaluation"

        # A second job takes the same phase transitions: counters that only appeared before now visibly increase.
        kube.kubectl("apply", "-f", "-", input=manifest("lora-sft-chat.yaml", "observed-again", NAMESPACE))
        wait_for(
            kube, operator, "observed-again", lambda status: status.get("phase") == "Succeeded", namespace=NAMESPACE
        )

        (published,) = (work / "out").iterdir()
        server = launch(
            [TUNERY, "serve", str(published), f"--port={server_port}", f"--metrics-port={server_metrics_port}"],
            work / "server.log",
        )
        started.append(server)
        # Scraped on its own port, as the serving pod's is: the API port has no /metrics.
        prometheus.set_target("tunery-serving", server_metrics_port, JOB_LABELS)
        server_url = f"http://127.0.0.1:{server_port}"
        deadline = time.monotonic() + 120
        while fetch_status(f"{server_url}/readyz") != 200:
            assert server.poll() is None and time.monotonic() < deadline, (work / "server.log").read_text()[-3000:]
            time.sleep(0.3)
        prometheus.wait_up("tunery-serving")
        exercise_server(server_url)
        # Two more scrapes and rule evaluations after the last request.
        time.sleep(3)
        expositions = {
            "operator": fetch(f"http://127.0.0.1:{operator_port}/metrics")[1].decode(),
            "trainer": recorder.text,
            "server": fetch(f"http://127.0.0.1:{server_metrics_port}/metrics")[1].decode(),
        }
        yield Observed(prometheus, start, time.time(), expositions, (work / "trainer.log").read_text())
    finally:
        for process in reversed(started):
            stop(process)
        operator.stop()
        prometheus.stop()


def fetch_status(url: str) -> int:
    try:
        return fetch(url)[0]
    except (urllib.error.URLError, ConnectionError, OSError):
        return 0


def concrete(expr: str) -> str:
    """The query Grafana sends: template variables replaced by the values this run has."""

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"unknown variable ${name} in {expr}"
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def finite_values(answer: dict) -> list[float]:
    return [
        float(value)
        for series in answer["data"]["result"]
        for _, value in series["values"]
        if math.isfinite(float(value))
    ]


def dashboard_targets() -> list[tuple[str, str, str]]:
    panels = query_panels(load_dashboard())
    return [(panel["title"], target["refId"], target["expr"]) for panel in panels for target in panel["targets"]]


def test_every_target_was_scraped_up(observed: Observed) -> None:
    answer = observed.prometheus.query_range("max by (job) (up)", observed.start, observed.end)
    up = {series["metric"]["job"]: max(float(v) for _, v in series["values"]) for series in answer["data"]["result"]}
    assert up == {"tunery-operator": 1.0, "tunery-trainer": 1.0, "tunery-serving": 1.0}


def test_the_trainer_was_scraped_many_times_while_it_stepped(observed: Observed) -> None:
    answer = observed.prometheus.query_range(
        f'tunery_trainer_step{{finetunejob="{TRAINED}"}}', observed.start, observed.end
    )
    steps = {float(value) for series in answer["data"]["result"] for _, value in series["values"]}
    assert len(steps - {0.0}) >= 3, f"steps seen: {sorted(steps)}\n{observed.trainer_log[-2000:]}"
    # The time before the first step, when TuneryTrainingStalled must not take the 0 timestamp for a stall, was
    # scraped too.
    before_first_step = observed.prometheus.query_range(
        f'tunery_trainer_last_step_timestamp_seconds{{finetunejob="{TRAINED}"}} == 0', observed.start, observed.end
    )
    assert before_first_step["data"]["result"]


def test_every_dashboard_query_is_valid_and_shows_data(observed: Observed) -> None:
    empty, zero, problems = [], [], []
    for title, ref, expr in dashboard_targets():
        answer = observed.prometheus.query_range(concrete(expr), observed.start, observed.end)
        if answer["status"] != "success":
            problems.append(f"{title} {ref}: {answer.get('error')}: {concrete(expr)}")
        elif not finite_values(answer):
            empty.append((title, ref))
        elif not any(finite_values(answer)):
            zero.append((title, ref))
    assert not problems, "\n".join(problems)
    unexpected = [key for key in empty if key not in ALLOWED_EMPTY]
    assert not unexpected, f"no data for {unexpected}"
    unexpected = [key for key in zero if key not in ZERO_OK and key not in ALLOWED_EMPTY]
    assert not unexpected, f"only zeros for {unexpected}"
    # Every allowance names a query the dashboard still has.
    assert set(ALLOWED_EMPTY) | set(ZERO_OK) <= {(title, ref) for title, ref, _ in dashboard_targets()}


def test_dashboard_variables_list_this_run(observed: Observed) -> None:
    variables = {item["name"]: item for item in load_dashboard()["templating"]["list"]}
    for name, expected in (("namespace", NAMESPACE), ("finetunejob", TRAINED)):
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", concrete(variables[name]["query"]))
        assert match and match.group(2) == name
        answer = observed.prometheus.api(
            "series", **{"match[]": match.group(1)}, start=observed.start, end=observed.end
        )
        assert answer["status"] == "success", answer
        assert expected in {series.get(name) for series in answer["data"]}, answer["data"]


def test_every_alert_expression_is_valid_and_quiet_or_firing_as_expected(observed: Observed) -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == set(ALERTS)
    for rule in rules:
        answer = observed.prometheus.query_range(rule["expr"], observed.start, observed.end)
        assert answer["status"] == "success", (rule["alert"], answer)
        expectation, reason = ALERTS[rule["alert"]]
        has_data = bool(answer["data"]["result"])
        if expectation == "fires":
            assert has_data, f"{rule['alert']} should have data: {reason}"
        elif expectation == "quiet":
            assert not has_data, f"{rule['alert']} would be a false alarm: {answer['data']['result'][:3]}"


def test_prometheus_evaluates_the_rules_file_and_fires_only_the_failed_job_alert(observed: Observed) -> None:
    groups = observed.prometheus.api("rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == set(ALERTS)
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = observed.prometheus.query_range('ALERTS{alertstate="firing"}', observed.start, observed.end)
    fired = {(series["metric"]["alertname"], series["metric"].get("namespace")) for series in firing["data"]["result"]}
    assert fired == {("TuneryFineTuneJobFailed", NAMESPACE)}


def test_promtool_accepts_the_rules_file(promtool: Path) -> None:
    result = subprocess.run([str(promtool), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("process", ["operator", "trainer", "server"])
def test_promtool_accepts_each_exposition(observed: Observed, promtool: Path, process: str) -> None:
    text = observed.expositions[process]
    result = subprocess.run([str(promtool), "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_series_the_dashboard_and_rules_name_is_exposed(observed: Observed) -> None:
    """Names checked against the live expositions, which covers the queries allowed to be empty here."""
    exposed = {"up", "ALERTS"}
    for text in observed.expositions.values():
        exposed |= series_names(text_string_to_metric_families(text))
    expressions = [expr for _, _, expr in dashboard_targets()] + [rule["expr"] for rule in alert_rules()]
    named = {name for expr in expressions for name in re.findall(r"\btunery_[a-z0-9_]+\b", expr)}
    assert named - exposed == set()
