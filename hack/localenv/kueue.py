"""Run the pinned Kueue out of cluster against the local control plane, its CRDs and webhooks registered on loopback."""

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import yaml

from localenv import processes, tools

MODULE = "sigs.k8s.io/kueue"
NAMESPACE = "kueue-system"
# Kueue derives the names of the webhook configurations it injects its CA into from the service name
# (kueue-webhook-service -> kueue-{mutating,validating}-webhook-configuration).
SERVICE = "kueue-webhook-service"
SECRET = "kueue-webhook-server-cert"
# The Secret's keys (what Kueue's certificate rotator reads) and the files under pki/ they hold.
SECRET_FILES = {"ca.crt": "ca.crt", "ca.key": "ca.key", "tls.crt": "webhook.crt", "tls.key": "webhook.key"}
WEBHOOK_CONFIGURATIONS = {
    "MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
    "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration",
}
# Only Kueue's own kinds and batch Jobs: the other integrations' webhooks would intercept kinds Kueue does not
# manage here (pods, Deployments) or that do not exist.
WEBHOOK_GROUPS = {"kueue.x-k8s.io", "batch"}
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PART_OF = "app.kubernetes.io/part-of"


def module_dir() -> Path:
    """Where the Go module cache holds the pinned Kueue source (downloaded if it is not there yet)."""
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly"}
    listed = subprocess.run(
        ["go", "mod", "download", "-json", MODULE],
        cwd=tools.TOOLS_DIR / "kueue",
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(json.loads(listed.stdout)["Dir"])


def up(state_dir: Path, bin_dir: Path, kubeconfig: Path, log=print, timeout: float = 120.0) -> None:
    """Register Kueue's CRDs and webhooks and start Kueue; return once its webhooks answer."""
    kueue_dir = state_dir / "kueue"
    kueue_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "logs").mkdir(exist_ok=True)
    pki = kueue_dir / "pki"
    pki.mkdir(exist_ok=True)
    _make_pki(pki)
    source = module_dir()
    ports = {name: processes.free_port() for name in ("webhook", "metrics", "health")}
    webhook_url = f"https://127.0.0.1:{ports['webhook']}"
    ca_bundle = base64.b64encode((pki / "ca.crt").read_bytes()).decode()
    kubectl = [str(bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}"]

    log("local-env: registering Kueue's CRDs and webhooks")
    _apply(kubectl, [_namespace(), _secret(pki)])
    _apply(kubectl, _crds(source, webhook_url, ca_bundle))
    _wait_established(kubectl, timeout)
    _apply(kubectl, _webhook_configurations(source, webhook_url, ca_bundle))

    # In a cluster the Secret is mounted as the certificate directory; Kueue waits for the files there.
    cert_dir = kueue_dir / "certs"
    cert_dir.mkdir(exist_ok=True)
    for key, name in SECRET_FILES.items():
        shutil.copyfile(pki / name, cert_dir / key)
    config = kueue_dir / "config.yaml"
    config.write_text(json.dumps(_configuration(ports, cert_dir), indent=2))
    log("local-env: starting Kueue")
    processes.start(
        state_dir,
        "kueue",
        [
            str(bin_dir / "kueue"),
            f"--config={config}",
            # The on-demand visibility API would be another API server to aggregate; nothing here reads it.
            "--feature-gates=VisibilityOnDemand=false",
            "--zap-log-level=2",
        ],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )
    processes.wait_http(f"http://127.0.0.1:{ports['health']}/readyz", "kueue", state_dir, timeout=timeout)
    # Kueue answers /readyz from a bootstrap manager too, before its webhooks run: wait until they serve the
    # certificate the API server trusts.
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with context.wrap_socket(
                socket.create_connection(("127.0.0.1", ports["webhook"]), timeout=2), server_hostname="127.0.0.1"
            ):
                return
        except (OSError, ssl.SSLError) as error:
            if "kueue" not in processes.running(state_dir) or time.monotonic() > deadline:
                raise RuntimeError(
                    f"Kueue's webhook did not serve its certificate:\n{processes.tail(state_dir, 'kueue')}"
                ) from error
            time.sleep(0.3)


def down(state_dir: Path, bin_dir: Path, kubeconfig: Path, timeout: float = 30.0) -> None:
    """Stop Kueue and remove its webhook configurations, so that nothing waits on a webhook nobody serves.

    The CRDs stay: Kueue's finalizers on its objects would hold their deletion with nobody left to remove them.
    """
    pid = processes.running(state_dir).get("kueue")
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while "kueue" in processes.running(state_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        if "kueue" in processes.running(state_dir):
            os.killpg(pid, signal.SIGKILL)
    kubectl = [str(bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}"]
    for kind, name in WEBHOOK_CONFIGURATIONS.items():
        _kubectl(kubectl, "delete", kind, name, "--ignore-not-found")


def _configuration(ports: dict[str, int], cert_dir: Path) -> dict:
    """Kueue's Configuration for one process on loopback: no leader election, batch Jobs only."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports['metrics']}"},
        "webhook": {"host": "127.0.0.1", "port": ports["webhook"], "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        # Kueue without internal certificate management reads its metrics certificate from a fixed
        # /etc/kueue/metrics/certs; with it, Kueue takes the webhook certificate from the Secret made here
        # (valid, so it is kept) and writes it to certDir.
        "internalCertManagement": {"enable": True, "webhookServiceName": SERVICE, "webhookSecretName": SECRET},
        "integrations": {"frameworks": ["batch/job"]},
    }


def _crds(source: Path, webhook_url: str, ca_bundle: str) -> list[dict]:
    """Kueue's CRDs from its module source; those Kueue converts between versions call its webhook on loopback."""
    crd_dir = source / "config" / "components" / "crd"
    kustomization = yaml.safe_load((crd_dir / "kustomization.yaml").read_text())
    converted = {
        yaml.safe_load((crd_dir / patch["path"]).read_text())["metadata"]["name"] for patch in kustomization["patches"]
    }
    crds = []
    for path in kustomization["resources"]:
        crd = yaml.safe_load((crd_dir / path).read_text())
        crd["metadata"].setdefault("labels", {})[PART_OF] = "kueue"
        if crd["metadata"]["name"] in converted:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": f"{webhook_url}/convert", "caBundle": ca_bundle},
                    "conversionReviewVersions": ["v1"],
                },
            }
        crds.append(crd)
    return crds


def _webhook_configurations(source: Path, webhook_url: str, ca_bundle: str) -> list[dict]:
    """Kueue's webhook manifests, pointed at loopback, for its own kinds and batch Jobs."""
    documents = yaml.safe_load_all((source / "config" / "components" / "webhook" / "manifests.yaml").read_text())
    configurations = []
    for document in documents:
        webhooks = []
        for webhook in document["webhooks"]:
            groups = {group for rule in webhook["rules"] for group in rule["apiGroups"]}
            if not groups <= WEBHOOK_GROUPS:
                continue
            path = webhook["clientConfig"]["service"]["path"]
            webhook["clientConfig"] = {"url": f"{webhook_url}{path}", "caBundle": ca_bundle}
            if "batch" in groups:
                # Kueue leaves Jobs without a queue label alone (manageJobsWithoutQueueName is off); selecting
                # only labelled ones keeps every other Job independent of this process.
                webhook["objectSelector"] = {"matchExpressions": [{"key": QUEUE_LABEL, "operator": "Exists"}]}
            webhooks.append(webhook)
        kind = document["kind"]
        configurations.append(
            {
                "apiVersion": document["apiVersion"],
                "kind": kind,
                "metadata": {"name": WEBHOOK_CONFIGURATIONS[kind]},
                "webhooks": webhooks,
            }
        )
    return configurations


def _namespace() -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}


