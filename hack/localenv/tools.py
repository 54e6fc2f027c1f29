"""Build the pinned Go tools (control plane, etcd, kubectl, helm, kwok) and fetch Debian's Prometheus, once, into a cache."""

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent.parent / "tools"
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "helm")
# (module directory under hack/tools, binary name, package) for every binary.
PACKAGES = (
    (".", "etcd", "./etcd"),
    (".", "kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
    (".", "kube-controller-manager", "k8s.io/kubernetes/cmd/kube-controller-manager"),
    (".", "kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler"),
    (".", "kubectl", "k8s.io/kubernetes/cmd/kubectl"),
    (".", "helm", "helm.sh/helm/v3/cmd/helm"),
    ("kwok", "kwok", "sigs.k8s.io/kwok/cmd/kwok"),
    ("kueue", "kueue", "sigs.k8s.io/kueue/cmd/kueue"),
    ("kstatus", "kstatus", "."),
)


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").resolve() / "tunery" / "tools"


def kubernetes_version() -> str:
    """The pinned k8s.io/kubernetes version, which the binaries report (Helm checks a chart's kubeVersion by it)."""
    match = re.search(r"^\s*k8s\.io/kubernetes (v\S+)", (TOOLS_DIR / "go.mod").read_text(), re.M)
    assert match, "hack/tools/go.mod must require k8s.io/kubernetes"
    return match.group(1)


def _ldflags(module: str) -> str:
    if module != ".":
        return "-s -w"
    version = kubernetes_version()
    major, minor = version.lstrip("v").split(".")[:2]
    stamps = {"gitVersion": version, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean"}
    # Without these stamps a module build reports v0.0.0-master, as kubectl version and the API server show.
    flags = [
        f"-X k8s.io/{package}/version.{key}={value}"
        for package in ("component-base", "client-go/pkg")
        for key, value in stamps.items()
    ]
    return " ".join(["-s", "-w", *flags])


def _module_files(module: str) -> list[Path]:
    """The go.mod, go.sum and sources a module's binaries are built from (nested modules excluded)."""
    root = TOOLS_DIR / module
    nested = [TOOLS_DIR / other for other in {entry[0] for entry in PACKAGES} if other != module]
    return [
        path
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and path.suffix in (".mod", ".sum", ".go")
        and not any(path.is_relative_to(other) for other in nested if other.is_relative_to(root) and other != root)
    ]


def _module_build_dir(module: str) -> Path:
    """Where one module's binaries are cached: keyed by its own files, so adding a module rebuilds nothing else."""
    digest = hashlib.sha256(_ldflags(module).encode())
    for path in _module_files(module):
        digest.update(str(path.relative_to(TOOLS_DIR)).encode())
        digest.update(path.read_bytes())
    return cache_root() / "modules" / f"{module.replace('/', '-').strip('.') or 'root'}-{digest.hexdigest()[:16]}"


def bin_dir() -> Path:
    """The one directory that holds every pinned binary (links into the per-module caches)."""
    digest = hashlib.sha256()
    for module in sorted({entry[0] for entry in PACKAGES}):
        digest.update(str(_module_build_dir(module)).encode())
    return cache_root() / digest.hexdigest()[:16] / "bin"


def ensure_built(log=print) -> Path:
    """Build whatever binary is missing; return the directory that holds them all."""
    target = bin_dir()
    missing = [entry for entry in PACKAGES if not (target / entry[1]).is_file()]
    if not missing:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for module in sorted({entry[0] for entry in missing}):
        built = _module_build_dir(module)
        names = [entry[1] for entry in missing if entry[0] == module]
        unbuilt = [entry for entry in missing if entry[0] == module and not (built / entry[1]).is_file()]
        if unbuilt:
            _build(module, built, unbuilt, log)
        for name in names:
            link = target / name
            link.unlink(missing_ok=True)
            link.symlink_to(built / name)
    return target


def _build(module: str, built: Path, entries: list[tuple[str, str, str]], log) -> None:
    if shutil.which("go") is None:
        raise SystemExit("local-env: the Go toolchain is needed to build the control plane; install Go 1.24 or newer")
    names = [entry[1] for entry in entries]
    log(f"local-env: building {', '.join(names)} (first run only; several minutes)")
    built.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=built.parent) as staging:
        env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly -buildvcs=false"}
        subprocess.run(
            ["go", "build", "-trimpath", f"-ldflags={_ldflags(module)}", "-o", staging + "/", *[e[2] for e in entries]],
            cwd=TOOLS_DIR / module,
            env=env,
            check=True,
        )
        for name in names:
            os.replace(Path(staging) / name, built / name)


# Debian's prometheus package provides the real Prometheus and promtool; unpacked, not installed (no root needed).
DEBIAN_BINARIES = ("prometheus", "promtool")


def debian_bin_dir() -> Path:
    return cache_root() / "debian" / "bin"


def ensure_prometheus(log=print) -> Path:
    """Download Debian's prometheus package with apt-get and unpack its binaries; return their directory."""
    target = debian_bin_dir()
    if all((target / name).is_file() for name in DEBIAN_BINARIES):
        return target
    if shutil.which("apt-get") is None:
        raise SystemExit("local-env: Prometheus comes from Debian's prometheus package; apt-get is needed to fetch it")
    log("local-env: fetching Debian's prometheus package")
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        download = ["apt-get", "download", "prometheus"]
        if subprocess.run(download, cwd=staging, capture_output=True).returncode != 0:
            # A fresh machine may have no package lists yet; refreshing them needs root.
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(download, cwd=staging, check=True, capture_output=True)
        [package] = Path(staging).glob("prometheus_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(package), str(Path(staging) / "root")], check=True)
        for name in DEBIAN_BINARIES:
            os.replace(Path(staging) / "root" / "usr" / "bin" / name, target / name)
    return target
