"""hack/deps.sh, which `make test`, `make demo` and .ci/run call: quiet when the machine has every tool; where it
cannot install (no apt-get, or not root) it names each missing package and the command that installs it,
installing nothing; and a Go too old to build the local cluster is named, not left to fail in the build."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPS = Path(__file__).resolve().parents[2] / "hack" / "deps.sh"
# The tools it checks for, and the Debian package of each.
PACKAGES = {"openssl": "openssl", "unshare": "util-linux", "prometheus": "prometheus", "promtool": "prometheus",
            "iptables": "iptables", "ip": "iproute2", "pkg-config": "pkg-config", "gcc": "gcc",
            "busybox": "busybox-static", "buildah": "buildah", "mmdebstrap": "mmdebstrap"}
TOOLS = tuple(PACKAGES)
# What the script itself runs besides the tools it checks for.
SHELL_TOOLS = ("id", "sort", "awk", "sed", "head")


def run_with(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/bash", str(DEPS)], env={"PATH": str(path), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=60)


def link(folder: Path, *names: str) -> None:
    for name in names:
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} is not on this machine (make deps installs it)")
        (folder / name).symlink_to(found)


def fake_go(folder: Path, version: str) -> None:
    go = folder / "go"
    go.write_text(f"#!/bin/sh\necho 'go version go{version} linux/amd64'\n")
    go.chmod(0o755)


def test_nothing_to_do_when_every_tool_is_there(tmp_path):
    link(tmp_path, *TOOLS, *SHELL_TOOLS)
    fake_go(tmp_path, "1.26.8")
    proc = run_with(tmp_path)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_without_apt_get_it_names_what_is_missing_and_how_to_install_it(tmp_path):
    link(tmp_path, *SHELL_TOOLS, "openssl")  # no apt-get on this PATH: it cannot install
    fake_go(tmp_path, "1.26.8")
    proc = run_with(tmp_path)
    missing = " ".join(sorted({p for tool, p in PACKAGES.items() if tool != "openssl"}))
    assert proc.returncode == 1
    assert f"missing Debian packages: {missing};" in proc.stderr, proc.stderr
    assert f"apt-get install {missing})" in proc.stderr, proc.stderr


def test_a_go_too_old_for_the_cluster_build_is_named(tmp_path):
    link(tmp_path, *TOOLS, *SHELL_TOOLS)
    fake_go(tmp_path, "1.19.8")  # Debian 12's golang-go
    proc = run_with(tmp_path)
    assert proc.returncode == 1
    assert "Go 1.21 or newer is needed" in proc.stderr and "go1.19.8" in proc.stderr, proc.stderr
