"""Start one container's process in its own mount namespace, the way a container runtime would.

The node agent runs `unshare --mount --uts --propagation private python -I -S podlaunch.py SPEC.json`. Here,
inside the new namespace, we build the container's view of the filesystem and exec the container's command
(so the process keeps this pid, and signals reach it directly):

- the root is an overlay of the host's `/` with a private tmpfs as its writable layer, so mount points for
  volumes (`/etc/config`, `/data`, `/dev/termination-log`) are created in the tmpfs and never on the host;
- the host's other mounts (/proc, /sys, /dev, ...) are bound into it at the same paths, /dev as an overlay
  too so files can be created there;
- each volume folder is bind-mounted at its mountPath (read-only where asked), then we chroot into the root.

Standard library only (it runs with `-I -S`). Spec keys: root, argv, env, cwd, hostname, mounts
[{source, target, readOnly}], imagePaths (host folders that are the image's own files), startErrorFile.
"""

import json
import os
import subprocess
import sys


def run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {proc.stderr.strip()}")


def host_mounts() -> list[str]:
    """Mount points of this namespace other than `/`, parents first (mountinfo order)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
            if point != "/" and point not in points:
                points.append(point)
    return points


def in_root(root: str, path: str) -> str:
    """The host path of `path` as seen from inside `root`: symlinks (like /var/run -> /run) are followed
    within the root, never out to the host's own folders."""
    parts = [p for p in path.split("/") if p]
    resolved = ""
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            resolved = resolved.rsplit("/", 1)[0]
            continue
        candidate = f"{resolved}/{part}"
        if os.path.islink(root + candidate):
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks in {path}")
            target = os.readlink(root + candidate)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                resolved = ""
            continue
        resolved = candidate
    return root + (resolved or "/")


def build_root(spec: dict) -> str:
    base = spec["root"]
    run("mount", "-t", "tmpfs", "-o", "mode=755", "podroot", base)
    for d in ("upper", "work", "dev-upper", "dev-work", "root"):
        os.mkdir(os.path.join(base, d))
    root = os.path.join(base, "root")
    run("mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir=/,upperdir={base}/upper,workdir={base}/work", root)
    for point in host_mounts():
        if point == base or point.startswith(base + "/"):
            continue
        target = root + point
        if not os.path.isdir(target) and not os.path.isfile(target):
            continue
        if point == "/dev":
            run("mount", "-t", "overlay", "overlay", "-o",
                f"lowerdir=/dev,upperdir={base}/dev-upper,workdir={base}/dev-work", target)
        else:
            run("mount", "--bind", point, target)
    for m in spec["mounts"]:
        target = in_root(root, m["target"])
        if os.path.isdir(m["source"]):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                open(target, "a").close()
        run("mount", "--bind", m["source"], target)
        if m.get("readOnly"):
            run("mount", "-o", "remount,bind,ro", target)
    for path in spec.get("imagePaths", []):
        # The image's own files, bound again where a volume now hides them (a checkout under /tmp, say).
        target = in_root(root, path)
        if not os.path.exists(target):
            os.makedirs(target)
            run("mount", "--bind", path, target)
    return root


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    # opened before the chroot, which hides the host's files; empty unless the start fails
    error_file = open(spec["startErrorFile"], "w")
    try:
        if spec.get("isolate", True):
            root = build_root(spec)
            if spec.get("hostname"):
                import socket
                socket.sethostname(spec["hostname"][:63])
            os.chroot(root)
        os.chdir(spec.get("cwd") or "/")
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as e:
        msg = f"failed to start container process {spec['argv'][:1]}: {e}"
        print(msg, file=sys.stderr, flush=True)
        error_file.write(msg)
        error_file.close()
        sys.exit(128)


if __name__ == "__main__":
    main()
