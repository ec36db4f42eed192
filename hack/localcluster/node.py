"""The local cluster's node, made of the real thing: a kubelet talking CRI to containerd, which runs pods with
runc; CNI bridge networking in the benchmarking range; GPUs advertised by a device plugin.

Addresses (all in 198.18.0.0/15; nothing here routes to 10/8, 172.16/12 or 192.168/16):
- the node's IP, NODE_IP, sits on `lo` (the kubelet serves there);
- pods get 198.18.0.0/24 from the bridge `lc0` (host-local IPAM; no masquerade, only a 198.18.0.0/15 route);
  the host reaches every pod at its IP, so an operator outside the cluster scrapes a trainer's /metrics;
- Services get 198.18.128.0/24; the API server (listening on 127.0.0.1 only) is reached from pods at the
  `kubernetes` Service's address through one DNAT to 127.0.0.1, allowed by route_localnet on the bridge.

Images are never pulled from a registry: containerd resolves every registry to a loopback port where nothing
listens, so an image not imported beforehand fails as ErrImagePull, then ImagePullBackOff, with no traffic off
the machine. The sandbox (pause) image is built here from a static Go binary.

One node per machine: the kubelet and containerd use host paths no flag moves (/var/lib/kubelet/device-plugins,
/var/log/containers, /run/containerd, /var/lib/cni, the `kubepods` cgroups), and the bridge and the DNAT are
the host's. NODE_RECORD names the cluster folder that owns them; `up` refuses while another cluster's node
runs, and `down` removes every container, mount, network namespace, cgroup, link, rule and process made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import dns
import oci

NODE_NAME = "localnode"
NODE_IP = "198.19.0.1"
POD_CIDR = "198.18.0.0/24"
POD_GATEWAY = "198.18.0.1"
POD_ROUTE = "198.18.0.0/15"
SERVICE_CIDR = "198.18.128.0/24"
API_SERVICE_IP = "198.18.128.1"
BRIDGE = "lc0"
NAT_CHAIN = "LOCALCLUSTER"
CNI_NETWORK = "localcluster"
PAUSE_IMAGE = "localcluster.local/pause:3.10"
# A registry address where nothing listens: a pull of any image not imported fails at once, on the machine.
NOWHERE = "https://127.0.0.1:1"
NODE_RECORD = Path("/run/localcluster-node.json")
CGROUP_FS = Path("/sys/fs/cgroup")
HOST_STATE = {  # what the kubelet, containerd and CNI keep outside the cluster folder
    "device plugins": Path("/var/lib/kubelet/device-plugins"),
    "container log links": Path("/var/log/containers"),
    "runc state": Path("/run/containerd/runc/k8s.io"),
    "shim sockets": Path("/run/containerd/s"),
    "CNI results": Path("/var/lib/cni/results"),
}
COMPONENTS = ("containerd", "kubelet", "fake-gpu-plugin", "local-path-provisioner", "coredns")
BUSYBOX_IMAGE = "localcluster.local/busybox:1.35"
# containerd's label for an image the kubelet's image garbage collection must keep.
PINNED_LABEL = "io.cri-containerd.pinned"


@dataclass(frozen=True)
class Layout:
    """Where the node keeps its state inside the cluster folder."""
    dir: Path

    @property
    def node(self) -> Path:
        return self.dir / "node"

    @property
    def socket(self) -> Path:
        return self.node / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.node / "containerd.toml"

    @property
    def registry_hosts(self) -> Path:
        return self.node / "registry"

    @property
    def kubelet_root(self) -> Path:
        return self.node / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.node / "kubelet-config.json"

    @property
    def kubelet_kubeconfig(self) -> Path:
        return self.node / "kubelet.kubeconfig"

    @property
    def pod_logs(self) -> Path:
        return self.node / "pod-logs"

    @property
    def cni_conf(self) -> Path:
        return self.node / "cni" / "net.d"

    @property
    def cni_ipam(self) -> Path:
        return self.node / "cni" / "ipam"


# ---------------------------------------------------------------------------------------------- configs

def containerd_config(lay: Layout, bins: Path) -> str:
    """containerd's config (version 4, containerd 2.x): state under the cluster folder, runc with cgroupfs."""
    cri_rt = "plugins.'io.containerd.cri.v1.runtime'"
    cri_img = "plugins.'io.containerd.cri.v1.images'"
    return f"""version = 4
root = "{lay.node / 'containerd' / 'root'}"
state = "{lay.node / 'containerd' / 'state'}"

[plugins.'io.containerd.server.v1.grpc']
  address = "{lay.socket}"
[plugins.'io.containerd.server.v1.ttrpc']
  address = "{lay.socket}.ttrpc"

[{cri_img}]
  snapshotter = "overlayfs"
  [{cri_img}.pinned_images]
    sandbox = "{PAUSE_IMAGE}"
  [{cri_img}.registry]
    config_path = "{lay.registry_hosts}"

[{cri_rt}]
  # Root on these VMs lacks CAP_SYS_RESOURCE: without this, runc fails writing every sandbox's oom_score_adj.
  restrict_oom_score_adj = true
  # Network namespaces under the state folder, not /var/run/netns: `down` finds and unmounts them there.
  netns_mounts_under_state_dir = true
  [{cri_rt}.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [{cri_rt}.containerd.runtimes.runc.options]
      BinaryName = "{bins / 'runc'}"
      SystemdCgroup = false
  [{cri_rt}.cni]
    bin_dirs = ["{bins}"]
    conf_dir = "{lay.cni_conf}"
"""


