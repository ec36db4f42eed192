#!/usr/bin/env python3
"""A real Kubernetes control plane on one machine, for tests and the demo.

    python hack/localcluster/localcluster.py build  [--with-node]  # compile (or find cached) binaries
    python hack/localcluster/localcluster.py up     [--dir .localcluster] [--node real|none]
    python hack/localcluster/localcluster.py load   [--dir .localcluster] operator trainer [ARCHIVE ...]
    python hack/localcluster/localcluster.py status [--dir .localcluster]
    python hack/localcluster/localcluster.py env    [--dir .localcluster]   # eval "$(... env)"
    python hack/localcluster/localcluster.py down   [--dir .localcluster]

`up` builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and helm from the Go
modules in this folder (cached outside the repo, keyed by a hash of the inputs), generates a CA and
certificates, starts every component on free loopback ports as a daemon that outlives this command, starts
the node (node.py: a kubelet, containerd and runc, the CNI plugins, a GPU device plugin, the volume provisioner
and CoreDNS; one per machine), waits until the node is Ready and writes `<dir>/kubeconfig`. `load` puts images on
the node (the project's, built by images.py). Logs are in `<dir>/logs/`. Every wait has a timeout and names the
component that failed. Only the standard library is used here.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling modules, whether this runs as a script or is imported by tests
import node  # noqa: E402
import nodebuild  # noqa: E402
import dns  # noqa: E402
import storage  # noqa: E402

REPO = HERE.parent.parent
MARKER = ".localcluster"
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
# What runs the pods: the node (kubelet, containerd, runc), or none (a control plane alone: a second cluster
# on a machine whose one node another cluster holds).
NODE_KINDS = {"real": node.COMPONENTS, "none": ()}
LOCALKUBE_NAMES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet", "kube-proxy")
SERVICE_CIDR = node.SERVICE_CIDR
NODE_NAME = node.NODE_NAME


class ClusterError(Exception):
    """A failure with a message that says what to do; printed without a traceback."""


def say(msg: str) -> None:
    print(f"localcluster: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- build

def cache_root() -> Path:
    return Path(os.environ.get("QLORA_CACHE") or Path.home() / ".cache" / "qlora-operator") / "localcluster"


def build_inputs(src: Path = HERE) -> list[Path]:
    """The files whose content decides the binaries: every go.mod, go.sum and .go file of the modules."""
    files = [p for p in src.rglob("*") if p.is_file() and (p.suffix == ".go" or p.name in ("go.mod", "go.sum"))]
    return sorted(files)


def module_version(src: Path, module: str) -> str:
    """The version go.mod pins for a module, e.g. v1.37.2 for k8s.io/kubernetes."""
    for line in (src / "go.mod").read_text().splitlines():
        words = line.removeprefix("require").split()
        if len(words) >= 2 and words[0] == module:
            return words[1]
    raise ClusterError(f"{src / 'go.mod'} does not pin {module}")


def ldflags(src: Path = HERE) -> str:
    """Strip symbols, and stamp the Kubernetes version (else the API server says v0.0.0-master)."""
    v = module_version(src, "k8s.io/kubernetes")
    major, minor = v.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.gitVersion={v}", f"-X {pkg}.gitMajor={major}", f"-X {pkg}.gitMinor={minor}",
                  f"-X {pkg}.gitTreeState=clean", f"-X {pkg}.gitCommit=localcluster"]
    return " ".join(flags)


def build_key(src: Path = HERE, toolchain: str = "") -> str:
    """A hash of the Go toolchain and flags and every Go input file of the modules."""
    h = hashlib.sha256(toolchain.encode())
    for p in build_inputs(src):
        h.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def find_go() -> str | None:
    """$GO when set (and only it), else `go` on PATH, else Go's default install folder."""
    if os.environ.get("GO"):
        return os.environ["GO"] if os.access(os.environ["GO"], os.X_OK) else None
    for candidate in (shutil.which("go"), "/usr/local/go/bin/go"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def go_version(go: str) -> str:
    return subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout.strip()


def cached_bin_dir(src: Path = HERE) -> Path | None:
    """The newest complete cache entry for these inputs under any Go version, when Go is absent."""
    entries = sorted(cache_root().glob("*/bin/.complete"), key=lambda p: p.stat().st_mtime, reverse=True)
    for marker in entries:
        if json.loads(marker.read_text()).get("inputs") == build_key(src, json.dumps(go_targets(src))):
            return marker.parent
    return None


def go_targets(src: Path) -> list[tuple[str, str, str, dict]]:
    """(binary, module folder under src, package, extra environment) of each program built here."""
    # pause runs alone in its image: static, with no C library to find
    return [("localkube", ".", "./cmd/localkube", {}), ("helm", ".", "helm.sh/helm/v3/cmd/helm", {}),
            ("etcd", "etcd", ".", {}), ("pause", ".", "./cmd/pause", {"CGO_ENABLED": "0"})]


def build(src: Path = HERE) -> tuple[Path, list[str]]:
    """Return (bin dir, names compiled now). An up-to-date cache entry compiles nothing."""
    go = find_go()
    if go is None:
        cached = cached_bin_dir(src)
        if cached:
            return cached, []
        raise ClusterError(
            "the Go toolchain is missing and no cached binaries match this checkout. Install Go 1.26 or newer "
            "(https://go.dev/dl/, e.g. unpack go1.26.linux-amd64.tar.gz into /usr/local and add /usr/local/go/bin "
            "to PATH; or `apt-get install golang-1.26`), or point GO=/path/to/go at it, then run again.")
    version = go_version(go)
    flags = ldflags(src)
    targets = go_targets(src)
    key = build_key(src, version + flags + json.dumps(targets))
    out = cache_root() / key / "bin"
    complete = out / ".complete"
    if complete.exists():
        return out, []
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent `up` waits for this build instead of repeating it
        if complete.exists():
            return out, []
        tmp = out.parent / "bin.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        timings = {}
        for name, moddir, pkg, env in targets:
            say(f"building {name} with {version} (the first build takes a long while; it is cached in {out})")
            t0 = time.monotonic()
            cmd = [go, "build", "-trimpath", f"-ldflags={flags}", "-o", str(tmp / name), pkg]
            proc = subprocess.run(cmd, cwd=src / moddir, capture_output=True, text=True, env={**os.environ, **env})
            if proc.returncode != 0:
                raise ClusterError(f"`{' '.join(cmd)}` in {moddir} failed:\n{proc.stderr[-4000:]}")
            timings[name] = round(time.monotonic() - t0, 1)
        (tmp / ".complete").write_text(json.dumps({"go": version, "inputs": build_key(src, json.dumps(targets)), "seconds": timings}))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out, [name for name, *_ in targets]


def build_node_bins() -> Path:
    """containerd, runc and the CNI plugins (nodebuild.py), built once per Go version."""
    go = find_go()
    if go is None:
        raise ClusterError("the Go toolchain is missing: the node's containerd and runc are built from Go modules; "
                           "install Go 1.26 or newer (see `make deps`)")

    def fail(msg: str) -> None:
        raise ClusterError(msg)
    return nodebuild.build_node(go, go_version(go), cache_root(), say, fail)


# ---------------------------------------------------------------------------------------------- pki

def openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise ClusterError("openssl is missing; install it (`apt-get install openssl`) and run again")
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {proc.stderr}")


def issue_cert(pki: Path, name: str, subject: str, sans: list[str] = (), client: bool = False) -> None:
    """An ECDSA P-256 key (quick to make) and a certificate for `name` signed by the cluster CA."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr",
            "-subj", subject, cwd=pki)
    usage = "clientAuth" if client else "serverAuth,clientAuth"
    ext = [f"extendedKeyUsage={usage}", "keyUsage=critical,digitalSignature,keyEncipherment",
           "basicConstraints=critical,CA:FALSE"]
    if sans:
        ext.append("subjectAltName=" + ",".join(sans))
    (pki / f"{name}.ext").write_text("\n".join(ext) + "\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "3650", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=pki)


def make_pki(pki: Path) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days",
            "3650", "-subj", "/CN=localcluster-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=pki)
    issue_cert(pki, "apiserver", "/CN=kube-apiserver", [
        "IP:127.0.0.1", f"IP:{node.API_SERVICE_IP}", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
        "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"])
    issue_cert(pki, "admin", "/O=system:masters/CN=localcluster-admin", client=True)
    issue_cert(pki, "controller-manager", "/CN=system:kube-controller-manager", client=True)
    issue_cert(pki, "scheduler", "/CN=system:kube-scheduler", client=True)
    issue_cert(pki, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", client=True)
    issue_cert(pki, "front-proxy-client", "/CN=front-proxy-client", client=True)
    issue_cert(pki, storage.USER, f"/CN={storage.USER}", client=True)
    issue_cert(pki, dns.USER, f"/CN={dns.USER}", client=True)
    issue_cert(pki, "node", f"/O=system:nodes/CN=system:node:{NODE_NAME}", node.node_sans())
    openssl("genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "sa.key", cwd=pki)
    openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    for p in pki.glob("*.key"):
        p.chmod(0o600)


def kubeconfig(server: str, pki: Path, user: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "localcluster",
        "clusters": [{"name": "localcluster",
                      "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": user, "user": {"client-certificate": str(pki / f"{user}.crt"),
                                          "client-key": str(pki / f"{user}.key")}}],
        "contexts": [{"name": "localcluster", "context": {"cluster": "localcluster", "user": user}}],
    }, indent=1)


# ---------------------------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def alive(pid: int) -> bool:
    """True while the process runs; a zombie (nobody reaped it) counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def stop_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the daemon's process group, then SIGKILL whatever is left after the grace period."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.1)


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------- cluster

@dataclass
class Cluster:
    dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    bin_dir: str = ""
    started: float = 0.0
    node: str = "real"

    @property
    def components(self) -> tuple[str, ...]:
        return CONTROL_PLANE + NODE_KINDS[self.node]

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"ports": self.ports, "pids": self.pids, "bin_dir": self.bin_dir,
                                   "started": self.started,
                                   "node": self.node}, indent=1))
        tmp.rename(self.state_file)

    @classmethod
    def load(cls, d: Path) -> Cluster | None:
        try:
            data = json.loads((d / "state.json").read_text())
        except (OSError, ValueError):
            return None
        data.pop("pod_ip_prefix", None)  # written by older versions
        return cls(dir=d, **data)

    def dead_components(self) -> list[str]:
        return [name for name in self.components if name not in self.pids or not alive(self.pids[name])]

    def memory(self) -> dict[str, int]:
        return {name: rss_bytes(pid) for name, pid in self.pids.items()}

    # -- health

    def ssl_context(self, user: str | None = "admin") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        if user:
            ctx.load_cert_chain(str(self.pki / f"{user}.crt"), str(self.pki / f"{user}.key"))
        return ctx

    def get(self, url: str, timeout: float = 3.0, user: str | None = "admin") -> tuple[int, str]:
        ctx = None
        if url.startswith("https://127.0.0.1:" + str(self.ports.get("apiserver"))):
            ctx = self.ssl_context(user)
        elif url.startswith("https"):
            ctx = ssl._create_unverified_context()  # controller-manager and scheduler serve self-signed certs
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (OSError, ValueError) as e:
            return 0, str(e)

    def healthy(self) -> bool:
        return not self.dead_components() and self.get(f"{self.server}/readyz")[0] == 200

    def node_ready(self) -> tuple[bool, str]:
        code, body = self.get(f"{self.server}/api/v1/nodes/{NODE_NAME}")
        if code != 200:
            return False, f"node {NODE_NAME} not registered yet ({code})"
        node = json.loads(body)
        conds = {c["type"]: c for c in node.get("status", {}).get("conditions", [])}
        ready = conds.get("Ready", {})
        if ready.get("status") != "True":
            return False, ready.get("message", "no Ready condition yet")
        # the node lifecycle controller lifts the not-ready taint a few seconds after Ready; pods wait for it
        taints = [t["key"] for t in node.get("spec", {}).get("taints") or []]
        return not taints, f"Ready, still tainted {taints}" if taints else "Ready"

    def log_mentions(self, name: str, text: str) -> bool:
        return text in tail(self.logs / f"{name}.log", 200)

    def allocatable(self, resource: str, wanted: int) -> tuple[bool, str]:
        code, body = self.get(f"{self.server}/api/v1/nodes/{NODE_NAME}")
        have = json.loads(body).get("status", {}).get("allocatable", {}).get(resource, "0") if code == 200 else "?"
        return have == str(wanted), f"{resource} allocatable: {have}"

    # -- starting

    def start(self, name: str, argv: list[str], env: dict | None = None) -> int:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.dir, start_new_session=True, env={**os.environ, **(env or {})})
        log.close()
        self.pids[name] = proc.pid
        self.save()
        return proc.pid

    def wait_for(self, name: str, check, timeout: float, what: str) -> None:
        """Poll check() -> (ok, detail) until ok; fail naming the component and showing its log tail."""
        deadline = time.monotonic() + timeout
        detail = ""
        while time.monotonic() < deadline:
            if not alive(self.pids[name]):
                raise ComponentFailed(name, f"{name} exited while waiting for {what}", self.logs / f"{name}.log")
            ok, detail = check()
            if ok:
                return
            time.sleep(0.3)
        raise ComponentFailed(name, f"{name} did not become {what} within {timeout:.0f}s ({detail})",
                              self.logs / f"{name}.log")


