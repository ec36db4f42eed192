"""hack/deps.sh, which `make test`, `make demo` and .ci/run call: quiet when the machine has every tool, and
where it cannot install (no apt-get, or not root) it names each missing package and the command that installs
it, installing nothing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DEPS = Path(__file__).resolve().parents[2] / "hack" / "deps.sh"
TOOLS = ("openssl", "unshare", "prometheus", "promtool", "go")


def run_with(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/bash", str(DEPS)], env={"PATH": str(path)}, capture_output=True, text=True,
                          timeout=60)


def link(folder: Path, *names: str) -> None:
    for name in names:
        found = shutil.which(name) or (f"/usr/local/go/bin/{name}" if name == "go" else None)
        if found is None or not Path(found).exists():
            pytest.skip(f"{name} is not on this machine (make deps installs it)")
        (folder / name).symlink_to(found)


def test_nothing_to_do_when_every_tool_is_there(tmp_path):
    link(tmp_path, *TOOLS, "id", "sort")
    proc = run_with(tmp_path)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_without_apt_get_it_names_what_is_missing_and_how_to_install_it(tmp_path):
    link(tmp_path, "id", "sort", "openssl")  # no apt-get on this PATH: it cannot install
    proc = run_with(tmp_path)
    # Go counts as there in its default folder, off PATH too.
    missing = " ".join(([] if Path("/usr/local/go/bin/go").exists() else ["golang-go"]) + ["prometheus", "util-linux"])
    assert proc.returncode == 1
    assert f"missing Debian packages: {missing};" in proc.stderr, proc.stderr
    assert f"apt-get install {missing})" in proc.stderr, proc.stderr
