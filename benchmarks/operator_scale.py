"""Benchmark: N FineTuneJobs applied at once on the local control plane (kwok); latency to Job and to Succeeded.

Baseline, measured in the same run on the same control plane just before: the same N training Jobs, with the
other children the operator renders for them (ServiceAccount, Role, RoleBinding, ConfigMap), applied directly,
no operator. Both phases use server-side apply, --batch FineTuneJobs (or their children) per kubectl call and
--apply-workers calls at a time, and time each object from the moment kubectl reports it applied; Jobs and
FineTuneJobs are followed with watches. The control plane gets one 8-GPU kwok node per 8 jobs (all can run at
once) and lifted client rate limits (`hack/local-env up --high-throughput`). Serving is switched off in the
spec: the baseline has no serving to compare with. API requests come from the API server's
apiserver_request_total, before and after each phase (every client's, so the operator's own share is the
operator phase's count less the baseline's).

Prints a markdown table last, with the issue's targets, and writes JSON (default: operator_scale.json beside
this script). To measure the committed operator while the working tree changes, run it from a worktree:

    git worktree add /tmp/bench-head HEAD
    .venv/bin/python benchmarks/operator_scale.py --jobs 1000 --tree /tmp/bench-head
"""

import argparse
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightkube
import yaml
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.batch_v1 import Job
from lightkube.types import OnErrorAction, OnErrorResult, on_error_retry

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "hack"))

from localenv import kube, processes, tools  # noqa: E402

TARGETS = {
    "apply→Job created p99 (s)": ("≤", 2.0),
    "FineTuneJobs/s sustained": ("≥", 50.0),
    "operator peak RSS (MiB)": ("≤", 300.0),
    "apply→Succeeded p99 / baseline": ("≤", 1.2),
}
FineTuneJob = create_namespaced_resource("tunery.dev", "v1alpha1", "FineTuneJob", "finetunejobs")
# The watches start in their threads; an event before they are established would be seen late (as the initial state).
WATCH_START_S = 1.0
REQUEST_LINE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class Cluster:
    def __init__(self, state_dir: Path) -> None:
        self.kubeconfig = state_dir / "kube" / "kubeconfig"
        self.kubectl_path = str(tools.bin_dir() / "kubectl")
        self.client = lightkube.Client(lightkube.KubeConfig.from_file(self.kubeconfig))

    def command(self, *args: str) -> list[str]:
        return [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args]

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return subprocess.run(self.command(*args), input=stdin, capture_output=True, text=True, check=True).stdout