def registry_hosts() -> str:
    """hosts.toml for every registry (`_default`): pulls go to a loopback port where nothing listens."""
    return f'server = "{NOWHERE}"\n'


def cni_conflist(lay: Layout) -> dict:
    return {"cniVersion": "1.0.0", "name": CNI_NETWORK, "plugins": [
        {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                  "routes": [{"dst": POD_ROUTE}], "dataDir": str(lay.cni_ipam)}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ]}


def kubelet_config(lay: Layout, pki: Path, port: int, healthz_port: int) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        # these VMs mount cgroup v1 hierarchies; the kubelet refuses v1 unless told otherwise
        "failCgroupV1": False, "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": f"unix://{lay.socket}",
        "address": NODE_IP, "port": port, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": healthz_port,
        # the node's own certificate (system:node:NODE_NAME) serves the kubelet's port as well
        "tlsCertFile": str(pki / "node.crt"), "tlsPrivateKeyFile": str(pki / "node.key"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "podLogsDir": str(lay.pod_logs), "podCIDR": POD_CIDR,
        # cluster DNS only: no nameserver of the host is handed to pods
        "clusterDomain": dns.CLUSTER_DOMAIN, "clusterDNS": [dns.DNS_SERVICE_IP], "resolvConf": "",
        "failSwapOn": False, "registerNode": True,
        # the machine's disk is shared with the build caches: evict only when it is really full, and keep images
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 99, "imageGCLowThresholdPercent": 98,
    }


def nat_rules(api_port: int, dns_port: int) -> list[list[str]]:
    """The DNATs that take pods' connections to the `kubernetes` Service and to the cluster DNS address to the
    API server and CoreDNS, both on 127.0.0.1."""
    return [["-A", NAT_CHAIN, "-i", BRIDGE, "-d", f"{API_SERVICE_IP}/32", "-p", "tcp", "--dport", "443",
             "-j", "DNAT", "--to-destination", f"127.0.0.1:{api_port}"],
            *dns.nat_rules(dns_port, NAT_CHAIN, BRIDGE)]


def node_sans() -> list[str]:
    return [f"IP:{NODE_IP}", "IP:127.0.0.1", "DNS:localhost", f"DNS:{NODE_NAME}"]


