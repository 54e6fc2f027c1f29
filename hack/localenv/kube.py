"""Start etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on loopback, with GPU nodes."""

import json
import secrets
import ssl
import subprocess
import time
from pathlib import Path

from localenv import processes

# Simulated nodes: gpu-node-0 .. gpu-node-(N-1) with 8 GPUs each, and one CPU node. kwok keeps them Ready
# and runs their pods' lifecycle; it simulates thousands of nodes cheaply, so a benchmark can ask for many.
DEFAULT_GPU_NODES = 2
GPUS_PER_NODE = 8
GPU_LABELS = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "tunery.dev/pool": "gpu"}
CPU_NODE = ("cpu-node-0", 0, {"tunery.dev/pool": "cpu"})
# Tainted nodes whose pods get a chosen fate (kwok-stages.yaml); a pod that tolerates the taint and selects
# the label `tunery.dev/kwok-outcome: OUTCOME` stays Running, is OOM-killed, or fails with a data error.
OUTCOMES = ("running", "oom", "data-error")
OUTCOME_LABEL = "tunery.dev/kwok-outcome"
STAGES_FILE = Path(__file__).resolve().parent / "kwok-stages.yaml"
ADMIN_USER = "tunery-admin"


def up(
    state_dir: Path, bin_dir: Path, log=print, gpu_nodes: int = DEFAULT_GPU_NODES, high_throughput: bool = False
) -> dict[str, str]:
    """Start the control plane and kwok; return the environment variables that point at it.

    `high_throughput` lifts the client-side rate limits and worker counts of the controller manager, the
    scheduler and kwok, which otherwise hold a burst of hundreds of Jobs (the scale benchmark) to about 20
    requests per second; the tests keep the stock settings, the ones a real cluster starts with.
    """
    if gpu_nodes < 0:
        raise RuntimeError(f"gpu_nodes must be 0 or more, got {gpu_nodes}; pass --gpu-nodes N with N >= 0")
    kube_dir = state_dir / "kube"
    kubeconfig = kube_dir / "kubeconfig"
    if kubeconfig.exists() and {"kube-apiserver", "etcd"} <= processes.running(state_dir).keys():
        return {"KUBECONFIG": str(kubeconfig)}
    pki = kube_dir / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    _make_pki(pki)
    token = secrets.token_hex(16)
    (pki / "tokens.csv").write_text(f"{token},{ADMIN_USER},{ADMIN_USER},system:masters\n")
    etcd_port, etcd_peer_port, api_port = processes.free_port(), processes.free_port(), processes.free_port()
    server = f"https://127.0.0.1:{api_port}"
    kubeconfig.write_text(_kubeconfig(server, pki / "ca.crt", token))

    log("local-env: starting etcd")
    processes.start(
        state_dir,
        "etcd",
        [
            str(bin_dir / "etcd"),
            "--name=local",
            f"--data-dir={kube_dir / 'etcd'}",
            "--unsafe-no-fsync",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}",
            f"--initial-cluster=local=http://127.0.0.1:{etcd_peer_port}",
            "--log-level=warn",
        ],
    )
    processes.wait_http(f"http://127.0.0.1:{etcd_port}/health", "etcd", state_dir)

    log("local-env: starting kube-apiserver")
    processes.start(
        state_dir,
        "kube-apiserver",
        [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,DefaultStorageClass,ResourceQuota,Priority",
            "--storage-media-type=application/json",
            "-v=1",
        ],
    )
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    processes.wait_http(
        f"{server}/readyz", "kube-apiserver", state_dir, headers={"Authorization": f"Bearer {token}"}, context=context
    )

    log("local-env: starting kube-controller-manager, kube-scheduler and kwok")
    processes.start(
        state_dir,
        "kube-controller-manager",
        [
            str(bin_dir / "kube-controller-manager"),
            *_component_flags(kubeconfig),
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--use-service-account-credentials=true",
            "--controllers=*,-nodeipam,-cloud-node-lifecycle",
            "--concurrent-gc-syncs=5",
            *(_CONTROLLER_MANAGER_THROUGHPUT if high_throughput else ()),
            "-v=1",
        ],
    )
    processes.start(
        state_dir,
        "kube-scheduler",
        [
            str(bin_dir / "kube-scheduler"),
            *_component_flags(kubeconfig),
            *(_CLIENT_UNLIMITED if high_throughput else ()),
            "-v=1",
        ],
    )
    kwok_configs = [STAGES_FILE]
    if high_throughput:
        kwok_configs.append(kube_dir / "kwok-throughput.yaml")
        kwok_configs[-1].write_text(json.dumps(_KWOK_THROUGHPUT))
    processes.start(
        state_dir,
        "kwok",
        [
            str(bin_dir / "kwok"),
            f"--kubeconfig={kubeconfig}",
            *(f"--config={path}" for path in kwok_configs),
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--node-ip=10.0.0.1",
            "--cidr=10.0.0.0/16",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{processes.free_port()}",
        ],
    )
    kubectl = str(bin_dir / "kubectl")
    subprocess.run(
        [kubectl, f"--kubeconfig={kubeconfig}", "apply", "-f", "-"],
        input=json.dumps(_nodes(gpu_nodes)),
        text=True,
        check=True,
        capture_output=True,
    )
    _wait_ready_nodes(state_dir, kubectl, kubeconfig, gpu_nodes + 1 + len(OUTCOMES))
    return {"KUBECONFIG": str(kubeconfig)}