class Watch:
    """A watch in the background: the time (monotonic seconds) at which each key was first seen done.

    `key_of(obj)` names the object an event is about, or None while it is not done. lightkube resumes the watch
    from the last resourceVersion when the API server closes it (a busy server drops slow watchers), which a
    `kubectl get --watch` does not: it exits quietly, and the events after that are lost.
    """

    def __init__(self, cluster: Cluster, resource, namespace: str, key_of) -> None:
        self.seen: dict[str, float] = {}
        self._stopped = threading.Event()
        self._events = cluster.client.watch(resource, namespace=namespace, server_timeout=30, on_error=self._on_error)
        self._key_of = key_of
        threading.Thread(target=self._read, daemon=True).start()

    def _on_error(self, error: Exception, count: int) -> OnErrorResult:
        return OnErrorResult(OnErrorAction.STOP) if self._stopped.is_set() else on_error_retry(error, count)

    def _read(self) -> None:
        for _, obj in self._events:
            if self._stopped.is_set():
                return
            key = self._key_of(obj)
            if key is not None and key not in self.seen:
                self.seen[key] = time.monotonic()

    def wait(self, keys: set[str], timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while not keys <= self.seen.keys() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._stopped.set()
        missing = keys - self.seen.keys()
        if missing:
            raise RuntimeError(f"{len(keys) - len(missing)} of {len(keys)} got there in {timeout:.0f}s")
        return {key: self.seen[key] for key in keys}


def apply_all(
    cluster: Cluster, groups: list[list[dict]], timed: str, batch: int, workers: int
) -> tuple[dict[str, float], float, float]:
    """Server-side apply `groups` of objects (one per FineTuneJob, in order), `batch` groups per kubectl call and
    `workers` calls at once, so that a Job is applied after its ServiceAccount.

    Returns when each object of resource `timed` (as kubectl names it, "job.batch") was reported applied, by name
    (monotonic seconds), when the apply started, and how long it took.
    """
    applied: dict[str, float] = {}

    def apply_batch(batch_groups: list[list[dict]]) -> None:
        process = subprocess.Popen(
            cluster.command("apply", "--server-side", "-f", "-"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        # JSON documents: YAML from PyYAML can leave a hash such as 123e45 unquoted, which kubectl reads as a number.
        process.stdin.write("\n---\n".join(json.dumps(document) for group in batch_groups for document in group))
        process.stdin.close()
        for line in process.stdout:
            # "job.batch/ftj-0001-abc serverside-applied"
            resource, name = line.split()[0].split("/", 1)
            if resource == timed:
                applied[name] = time.monotonic()
        if process.wait() != 0:
            raise RuntimeError(f"kubectl apply failed (exit {process.returncode}); its error is above")

    started = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(apply_batch, [groups[index : index + batch] for index in range(0, len(groups), batch)]))
    return applied, started, time.monotonic() - started


def request_counts(cluster: Cluster) -> Counter:
    """The API server's apiserver_request_total, summed by "VERB resource[/subresource]"."""
    counts: Counter = Counter()
    for line in cluster.kubectl("get", "--raw", "/metrics").splitlines():
        match = REQUEST_LINE.match(line)
        if match:
            labels = dict(LABEL.findall(match["labels"]))
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            counts[f"{labels.get('verb', '')} {resource}"] += float(match["value"])
    return counts


def phase_result(applied: dict[str, float], started: float, apply_s: float, done: dict[str, dict[str, float]]) -> dict:
    """Latencies of each object from its own apply, the apply rate, and completions per second over the run."""
    latencies = {stage: [times[name] - applied[name] for name in times] for stage, times in done.items()}
    finished = max(done["succeeded"].values()) - started
    result: dict = {"apply_s": apply_s, "applied_per_s": len(applied) / apply_s, "makespan_s": finished}
    result["completed_per_s"] = len(applied) / finished
    for stage, values in latencies.items():
        result[stage] = {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99), "all": sorted(values)}
    return result


def training_children(tree: Path, spec: dict, namespace: str, count: int) -> list[list[dict]]:
    """What the operator of `tree` applies for each of `count` FineTuneJobs (identity, ConfigMap, Job), unowned."""
    spec_module = importlib.import_module("tunery.api.spec")
    naming = importlib.import_module("tunery.controller.naming")
    render = importlib.import_module("tunery.controller.render")
    model = spec_module.FineTuneJobSpec.model_validate(spec)
    children = []
    for index in range(count):
        target = render.TrainingTarget(
            f"ftj-{index:04d}",
            namespace,
            "00000000-0000-0000-0000-000000000000",
            model,
            naming.revision(model),
            "trainer:bench",
        )
        group = render.render_training_children(target)
        for child in group:
            del child["metadata"]["ownerReferences"]
        children.append(group)
    return children


def run_baseline(cluster: Cluster, tree: Path, spec: dict, args: argparse.Namespace) -> dict:
    namespace = "bench-baseline"
    cluster.kubectl("create", "namespace", namespace)
    children = training_children(tree, spec, namespace, args.jobs)
    names = {child["metadata"]["name"] for group in children for child in group if child["kind"] == "Job"}
    succeeded = Watch(
        cluster, Job, namespace, lambda job: job.metadata.name if job.status and job.status.succeeded else None
    )
    time.sleep(WATCH_START_S)
    before = request_counts(cluster)
    applied, started, apply_s = apply_all(cluster, children, "job.batch", args.batch, args.apply_workers)
    done = {"succeeded": succeeded.wait(names, timeout(args))}
    requests = request_counts(cluster) - before
    return {**phase_result(applied, started, apply_s, done), "requests": dict(requests)}


def start_operator(cluster: Cluster, tree: Path, namespace: str, state_dir: Path) -> subprocess.Popen:
    """The operator of `tree`, watching `namespace`; returns once its health endpoint answers."""
    health_port = processes.free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(tree / "operator"),
        "KUBECONFIG": str(cluster.kubeconfig),
        "TUNERY_NAMESPACES": namespace,
        "TUNERY_HEALTH_PORT": str(health_port),
        "TUNERY_METRICS_PORT": "0",
    }
    log = open(state_dir / "operator.log", "wb")
    operator = subprocess.Popen(
        [sys.executable, "-c", "from tunery.cli import app; app()", "operator"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if operator.poll() is not None:
            raise RuntimeError(f"the operator exited ({operator.returncode}); see {state_dir / 'operator.log'}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=1)
            # Healthy means started; give its watches a moment to be established.
            time.sleep(2)
            return operator
        except OSError:
            time.sleep(0.2)
    stop(operator)
    raise RuntimeError("the operator's /healthz did not answer in 60s")


def stop(operator: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL if a busy operator has not shut down in 30 s (the measurements are taken by then)."""
    operator.terminate()
    try:
        operator.wait(timeout=30)
    except subprocess.TimeoutExpired:
        operator.kill()
        operator.wait()


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmHWM"))) / 1024


def run_operator(cluster: Cluster, tree: Path, spec: dict, args: argparse.Namespace, state_dir: Path) -> dict:
    namespace = "bench-operator"
    cluster.kubectl("create", "namespace", namespace)
    manifests = [
        {
            "apiVersion": "tunery.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": f"ftj-{index:04d}", "namespace": namespace},
            "spec": spec,
        }
        for index in range(args.jobs)
    ]
    names = {manifest["metadata"]["name"] for manifest in manifests}
    operator = start_operator(cluster, tree, namespace, state_dir)
    try:
        job_created = Watch(cluster, Job, namespace, lambda job: job.metadata.ownerReferences[0].name)
        succeeded = Watch(
            cluster,
            FineTuneJob,
            namespace,
            lambda ftj: ftj.metadata.name if (ftj.status or {}).get("phase") == "Succeeded" else None,
        )
        time.sleep(WATCH_START_S)
        before = request_counts(cluster)
        applied, started, apply_s = apply_all(
            cluster, [[manifest] for manifest in manifests], "finetunejob.tunery.dev", args.batch, args.apply_workers
        )
        done = {
            "job_created": job_created.wait(names, timeout(args)),
            "succeeded": succeeded.wait(names, timeout(args)),
        }
        requests = request_counts(cluster) - before
        rss = peak_rss_mib(operator.pid)
    finally:
        stop(operator)
    return {**phase_result(applied, started, apply_s, done), "peak_rss_mib": rss, "requests": dict(requests)}


def timeout(args: argparse.Namespace) -> float:
    return args.timeout_base + args.timeout_per_job * args.jobs


def per_object(requests: dict[str, float], count: int) -> dict[str, float]:
    return {key: round(value / count, 3) for key, value in sorted(requests.items()) if value}


def summary_rows(operator: dict, baseline: dict, jobs: int) -> list[tuple[str, float, float | None]]:
    extra = sum(operator["requests"].values()) - sum(baseline["requests"].values())
    return [
        ("apply→Job created p50 (s)", operator["job_created"]["p50"], None),
        ("apply→Job created p99 (s)", operator["job_created"]["p99"], None),
        ("apply→Succeeded p50 (s)", operator["succeeded"]["p50"], baseline["succeeded"]["p50"]),
        ("apply→Succeeded p99 (s)", operator["succeeded"]["p99"], baseline["succeeded"]["p99"]),
        ("apply→Succeeded p99 / baseline", operator["succeeded"]["p99"] / baseline["succeeded"]["p99"], None),
        ("FineTuneJobs/s sustained", operator["completed_per_s"], baseline["completed_per_s"]),
        ("last Succeeded after apply start (s)", operator["makespan_s"], baseline["makespan_s"]),
        ("FineTuneJobs (baseline: Jobs) applied per s", operator["applied_per_s"], baseline["applied_per_s"]),
        ("operator peak RSS (MiB)", operator["peak_rss_mib"], None),
        (
            "API requests per object",
            sum(operator["requests"].values()) / jobs,
            sum(baseline["requests"].values()) / jobs,
        ),
        ("API requests per FineTuneJob over baseline", extra / jobs, None),
    ]


def verdict(name: str, value: float) -> str:
    if name not in TARGETS:
        return "-"
    sign, bound = TARGETS[name]
    passed = value <= bound if sign == "≤" else value >= bound
    return f"{sign} {bound:g}: {'pass' if passed else 'FAIL'}"


def tree_revision(tree: Path) -> str:
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "operator"], capture_output=True, text=True
    ).stdout
    return head.strip() + (" (operator/ modified)" if dirty.strip() else "")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="FineTuneJobs (and baseline Jobs) to apply")
    parser.add_argument("--tree", type=Path, default=REPO_ROOT, help="checkout whose operator, CRD and example run")
    parser.add_argument("--batch", type=int, default=50, help="FineTuneJobs (or their Jobs) per kubectl call")
    parser.add_argument("--apply-workers", type=int, default=4, help="kubectl apply calls at once")
    parser.add_argument("--timeout-base", type=float, default=120, help="seconds every phase may take, plus ...")
    parser.add_argument("--timeout-per-job", type=float, default=0.5, help="... these seconds per job")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_suffix(".json"), help="JSON written here")
    args = parser.parse_args()
    if args.jobs < 1 or args.batch < 1 or args.apply_workers < 1:
        parser.error("--jobs, --batch and --apply-workers must be at least 1")
    args.tree = args.tree.resolve()
    if not (args.tree / "operator" / "tunery").is_dir():
        parser.error(f"--tree {args.tree} has no operator/tunery; pass a checkout of this repository")
    return args


def main() -> None:
    args = parse_args()
    # The baseline renders its Jobs with the same operator code that the operator phase runs.
    sys.path.insert(0, str(args.tree / "operator"))
    spec = yaml.safe_load((args.tree / "examples" / "lora-sft-chat.yaml").read_text())["spec"]
    spec["serving"] = {"enabled": False}
    gpu_nodes = math.ceil(args.jobs / kube.GPUS_PER_NODE)
    # Kept when the run fails, for the components' and the operator's logs.
    state_dir = Path(tempfile.mkdtemp(prefix="tunery-bench-"))
    up = [sys.executable, str(REPO_ROOT / "hack" / "local-env"), "up", "--only=kube", f"--state-dir={state_dir}"]
    try:
        subprocess.run([*up, f"--gpu-nodes={gpu_nodes}", "--high-throughput"], check=True)
        cluster = Cluster(state_dir)
        cluster.kubectl("apply", "--server-side", "-f", str(args.tree / "crds" / "tunery.dev_finetunejobs.yaml"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.tunery.dev", "--timeout=60s")
        baseline = run_baseline(cluster, args.tree, spec, args)
        measured = run_operator(cluster, args.tree, spec, args, state_dir)
    except BaseException:
        print(f"failed; the logs are kept in {state_dir}", file=sys.stderr)
        raise
    finally:
        processes.stop_all(state_dir)
    shutil.rmtree(state_dir)
    rows = summary_rows(measured, baseline, args.jobs)
    result = {
        "jobs": args.jobs,
        "gpu_nodes": gpu_nodes,
        "operator_tree": tree_revision(args.tree),
        "apply": {"batch": args.batch, "workers": args.apply_workers},
        "summary": {
            name: {"operator": value, "baseline": base, "target": verdict(name, value)} for name, value, base in rows
        },
        "requests_per_object": {
            "operator_phase": per_object(measured["requests"], args.jobs),
            "baseline_phase": per_object(baseline["requests"], args.jobs),
        },
        "operator": measured,
        "baseline_direct_jobs": baseline,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{args.jobs} FineTuneJobs applied at once on {gpu_nodes} kwok GPU nodes (baseline: the same Jobs, no operator)\n"
    )
    print("| measure | operator | baseline | ratio | target |")
    print("|---|---|---|---|---|")
    for name, value, base in rows:
        ratio = f"{value / base:.2f}" if base else "-"
        print(
            f"| {name} | {value:.2f} | {f'{base:.2f}' if base is not None else '-'} | {ratio} | {verdict(name, value)} |"
        )


if __name__ == "__main__":
    main()