# ---------------------------------------------------------------------------------------------- the host

def host_problems() -> list[str]:
    """What this machine lacks for a real node, each with what to do; empty when it can run one."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the node (kubelet, containerd, runc) needs root: run as root")
    filesystems = Path("/proc/filesystems").read_text() if Path("/proc/filesystems").exists() else ""
    if "overlay" not in filesystems:
        problems.append("the kernel has no overlayfs (containerd's snapshotter): `modprobe overlay`")
    if not (CGROUP_FS / "memory").is_dir() and not (CGROUP_FS / "cgroup.controllers").exists():
        problems.append(f"no cgroup hierarchy with the memory controller under {CGROUP_FS}")
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables"), ("mount", "mount")):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` is missing: apt-get install {package}")
    if Path("/run/containerd/containerd.sock").exists():
        problems.append("a containerd of the machine runs (/run/containerd/containerd.sock); the local node "
                        "shares its host paths: stop it first")
    return problems


def owner_of_the_node() -> Path | None:
    """The cluster folder whose node runs on this machine, if its record is there."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        return Path(json.loads(NODE_RECORD.read_text())["dir"])
    return None


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc


def node_ip_on_lo() -> bool:
    return NODE_IP in run("ip", "-4", "addr", "show", "dev", "lo").stdout


def bridge_exists() -> bool:
    return run("ip", "link", "show", BRIDGE, check=False).returncode == 0