class ComponentFailed(ClusterError):
    def __init__(self, name: str, msg: str, log: Path):
        self.name, self.log = name, log
        super().__init__(f"{msg}\n--- last lines of {log} ---\n{tail(log)}\n---\n"
                         f"The state is kept in {log.parent.parent} for a look; "
                         f"`localcluster.py down --dir {log.parent.parent}` removes it.")

    @property
    def port_busy(self) -> bool:
        return "address already in use" in tail(self.log, 60).lower()


def pick_port(name: str, wanted: int | None) -> int:
    if wanted:
        if port_is_free(wanted):
            return wanted
        port = free_port()
        say(f"port {wanted} asked for {name} is busy; using {port} instead")
        return port
    return free_port()


def start_with_port_retry(c: Cluster, name: str, port_keys: list[str], launch, attempts: int = 3) -> None:
    """Start a component; if it lost a race for its port, pick new ports and start it again."""
    for attempt in range(attempts):
        try:
            t0 = time.monotonic()
            launch()
            say(f"{name} ready after {time.monotonic() - t0:.1f}s")
            return
        except ComponentFailed as e:
            if not e.port_busy or attempt == attempts - 1:
                raise
            stop_group(c.pids[name], grace=2)
            for key in port_keys:
                old, c.ports[key] = c.ports[key], free_port()
                say(f"{name}: port {old} was taken meanwhile; retrying on {c.ports[key]}")
            c.save()