# kwokctl's own "disable QPS limits" values for these components (sigs.k8s.io/kwok consts.DefaultUnlimitedQPS).
_CLIENT_UNLIMITED = ("--kube-api-qps=5000", "--kube-api-burst=10000")
# The Job controller syncs 5 Jobs at a time by default; a burst of a thousand queues behind those 5.
_CONTROLLER_MANAGER_THROUGHPUT = (*_CLIENT_UNLIMITED, "--concurrent-job-syncs=50")
# kwok's client is already unlimited; its pod stages run 4 at a time by default.
_KWOK_THROUGHPUT = {
    "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
    "kind": "KwokConfiguration",
    "options": {"podPlayStageParallelism": 32, "nodeLeaseParallelism": 16},
}


def _component_flags(kubeconfig: Path) -> list[str]:
    """What the controller manager and the scheduler share: the admin kubeconfig, loopback, no leader election."""
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={processes.free_port()}",
        "--leader-elect=false",
    ]


def _wait_ready_nodes(state_dir: Path, kubectl: str, kubeconfig: Path, expected: int, timeout: float = 90.0) -> None:
    """Wait for the nodes to be Ready (kwok) and the default ServiceAccount (controller-manager), so pods can run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in ("kwok", "kube-controller-manager", "kube-scheduler"):
            if name not in processes.running(state_dir):
                raise RuntimeError(f"{name} exited while starting:\n{processes.tail(state_dir, name)}")
        nodes = subprocess.run(
            [kubectl, f"--kubeconfig={kubeconfig}", "get", "nodes", "-o", "json"], capture_output=True, text=True
        )
        account = subprocess.run(
            [kubectl, f"--kubeconfig={kubeconfig}", "get", "serviceaccount", "default"], capture_output=True, text=True
        )
        if nodes.returncode == 0 and account.returncode == 0:
            ready = [
                item
                for item in json.loads(nodes.stdout)["items"]
                if any(c["type"] == "Ready" and c["status"] == "True" for c in item["status"].get("conditions", []))
            ]
            if len(ready) == expected:
                return
        time.sleep(0.5)
    raise RuntimeError(
        f"nodes or the default ServiceAccount not ready in {timeout:.0f}s:\n{processes.tail(state_dir, 'kwok')}"
    )


def _nodes(gpu_nodes: int) -> dict:
    items = []
    gpu = [(f"gpu-node-{index}", GPUS_PER_NODE, GPU_LABELS) for index in range(gpu_nodes)]
    outcome_nodes = [(f"outcome-{outcome}", GPUS_PER_NODE, {OUTCOME_LABEL: outcome}) for outcome in OUTCOMES]
    for name, gpus, labels in [*gpu, CPU_NODE, *outcome_nodes]:
        capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti"}
        if gpus:
            capacity["nvidia.com/gpu"] = str(gpus)
        items.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {
                        "type": "kwok",
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        **labels,
                    },
                },
                "spec": {"taints": [{"key": OUTCOME_LABEL, "value": labels[OUTCOME_LABEL], "effect": "NoSchedule"}]}
                if OUTCOME_LABEL in labels
                else {},
                "status": {"capacity": capacity, "allocatable": capacity},
            }
        )
    return {"apiVersion": "v1", "kind": "List", "items": items}


def _kubeconfig(server: str, ca: Path, token: str) -> str:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "tunery-local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": ADMIN_USER, "user": {"token": token}}],
        "contexts": [{"name": "tunery-local", "context": {"cluster": "tunery-local", "user": ADMIN_USER}}],
        "current-context": "tunery-local",
    }
    return json.dumps(config, indent=2)


def _make_pki(pki: Path) -> None:
    """A CA, the API server's serving certificate for loopback, and the service-account signing key pair."""
    if (pki / "apiserver.crt").exists():
        return

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=tunery-local-ca",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "apiserver.key",
        "-out",
        "apiserver.csr",
        "-subj",
        "/CN=kube-apiserver",
    )
    (pki / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "apiserver.crt",
        "-days",
        "3650",
        "-extfile",
        "san.ext",
    )
    openssl("genrsa", "-out", "sa.key", "2048")
    openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