def _secret(pki: Path) -> dict:
    """The Secret Kueue's certificate rotator reads: it keeps a valid certificate instead of issuing one for a
    service name the API server could not reach here."""
    data = {key: base64.b64encode((pki / name).read_bytes()).decode() for key, name in SECRET_FILES.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": NAMESPACE}, "data": data}


def _apply(kubectl: list[str], objects: list[dict]) -> None:
    # Server-side: Kueue's Workload CRD is larger than the last-applied annotation client-side apply keeps.
    listed = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    _kubectl(kubectl, "apply", "--server-side", "--force-conflicts", "-f", "-", input=listed)


def _wait_established(kubectl: list[str], timeout: float) -> None:
    """Wait until the API server serves Kueue's CRDs (`kubectl wait` fails on a CRD that has no status yet)."""
    deadline = time.monotonic() + timeout
    while True:
        listed = subprocess.run(
            [*kubectl, "get", "crd", "-l", f"{PART_OF}=kueue", "-o", "json"], capture_output=True, text=True
        )
        crds = json.loads(listed.stdout)["items"] if listed.returncode == 0 else []
        established = [
            crd
            for crd in crds
            if any(
                c["type"] == "Established" and c["status"] == "True"
                for c in crd.get("status", {}).get("conditions") or []
            )
        ]
        if crds and len(established) == len(crds):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"Kueue's CRDs were not established within {timeout:.0f}s: {listed.stderr}")
        time.sleep(0.3)


def _kubectl(kubectl: list[str], *args: str, input: str | None = None) -> None:
    result = subprocess.run([*kubectl, *args], input=input, text=True, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args[:2])} for Kueue failed:\n{result.stderr}")


def _make_pki(pki: Path) -> None:
    """A CA and a webhook serving certificate for 127.0.0.1, shaped as Kueue's certificate rotator checks them:
    the CA valid for the name kueue-ca with a PKCS#1 key, the serving certificate for the service's DNS name."""
    if (pki / "webhook.crt").exists():
        return

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True)

    openssl("genrsa", "-traditional", "-out", "ca.key", "2048")
    openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-out", "ca.crt", "-days", "3650", "-subj", "/O=kueue/CN=kueue-ca",
        "-addext", "subjectAltName=DNS:kueue-ca",
    )  # fmt: skip
    openssl("genrsa", "-traditional", "-out", "webhook.key", "2048")
    openssl("req", "-new", "-key", "webhook.key", "-out", "webhook.csr", "-subj", f"/CN={SERVICE}.{NAMESPACE}.svc")
    (pki / "san.ext").write_text(f"subjectAltName=IP:127.0.0.1,DNS:{SERVICE}.{NAMESPACE}.svc\n")
    openssl(
        "x509", "-req", "-in", "webhook.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "webhook.crt", "-days", "3650", "-extfile", "san.ext",
    )  # fmt: skip