def link_bins(c: Cluster, bin_dir: Path) -> None:
    d = c.dir / "bin"
    d.mkdir(exist_ok=True)
    links = {n: bin_dir / "localkube" for n in LOCALKUBE_NAMES}
    links.update({"helm": bin_dir / "helm", "etcd": bin_dir / "etcd", "localkube": bin_dir / "localkube"})
    for name, target in links.items():
        link = d / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)


def claim_the_node(d: Path) -> None:
    """The real node needs this machine's root, cgroups and overlayfs, and is one per machine."""
    problems = node.host_problems()
    if problems:
        raise ClusterError("this machine cannot run the local cluster's node:\n  - " + "\n  - ".join(problems))
    owner = node.owner_of_the_node()
    if owner and owner != d:
        other = Cluster.load(owner)
        if other and not other.dead_components():
            raise ClusterError(
                f"the node of the local cluster in {owner} runs on this machine, and there is one node per machine: "
                f"stop it (`python hack/localcluster/localcluster.py down --dir {owner}`, or `make cluster-down` "
                f"for .localcluster), or use it (QLORA_TEST_CLUSTER_DIR={owner} for the tests)")
        say(f"the node of a cluster that is gone ({owner}) left state on this machine; removing it")
        node.tear_down(owner, other.pids if other else {}, stop_group)
    node.NODE_RECORD.write_text(json.dumps({"dir": str(d)}))


