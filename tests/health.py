"""An object's health as Flux reads it (the kstatus tool of hack/tools) and as Argo CD does (the chart's Lua)."""

import json
import subprocess

from lupa.lua54 import LuaRuntime

from conftest import REPO_ROOT
from localenv import tools

ARGOCD_HEALTH_LUA = REPO_ROOT / "charts" / "tunery" / "files" / "argocd-health.lua"


def kstatus(obj: dict) -> tuple[str, str]:
    """(status, message) that sigs.k8s.io/cli-utils' kstatus computes for the object, as Flux's health checks do."""
    result = subprocess.run(
        [str(tools.bin_dir() / "kstatus")], input=json.dumps(obj), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    verdict = json.loads(result.stdout)
    return verdict["status"], verdict["message"]


def argocd_health(obj: dict, script: str | None = None) -> tuple[str, str]:
    """(status, message) of Argo CD's health contract: the script sees the object as global `obj`, returns `hs`."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(script if script is not None else ARGOCD_HEALTH_LUA.read_text())
    return hs["status"], hs["message"]
