"""The node's runtime binaries, built from pinned Go modules and cached outside the repo.

containerd (with its runc shim and `ctr`), runc, the CNI plugins, the volume provisioner and CoreDNS the node uses come from the Go module
proxy at the versions below, each built as its own project builds it (`go install module/cmd@version`, so
its own go.mod and go.sum decide the dependencies) and stamped with its version. The kubelet, the pause
binary and the stand-in GPU device plugin come from this folder's module with the control plane
(localcluster.py build). The cache key hashes the Go version, the versions and the flags.

Why containerd 2.4 rather than Debian 12's 1.6: 1.6 is past its end of life, and 2.x is what the kubelet of
this Kubernetes release is tested with. runc is built with seccomp (cgo, libseccomp-dev), so a pod's
`seccompProfile: RuntimeDefault` is enforced rather than refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CONTAINERD = "v2.4.2"
RUNC = "v1.5.3"
CNI_PLUGINS = "v1.10.0"
CNI_PLUGIN_NAMES = ("bridge", "host-local", "loopback", "portmap")
LOCAL_PATH_PROVISIONER = "v0.0.30"
COREDNS = "v1.14.7"


@dataclass(frozen=True)
class Target:
    """One `go install` of a module's commands at a version."""
    module: str
    version: str
    packages: tuple[str, ...]
    ldflags: str = "-s -w"
    cgo: bool = False
    tags: str = ""


def targets() -> list[Target]:
    cd = "github.com/containerd/containerd/v2"
    cni = "github.com/containernetworking/plugins"
    cni_dirs = {"bridge": "main", "loopback": "main", "host-local": "ipam", "portmap": "meta"}
    return [
        Target(cd, CONTAINERD, tuple(f"{cd}/cmd/{c}" for c in ("containerd", "containerd-shim-runc-v2", "ctr")),
               f"-s -w -X {cd}/version.Version={CONTAINERD} -X {cd}/version.Revision=localcluster"),
        Target("github.com/opencontainers/runc", RUNC, ("github.com/opencontainers/runc",),
               f"-s -w -X main.version={RUNC.lstrip('v')} -X main.gitCommit=localcluster", cgo=True, tags="seccomp"),
        Target(cni, CNI_PLUGINS, tuple(f"{cni}/plugins/{cni_dirs[p]}/{p}" for p in CNI_PLUGIN_NAMES),
               f"-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion={CNI_PLUGINS}"),
        Target("github.com/rancher/local-path-provisioner", LOCAL_PATH_PROVISIONER,
               ("github.com/rancher/local-path-provisioner",), f"-s -w -X main.VERSION={LOCAL_PATH_PROVISIONER}"),
        Target("github.com/coredns/coredns", COREDNS, ("github.com/coredns/coredns",),
               "-s -w -X github.com/coredns/coredns/coremain.GitCommit=localcluster"),
    ]


def install_command(go: str, target: Target) -> list[str]:
    cmd = [go, "install", "-trimpath", f"-ldflags={target.ldflags}"]
    if target.tags:
        cmd.append(f"-tags={target.tags}")
    return cmd + [f"{p}@{target.version}" for p in target.packages]


def node_key(go_version: str) -> str:
    h = hashlib.sha256(go_version.encode())
    for t in targets():
        h.update(json.dumps(t.__dict__, sort_keys=True).encode())
    return h.hexdigest()[:16]


def missing_build_tools() -> list[str]:
    """runc's seccomp support links libseccomp through cgo: a C compiler, pkg-config and its headers."""
    missing = [tool for tool in ("gcc", "pkg-config") if shutil.which(tool) is None]
    if shutil.which("pkg-config") and subprocess.run(["pkg-config", "--exists", "libseccomp"]).returncode != 0:
        missing.append("libseccomp-dev")
    return missing


def build_node(go: str, go_version: str, cache: Path, say, fail) -> Path:
    """The folder of the node's runtime binaries for this Go, built once (a lock keeps two builds apart)."""
    out = cache / "node" / node_key(go_version) / "bin"
    if (out / ".complete").exists():
        return out
    missing = missing_build_tools()
    if missing:
        fail(f"building runc needs {', '.join(missing)}; install them (`make deps`, or as root "
             f"`apt-get install {' '.join(missing)}`) and run again")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / ".complete").exists():
            return out
        tmp = out.parent / "bin.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        seconds = {}
        for t in targets():
            say(f"building {t.module}@{t.version} (cached in {out} afterwards)")
            t0 = time.monotonic()
            env = {**os.environ, "GOBIN": str(tmp), "CGO_ENABLED": "1" if t.cgo else "0", "GOFLAGS": ""}
            proc = subprocess.run(install_command(go, t), cwd=tmp, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                fail(f"`{' '.join(install_command(go, t))}` failed:\n{proc.stderr[-4000:]}")
            seconds[t.module] = round(time.monotonic() - t0, 1)
        (tmp / ".complete").write_text(json.dumps({"go": go_version, "seconds": seconds}))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out