def start_real_node(c: Cluster, node_bins: Path, gpus: int, timeout: float, owner_pid: int | None) -> None:
    lay, localkube = node.Layout(c.dir), Path(c.bin_dir) / "localkube"
    node.set_up_network(c.ports["apiserver"], c.ports["dns"])
    node.write_configs(lay, node_bins, c.pki, kubeconfig(c.server, c.pki, "node"), c.ports["kubelet"],
                       c.ports["kubelet-healthz"])
    # containerd finds its shim on PATH
    c.start("containerd", node.containerd_argv(node_bins, lay), env={"PATH": f"{node_bins}:{os.environ['PATH']}"})
    c.wait_for("containerd", lambda: (lay.socket.exists(), f"no socket {lay.socket} yet"), timeout, "serving")
    node.import_images(node_bins, lay, node.images(lay.node / "images", Path(c.bin_dir) / "pause"), pin=True)
    c.start("kubelet", node.kubelet_argv(localkube, lay))
    c.wait_for("kubelet", c.node_ready, timeout, "Ready")
    c.start("fake-gpu-plugin", node.fake_gpu_argv(localkube, gpus))
    c.wait_for("fake-gpu-plugin", lambda: c.allocatable("nvidia.com/gpu", gpus), timeout, f"{gpus} GPUs allocatable")
    storage.volumes_dir(c.dir).mkdir(parents=True, exist_ok=True)
    objects = {"apiVersion": "v1", "kind": "List",
               "items": storage.manifests(c.dir, node.BUSYBOX_IMAGE) + dns.manifests()}
    proc = subprocess.run([str(c.dir / "bin" / "kubectl"), "--kubeconfig", str(c.kubeconfig), "apply", "-f", "-"],
                          input=json.dumps(objects), capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"applying the volume provisioner's objects failed: {proc.stderr}")
    c.start("local-path-provisioner", storage.argv(node_bins / "local-path-provisioner",
                                                    component_kubeconfig(c, storage.USER), node.BUSYBOX_IMAGE))
    c.wait_for("local-path-provisioner", lambda: (c.log_mentions("local-path-provisioner", "Starting provisioner"),
                                                  "not started yet"), timeout, "started")
    corefile = c.dir / "conf" / "Corefile"
    corefile.write_text(dns.corefile(c.ports["dns"], c.ports["dns-ready"], component_kubeconfig(c, dns.USER)))
    c.start("coredns", dns.argv(node_bins / "coredns", corefile))
    c.wait_for("coredns", lambda: (lambda r: (r[0] == 200, f"/ready: {r[0]} {r[1][-200:]}"))(
        c.get(f"http://127.0.0.1:{c.ports['dns-ready']}/ready")), timeout, "ready")
    if owner_pid:  # not a component: it outlives them to take them down
        subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "reap", "--dir", str(c.dir), "--owner-pid",
                          str(owner_pid)], stdin=subprocess.DEVNULL, stdout=open(c.logs / "reaper.log", "ab"),
                         stderr=subprocess.STDOUT, start_new_session=True)