def set_up_network(api_port: int, dns_port: int) -> None:
    """The node IP on lo, the bridge with its gateway address and route_localnet, and the API server's DNAT."""
    if not node_ip_on_lo():
        run("ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo")
    if not bridge_exists():
        run("ip", "link", "add", BRIDGE, "type", "bridge")
    if POD_GATEWAY not in run("ip", "-4", "addr", "show", "dev", BRIDGE).stdout:
        run("ip", "addr", "add", f"{POD_GATEWAY}/{POD_CIDR.split('/')[1]}", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet").write_text("1")
    tear_down_nat()
    run("iptables", "-t", "nat", "-N", NAT_CHAIN)
    run("iptables", "-t", "nat", "-A", "PREROUTING", "-j", NAT_CHAIN)
    for rule in nat_rules(api_port, dns_port):
        run("iptables", "-t", "nat", *rule)


def tear_down_nat() -> None:
    while run("iptables", "-t", "nat", "-D", "PREROUTING", "-j", NAT_CHAIN, check=False).returncode == 0:
        pass
    run("iptables", "-t", "nat", "-F", NAT_CHAIN, check=False)
    run("iptables", "-t", "nat", "-X", NAT_CHAIN, check=False)


def tear_down_network() -> None:
    tear_down_nat()
    # the kubelet's canary chains, by which it would notice a firewall reload
    for tool in ("iptables", "ip6tables"):
        for table in ("mangle", "nat", "filter"):
            run(tool, "-t", table, "-X", "KUBE-KUBELET-CANARY", check=False)
    run("ip", "link", "del", BRIDGE, check=False)
    run("ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo", check=False)


def pod_cgroups() -> list[Path]:
    """Every `kubepods` cgroup of every hierarchy, deepest first."""
    found = []
    for top in CGROUP_FS.glob("*/kubepods"):
        found += [p for p in top.rglob("*") if p.is_dir()] + [top]
    if (CGROUP_FS / "kubepods").is_dir():  # cgroup v2
        top = CGROUP_FS / "kubepods"
        found += [p for p in top.rglob("*") if p.is_dir()] + [top]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def kill_pod_processes(timeout: float = 10.0) -> None:
    """SIGKILL every process in the pods' cgroups until none is left (containers outlive the kubelet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = set()
        for cg in pod_cgroups():
            with contextlib.suppress(OSError, ValueError):
                pids |= {int(x) for x in (cg / "cgroup.procs").read_text().split()}
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def kill_shims(socket: Path) -> None:
    """containerd's shims run in sessions of their own; they name the containerd socket they serve."""
    needle = str(socket).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            if b"containerd-shim" in cmdline and needle in cmdline:
                os.kill(int(entry.name), signal.SIGKILL)


def mounts_under(d: Path) -> list[str]:
    """Mount points at or below d, deepest first (mountinfo escapes spaces as \\040)."""
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == str(d) or point.startswith(str(d) + "/"):
                points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def unmount_all(d: Path) -> None:
    for _ in range(5):  # a mount may hide another at the same point
        points = mounts_under(d)
        if not points:
            return
        for point in points:
            run("umount", "--lazy", point, check=False)


def remove_host_state(d: Path) -> None:
    """What the node left outside the cluster folder."""
    for cg in pod_cgroups():
        with contextlib.suppress(OSError):
            cg.rmdir()
    for link in HOST_STATE["container log links"].glob("*.log"):
        with contextlib.suppress(OSError):
            if str(d) in os.readlink(link):
                link.unlink()
    for prefix in (CNI_NETWORK, "cni-loopback"):  # the bridge network's results, and containerd's own loopback's
        for f in HOST_STATE["CNI results"].glob(f"{prefix}-*"):
            f.unlink(missing_ok=True)
    for name in ("device plugins", "runc state", "shim sockets"):
        shutil.rmtree(HOST_STATE[name], ignore_errors=True)
    for empty in (Path("/var/lib/kubelet"), Path("/run/containerd/runc"), Path("/run/containerd"),
                  HOST_STATE["container log links"], HOST_STATE["CNI results"], Path("/var/lib/cni")):
        with contextlib.suppress(OSError):
            empty.rmdir()


# ---------------------------------------------------------------------------------------------- start

def images(out: Path, pause_binary: Path) -> list[Path]:
    """The node's own images: the sandbox (pause) and busybox (Debian's busybox-static, every applet linked)."""
    pause = oci.files_image(out / "pause.tar", PAUSE_IMAGE, {"pause": pause_binary}, entrypoint=["/pause"],
                            user="65535:65535")
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    applets = run(str(busybox), "--list-full").stdout.split()
    box = oci.files_image(out / "busybox.tar", BUSYBOX_IMAGE, {"bin/busybox": busybox},
                          links={a: "/bin/busybox" for a in applets if a != "bin/busybox"},
                          dirs={"tmp": 0o1777}, cmd=["sh"],
                          env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    return [pause, box]


def ctr(bins: Path, lay: Layout, *args: str) -> list[str]:
    return [str(bins / "ctr"), "--address", str(lay.socket), "--namespace", "k8s.io", *args]


def archive_names(archive: Path) -> list[str]:
    """The image names an archive carries: a docker-archive's RepoTags, or an OCI layout's containerd names."""
    with tarfile.open(archive) as tar:
        for member in tar:  # the headers only: the layers are skipped over, not read
            if member.name not in ("manifest.json", "index.json"):
                continue
            document = json.load(tar.extractfile(member))
            if member.name == "manifest.json":
                return [tag for image in document for tag in image.get("RepoTags") or ()]
            return [m["annotations"]["io.containerd.image.name"] for m in document.get("manifests") or ()
                    if "io.containerd.image.name" in (m.get("annotations") or {})]
    return []


def image_names(bins: Path, lay: Layout) -> set[str]:
    return set(run(*ctr(bins, lay, "images", "ls", "-q")).stdout.split())


def import_images(bins: Path, lay: Layout, archives: list[Path], pin: bool = False) -> list[Path]:
    """Import image archives (docker-archive or OCI) into the node's containerd under the names they carry; an
    archive imported before, unchanged, whose images are still there, is skipped (the trainer's takes a minute).
    The kubelet removes unused images when the disk is nearly full (imageGCHighThresholdPercent): `pin` keeps
    it from removing these (the node's own: the volume helper's busybox). Returns those imported."""
    record = lay.node / "imported.json"
    seen = json.loads(record.read_text()) if record.exists() else {}
    present = image_names(bins, lay)
    done = []
    for archive in archives:
        info = archive.stat()
        stamp = f"{info.st_size}:{info.st_mtime_ns}"
        before = seen.get(str(archive))
        before = before if isinstance(before, dict) else {}  # a record of an older format: imported again
        if before.get("stamp") == stamp and before.get("names") and set(before["names"]) <= present:
            continue
        run(*ctr(bins, lay, "images", "import", str(archive)))
        names = archive_names(archive)
        if pin:
            for name in names:
                run(*ctr(bins, lay, "images", "label", name, f"{PINNED_LABEL}=pinned"))
        seen[str(archive)] = {"stamp": stamp, "names": names}
        record.write_text(json.dumps(seen, indent=1))
        done.append(archive)
    return done


def write_configs(lay: Layout, bins: Path, pki: Path, kubeconfig_text: str, port: int, healthz_port: int) -> None:
    for folder in (lay.node, lay.registry_hosts / "_default", lay.cni_conf, lay.cni_ipam, lay.kubelet_root,
                   lay.pod_logs):
        folder.mkdir(parents=True, exist_ok=True)
    lay.containerd_config.write_text(containerd_config(lay, bins))
    (lay.registry_hosts / "_default" / "hosts.toml").write_text(registry_hosts())
    (lay.cni_conf / "10-localcluster.conflist").write_text(json.dumps(cni_conflist(lay), indent=1))
    lay.kubelet_config.write_text(json.dumps(kubelet_config(lay, pki, port, healthz_port), indent=1))
    lay.kubelet_kubeconfig.write_text(kubeconfig_text)


def containerd_argv(bins: Path, lay: Layout) -> list[str]:
    return [str(bins / "containerd"), "--config", str(lay.containerd_config)]


def kubelet_argv(localkube: Path, lay: Layout) -> list[str]:
    return [str(localkube), "kubelet", "--config", str(lay.kubelet_config), "--kubeconfig", str(lay.kubelet_kubeconfig),
            "--root-dir", str(lay.kubelet_root), "--hostname-override", NODE_NAME, "--node-ip", NODE_IP]


def fake_gpu_argv(localkube: Path, gpus: int) -> list[str]:
    return [str(localkube), "fake-gpu-plugin", "--count", str(gpus), "--resource", "nvidia.com/gpu"]


def leftovers(d: Path) -> list[str]:
    """What a node that was taken down left on the host: empty when `tear_down` did its job."""
    found = [f"mount {m}" for m in mounts_under(d)] + [f"cgroup {cg}" for cg in pod_cgroups()]
    if bridge_exists():
        found.append(f"link {BRIDGE}")
    if node_ip_on_lo():
        found.append(f"address {NODE_IP} on lo")
    nat = run("iptables", "-t", "nat", "-S", check=False).stdout
    found += [f"iptables chain {c}" for c in (NAT_CHAIN, "KUBE-KUBELET-CANARY") if c in nat]
    for name, path in HOST_STATE.items():
        if path.exists() and any(path.iterdir()):
            found.append(f"{name} in {path}")
    return found


def tear_down(d: Path, pids: dict[str, int], stop_group) -> None:
    """Stop the node of the cluster in d and remove everything it made, on the host and in d; idempotent."""
    lay = Layout(d)
    for name in ("fake-gpu-plugin", "kubelet"):
        if pids.get(name):
            stop_group(pids[name], grace=10)
    kill_pod_processes()
    kill_shims(lay.socket)
    if pids.get("containerd"):
        stop_group(pids["containerd"], grace=10)
    unmount_all(d)
    remove_host_state(d)
    tear_down_network()
    if owner_of_the_node() == d:
        NODE_RECORD.unlink(missing_ok=True)
