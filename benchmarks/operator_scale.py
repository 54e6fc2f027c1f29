"""Benchmark: N FineTuneJobs applied at once on the local control plane; latency from apply to Job and to Succeeded.

Baseline, measured in the same run on the same control plane: the same N training Jobs (as the operator
renders them) applied directly with kubectl, no operator. Prints a markdown table last and writes
operator_scale.json beside this script.

    .venv/bin/python benchmarks/operator_scale.py [--jobs 50]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "hack"))

from localenv import processes, tools  # noqa: E402
from tunery.api.spec import FineTuneJobSpec  # noqa: E402
from tunery.controller import naming  # noqa: E402
from tunery.controller.render import TrainingTarget, render_job  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class Cluster:
    def __init__(self, state_dir: Path) -> None:
        self.kubeconfig = state_dir / "kube" / "kubeconfig"
        self.kubectl_path = str(tools.bin_dir() / "kubectl")

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return subprocess.run(
            [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def example_spec() -> dict:
    return yaml.safe_load((REPO_ROOT / "examples" / "lora-sft-chat.yaml").read_text())["spec"]


def watch_until(
    cluster: Cluster, namespace: str, names: set[str], kind: str, done, started: float, timeout: float = 300
) -> dict[str, float]:
    """Poll every 100 ms; return the seconds from `started` at which each name first satisfied `done`."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(names) and time.monotonic() < deadline:
        items = json.loads(cluster.kubectl("get", kind, "-n", namespace, "-o", "json"))["items"]
        now = time.monotonic()
        for item in items:
            key = done(item)
            if key in names and key not in seen:
                seen[key] = now - started
        time.sleep(0.1)
    if len(seen) < len(names):
        raise RuntimeError(f"only {len(seen)} of {len(names)} {kind} got there in {timeout}s")
    return seen


def run_baseline(cluster: Cluster, count: int) -> dict[str, float]:
    namespace = "bench-baseline"
    cluster.kubectl("create", "namespace", namespace)
    spec = FineTuneJobSpec.model_validate(example_spec())
    jobs = []
    for index in range(count):
        target = TrainingTarget(
            f"ftj-{index:03d}",
            namespace,
            "00000000-0000-0000-0000-000000000000",
            spec,
            naming.revision(spec),
            "trainer:bench",
        )
        job = render_job(target)
        del job["metadata"]["ownerReferences"]
        jobs.append(job)
    started = time.monotonic()
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(jobs))
    applied = time.monotonic() - started
    succeeded = watch_until(
        cluster,
        namespace,
        {job["metadata"]["name"] for job in jobs},
        "jobs",
        lambda job: job["metadata"]["name"] if job.get("status", {}).get("succeeded") else None,
        started,
    )
    return {"apply_s": applied, "succeeded": list(succeeded.values())}


def run_operator(cluster: Cluster, count: int, state_dir: Path) -> dict[str, object]:
    namespace = "bench-operator"
    cluster.kubectl("create", "namespace", namespace)
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "TUNERY_NAMESPACES": namespace,
        "TUNERY_HEALTH_PORT": "0",
        "TUNERY_METRICS_PORT": "0",
    }
    log = open(state_dir / "operator.log", "wb")
    operator = subprocess.Popen(
        [str(Path(sys.executable).parent / "tunery"), "operator"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        time.sleep(3)
        manifests = [
            {
                "apiVersion": "tunery.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": f"ftj-{index:03d}", "namespace": namespace},
                "spec": example_spec(),
            }
            for index in range(count)
        ]
        started = time.monotonic()
        cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(manifests))
        applied = time.monotonic() - started
        names = {manifest["metadata"]["name"] for manifest in manifests}
        job_created = watch_until(
            cluster,
            namespace,
            names,
            "jobs",
            lambda job: job["metadata"]["labels"].get(naming.FINETUNEJOB_LABEL),
            started,
        )
        succeeded = watch_until(
            cluster,
            namespace,
            names,
            "finetunejobs.tunery.dev",
            lambda ftj: ftj["metadata"]["name"] if (ftj.get("status") or {}).get("phase") == "Succeeded" else None,
            started,
        )
        peak_rss_kib = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/{operator.pid}/status").read_text().splitlines()
                if line.startswith("VmHWM")
            )
        )
    finally:
        operator.terminate()
        operator.wait(timeout=30)
    return {
        "apply_s": applied,
        "job_created": list(job_created.values()),
        "succeeded": list(succeeded.values()),
        "peak_rss_mib": peak_rss_kib / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunery-bench-") as tmp:
        state_dir = Path(tmp)
        subprocess.run(
            [sys.executable, str(REPO_ROOT / "hack" / "local-env"), "up", "--only=kube", f"--state-dir={state_dir}"],
            check=True,
        )
        try:
            cluster = Cluster(state_dir)
            cluster.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds" / "tunery.dev_finetunejobs.yaml"))
            cluster.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.tunery.dev", "--timeout=60s")
            baseline = run_baseline(cluster, args.jobs)
            measured = run_operator(cluster, args.jobs, state_dir)
        finally:
            processes.stop_all(state_dir)
    rows = [
        ("apply→Job created p50 (s)", percentile(measured["job_created"], 0.5), None),
        ("apply→Job created p99 (s)", percentile(measured["job_created"], 0.99), None),
        ("apply→Succeeded p50 (s)", percentile(measured["succeeded"], 0.5), percentile(baseline["succeeded"], 0.5)),
        ("apply→Succeeded p99 (s)", percentile(measured["succeeded"], 0.99), percentile(baseline["succeeded"], 0.99)),
        ("kubectl apply of all (s)", measured["apply_s"], baseline["apply_s"]),
        ("operator peak RSS (MiB)", measured["peak_rss_mib"], None),
    ]
    result = {
        "jobs": args.jobs,
        "operator": {key: value for key, value in measured.items()},
        "baseline_direct_jobs": baseline,
        "summary": {name: {"operator": value, "baseline": base} for name, value, base in rows},
        "mean_job_created_s": statistics.mean(measured["job_created"]),
    }
    (Path(__file__).with_suffix(".json")).write_text(json.dumps(result, indent=2))
    print(f"\n{args.jobs} FineTuneJobs applied at once (baseline: the same Jobs applied directly, no operator)\n")
    print("| measure | operator | baseline | ratio |")
    print("|---|---|---|---|")
    for name, value, base in rows:
        ratio = f"{value / base:.2f}" if base else "-"
        print(f"| {name} | {value:.2f} | {f'{base:.2f}' if base is not None else '-'} | {ratio} |")


if __name__ == "__main__":
    main()