def reap(d: Path, owner_pid: int) -> None:
    """Wait for the owner to end, then take the cluster down; end early once the cluster's folder is gone."""
    while alive(owner_pid) and (d / MARKER).exists():
        time.sleep(1)
    if (d / MARKER).exists():
        say(f"owner {owner_pid} ended; taking the cluster in {d} down")
        down(d)


def up(d: Path, gpus: int, apiserver_port: int | None, timeout: float, owner_pid: int | None = None,
       node_kind: str = "real") -> Cluster:
    d.mkdir(parents=True, exist_ok=True)
    if any(d.iterdir()) and not (d / MARKER).exists():
        raise ClusterError(f"{d} is not empty and was not made by localcluster; remove it or pick another --dir")
    with open(d / MARKER, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `up`s of one folder: the second waits, then finds it healthy
        existing = Cluster.load(d)
        if existing:
            if existing.healthy():
                say(f"already running (API server {existing.server}); nothing to do")
                return existing
            dead = existing.dead_components()
            say(f"stale state from an earlier run in {d} (not running: {', '.join(dead) or 'API not ready'}); "
                "stopping what is left and starting fresh")
            teardown(existing, remove=False)
        for sub in ("pki", "etcd", "logs", "conf", "node", "bin"):
            shutil.rmtree(d / sub, ignore_errors=True)
        for f in ("state.json", "kubeconfig"):
            (d / f).unlink(missing_ok=True)

        t0 = time.monotonic()
        if node_kind == "real":
            claim_the_node(d)
        bin_dir, compiled = build()
        say(f"binaries: {'compiled ' + ', '.join(compiled) if compiled else 'cached, built nothing'} ({bin_dir})")
        node_bins = build_node_bins() if node_kind == "real" else None
        c = Cluster(dir=d, bin_dir=str(bin_dir), started=time.time(), node=node_kind)
        for sub in ("logs", "conf", "node"):
            (d / sub).mkdir()
        link_bins(c, bin_dir)
        make_pki(c.pki)
        c.ports = {"etcd": free_port(), "etcd-peer": free_port(), "apiserver": pick_port("kube-apiserver",
                   apiserver_port), "controller-manager": free_port(), "scheduler": free_port(),
                   "kubelet": free_port(), "kubelet-healthz": free_port(), "dns": free_port(),
                   "dns-ready": free_port()}
        c.save()
        b = d / "bin"
        try:
            start_with_port_retry(c, "etcd", ["etcd", "etcd-peer"], lambda: start_etcd(c, b, timeout))
            start_with_port_retry(c, "kube-apiserver", ["apiserver"], lambda: start_apiserver(c, b, timeout))
            c.kubeconfig.write_text(kubeconfig(c.server, c.pki, "admin"))
            start_with_port_retry(c, "kube-controller-manager", ["controller-manager"],
                                  lambda: start_controller_manager(c, b, timeout))
            start_with_port_retry(c, "kube-scheduler", ["scheduler"], lambda: start_scheduler(c, b, timeout))
            if node_kind == "real":
                start_real_node(c, node_bins, gpus, timeout, owner_pid)
        except ClusterError:
            teardown(c, remove=False)  # no half-started daemons left behind; logs stay for a look
            raise
        mem = sum(c.memory().values())
        say(f"ready in {time.monotonic() - t0:.1f}s: API server {c.server}, node {NODE_NAME} ({node_kind}) with "
            f"{gpus} GPU(s); its processes use {mem / 2**20:.0f} MiB; kubeconfig {c.kubeconfig}")
        return c


def start_etcd(c: Cluster, b: Path, timeout: float) -> None:
    client, peer = f"http://127.0.0.1:{c.ports['etcd']}", f"http://127.0.0.1:{c.ports['etcd-peer']}"
    shutil.rmtree(c.dir / "etcd", ignore_errors=True)
    c.start("etcd", [str(b / "etcd"), "--name", "local", "--data-dir", str(c.dir / "etcd"),
                     "--listen-client-urls", client, "--advertise-client-urls", client,
                     "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                     "--initial-cluster", f"local={peer}", "--log-level", "warn",
                     "--quota-backend-bytes", str(2 * 2**30), "--unsafe-no-fsync"])
    c.wait_for("etcd", lambda: (lambda r: (r[0] == 200 and '"true"' in r[1], r[1]))(c.get(f"{client}/health")),
               timeout, "healthy")


def start_apiserver(c: Cluster, b: Path, timeout: float) -> None:
    p = c.pki
    c.start("kube-apiserver", [
        str(b / "kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{c.ports['etcd']}",
        "--bind-address=127.0.0.1", f"--secure-port={c.ports['apiserver']}", "--advertise-address=127.0.0.1",
        # pods reach the API server straight at 127.0.0.1, so the `kubernetes` Service needs no endpoints
        "--endpoint-reconciler-type=none",
        f"--tls-cert-file={p}/apiserver.crt", f"--tls-private-key-file={p}/apiserver.key",
        f"--client-ca-file={p}/ca.crt",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,"
        "DefaultTolerationSeconds,ResourceQuota,StorageObjectInUseProtection,PersistentVolumeClaimResize,"
        "Priority,RuntimeClass,NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,"
        "ValidatingAdmissionPolicy,TaintNodesByCondition,"
        # as OpenShift has it: blockOwnerDeletion takes `update` on the owner's finalizers
        "OwnerReferencesPermissionEnforcement",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={p}/sa.pub", f"--service-account-signing-key-file={p}/sa.key",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--kubelet-client-certificate={p}/apiserver-kubelet-client.crt",
        f"--kubelet-client-key={p}/apiserver-kubelet-client.key",
        f"--kubelet-certificate-authority={p}/ca.crt", "--kubelet-preferred-address-types=InternalIP",
        # the aggregation layer's front proxy (and components stop logging its missing CA bundle)
        f"--requestheader-client-ca-file={p}/ca.crt", "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={p}/front-proxy-client.crt", f"--proxy-client-key-file={p}/front-proxy-client.key",
        "--allow-privileged=true", "--profiling=false", "--event-ttl=1h",
    ])
    c.wait_for("kube-apiserver", lambda: (lambda r: (r[0] == 200, f"/readyz: {r[0]} {r[1][-300:]}"))(
        c.get(f"{c.server}/readyz")), timeout, "ready")


def component_kubeconfig(c: Cluster, user: str) -> Path:
    path = c.dir / "conf" / f"{user}.kubeconfig"
    path.write_text(kubeconfig(c.server, c.pki, user))
    return path


def start_controller_manager(c: Cluster, b: Path, timeout: float) -> None:
    kc, p, port = component_kubeconfig(c, "controller-manager"), c.pki, c.ports["controller-manager"]
    c.start("kube-controller-manager", [
        str(b / "kube-controller-manager"), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1", f"--secure-port={port}",
        "--leader-elect=false", "--use-service-account-credentials=true",
        "--node-monitor-period=2s",  # lifts the new node's not-ready taint sooner
        f"--service-account-private-key-file={p}/sa.key", f"--root-ca-file={p}/ca.crt",
        f"--cluster-signing-cert-file={p}/ca.crt", f"--cluster-signing-key-file={p}/ca.key",
        f"--service-cluster-ip-range={SERVICE_CIDR}", "--cluster-name=localcluster",
        # "*" is the default set: job, garbage collector, ttl-after-finished, persistentvolume binder,
        # namespace, serviceaccount(-token), root-ca-cert-publisher, deployment, replicaset, ...
        "--controllers=*",
    ])
    c.wait_for("kube-controller-manager", lambda: (lambda r: (r[0] == 200, f"/healthz: {r[0]} {r[1][-200:]}"))(
        c.get(f"https://127.0.0.1:{port}/healthz")), timeout, "healthy")


def start_scheduler(c: Cluster, b: Path, timeout: float) -> None:
    kc, port = component_kubeconfig(c, "scheduler"), c.ports["scheduler"]
    c.start("kube-scheduler", [
        str(b / "kube-scheduler"), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1", f"--secure-port={port}",
        "--leader-elect=false",
    ])
    c.wait_for("kube-scheduler", lambda: (lambda r: (r[0] == 200, f"/readyz: {r[0]} {r[1][-200:]}"))(
        c.get(f"https://127.0.0.1:{port}/readyz")), timeout, "ready")


# ---------------------------------------------------------------------------------------------- down

def teardown(c: Cluster, remove: bool = True) -> None:
    if c.node == "real":
        node.tear_down(c.dir, c.pids, stop_group)
    for name in reversed(c.components):
        if name in c.pids and alive(c.pids[name]):
            stop_group(c.pids[name], grace=10)
    if remove:
        shutil.rmtree(c.dir, ignore_errors=True)


def down(d: Path) -> None:
    if not d.exists():
        say(f"{d} does not exist; nothing to stop")
        return
    if not (d / MARKER).exists():
        raise ClusterError(f"{d} was not made by localcluster; not touching it")
    c = Cluster.load(d) or Cluster(dir=d)
    teardown(c)
    left = node.leftovers(d) if c.node == "real" else []
    if left:
        raise ClusterError(f"the node of {d} left on this machine: {'; '.join(left)}")
    say(f"stopped and removed {d}")


def load(d: Path, wanted: list[str]) -> None:
    """Put images on the real node: the project's, by name (`operator`, `trainer`: built by images.py from the
    Dockerfiles when their cached archives are missing), and image archives, by path, under the names they carry."""
    import images  # only here: the image builder is not needed by the other commands
    names = [w for w in wanted if w in images.DOCKERFILES]
    archives = [Path(w).absolute() for w in wanted if w not in names]
    missing = [str(a) for a in archives if not a.is_file()]
    if missing:
        raise ClusterError(f"load: no image archive at {', '.join(missing)}; name the project's images "
                           f"({', '.join(images.DOCKERFILES)}) or archive files")
    c = Cluster.load(d)
    if c is None or c.node != "real" or not c.healthy():
        raise ClusterError(f"no running cluster with a real node in {d}; start one first (`up --dir {d} --node real`)")
    try:
        archives = [*images.ensure_images(tuple(names)).values(), *archives] if names else archives
    except images.ImagesError as e:
        raise ClusterError(str(e)) from None
    t0 = time.monotonic()
    imported = node.import_images(build_node_bins(), node.Layout(d), archives)
    say(f"images on the node: {', '.join(a.name for a in imported) or 'all there already'}"
        f"{f' (imported in {time.monotonic() - t0:.0f}s)' if imported else ''}")


def status(d: Path) -> int:
    c = Cluster.load(d)
    if c is None:
        print(f"no cluster in {d}")
        return 1
    mem = c.memory()
    for name in c.components:
        pid = c.pids.get(name)
        state = "running" if pid and alive(pid) else "NOT RUNNING"
        print(f"{name:24} pid {pid or '-':>7}  {state:12} {mem.get(name, 0) / 2**20:7.0f} MiB  "
              f"log {c.logs / (name + '.log')}")
    ready = c.get(f"{c.server}/readyz")[0] == 200
    if c.node == "none":
        node_ok, node_msg = True, "no node: a control plane alone"
        print(f"API server {c.server} ready={ready}; {node_msg}")
    else:
        node_ok, node_msg = c.node_ready() if ready else (False, "API not ready")
        print(f"API server {c.server} ready={ready}; node {NODE_NAME} Ready={node_ok} ({node_msg})")
    control_plane = sum(v for k, v in mem.items() if k in CONTROL_PLANE)
    print(f"memory (RSS): control plane {control_plane / 2**20:.0f} MiB, with the node "
          f"{sum(mem.values()) / 2**20:.0f} MiB (without the pods)")
    print(f"kubeconfig {c.kubeconfig}; binaries {c.dir / 'bin'}")
    return 0 if ready and node_ok and not c.dead_components() else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["build", "up", "load", "down", "status", "env", "reap"])
    ap.add_argument("images", nargs="*", help="load: `operator`, `trainer` (the project's images) or archive paths")
    ap.add_argument("--node", choices=sorted(NODE_KINDS), default=os.environ.get("LOCALCLUSTER_NODE", "real"),
                    help="real: the node (kubelet, containerd, runc); none: a control plane alone")
    ap.add_argument("--dir", default=".localcluster", help="state folder (default .localcluster)")
    ap.add_argument("--with-node", action="store_true", help="build: also the real node's runtime binaries")
    ap.add_argument("--gpus", type=int, default=int(os.environ.get("LOCALCLUSTER_GPUS", "2")),
                    help="nvidia.com/gpu capacity of the node (default 2)")
    ap.add_argument("--apiserver-port", type=int, default=None, help="preferred port; a busy one is replaced")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds each component may take to be ready")
    ap.add_argument("--owner-pid", type=int, default=None,
                    help="take the cluster down when this process ends (test sessions that may be killed)")
    args = ap.parse_intermixed_args(argv)  # `load --dir D operator trainer`
    d = Path(args.dir).absolute()
    try:
        if args.command == "build":
            bin_dir, compiled = build()
            print(f"{'compiled ' + ', '.join(compiled) if compiled else 'cached, built nothing'}: {bin_dir}")
            if args.with_node:
                say(f"the node's runtime: {build_node_bins()}")
        elif args.command == "up":
            up(d, args.gpus, args.apiserver_port, args.timeout, args.owner_pid, args.node)
            print(f"export KUBECONFIG={d / 'kubeconfig'} PATH={d / 'bin'}:$PATH")
        elif args.command == "load":
            load(d, args.images)
        elif args.command == "down":
            down(d)
        elif args.command == "status":
            return status(d)
        elif args.command == "reap":
            reap(d, args.owner_pid)
        elif args.command == "env":
            print(f"export KUBECONFIG={d / 'kubeconfig'}\nexport PATH={d / 'bin'}:$PATH")
    except ClusterError as e:
        say(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
