"""hack/localcluster/images.py: cache keys, the commands it runs, the names it tags; and one real build.

The pure parts run everywhere. `test_operator_image_runs_as_non_root_and_imports_the_operator` builds the
operator image with buildah on the Debian base (minutes the first time, nothing once its archive is cached),
unpacks the archive it wrote and runs `python -c "import qlora_operator"` in that root filesystem as the image's
user. It is skipped where buildah or mmdebstrap are missing. The trainer image (several GB) is built by hand
only: docs/images.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from hack.localcluster import images
from qlora_operator import settings

REPO = images.REPO


def files() -> dict[str, bytes]:
    return {p: (REPO / p).read_bytes() for p in [*images.DOCKERFILES.values(), ".dockerignore",
                                                 *images.context_files()]}


# ------------------------------------------------------------------------------------------------ names

def test_names_are_the_charts_and_the_operators_defaults():
    names = images.image_names()
    chart = yaml.safe_load((REPO / "charts/qlora-operator/Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "charts/qlora-operator/values.yaml").read_text())
    assert names["operator"] == f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"
    assert names["operator"] == "ghcr.io/qlora-operator/qlora-operator:0.1.0"
    assert names["trainer"] == settings.DEFAULT_TRAINER_IMAGE == values["trainer"]["image"]


# ------------------------------------------------------------------------------------------------- keys

def test_context_is_what_dockerignore_lets_through():
    context = images.context_files()
    assert {"pyproject.toml", "operator/qlora_operator/__main__.py",
            "trainer/qlora_trainer/__main__.py"} <= set(context)
    assert not [p for p in context if "__pycache__" in p or p.endswith(".pyc") or ".egg-info" in p]
    # The docs stay out, README.md too: an edit of them rebuilds no image.
    assert not [p for p in context if p.startswith(("tests/", "hack/", "charts/", "docs/", "README"))]


@pytest.mark.parametrize("name", sorted(images.DOCKERFILES))
def test_key_changes_with_each_input_and_not_otherwise(name):
    base, given = "0123456789abcdef", files()
    key = images.image_key(name, base, given)
    assert images.image_key(name, base, dict(given)) == key
    assert images.image_key(name, base, dict(reversed(given.items()))) == key, "order of the files is not an input"
    assert images.image_key(name, "fedcba9876543210", given) != key
    other = next(n for n in images.DOCKERFILES if n != name)
    assert images.image_key(other, base, given) != key
    for path in [images.DOCKERFILES[name], "pyproject.toml", ".dockerignore", "operator/qlora_operator/__main__.py",
                 "trainer/qlora_trainer/config.py"]:
        changed = dict(given, **{path: given[path] + b"\n"})
        assert images.image_key(name, base, changed) != key, f"{path} is not in the key"
    assert images.image_key(name, base, dict(given, **{"operator/qlora_operator/new.py": b""})) != key
    # A file moved: same bytes under another path.
    moved = dict(given)
    moved["trainer/qlora_trainer/moved.py"] = moved.pop("trainer/qlora_trainer/config.py")
    assert images.image_key(name, base, moved) != key


def test_base_key_follows_the_apt_sources():
    assert images.base_key(b"deb http://a bookworm main") == images.base_key(b"deb http://a bookworm main")
    assert images.base_key(b"deb http://a bookworm main") != images.base_key(b"deb http://b bookworm main")


def test_archive_is_named_and_keyed(tmp_path):
    assert images.archive_path(tmp_path, "trainer", "0123456789abcdef") == tmp_path / "trainer-0123456789abcdef.tar"


# ------------------------------------------------------------------------------------------------- argv

def test_mmdebstrap_makes_a_minimal_debian_with_python_from_the_machines_sources(tmp_path):
    argv = images.mmdebstrap_argv(tmp_path / "rootfs.tar", Path("/etc/apt/sources.list.d/debian.sources"))
    assert argv[0] == "mmdebstrap" and "--variant=minbase" in argv
    assert "--include=python3,python3-venv,ca-certificates" in argv
    assert argv[-3:] == ["bookworm", str(tmp_path / "rootfs.tar"), "/etc/apt/sources.list.d/debian.sources"]
    assert any("var/lib/apt/lists" in a for a in argv if a.startswith("--customize-hook="))


def test_bud_passes_the_base_and_the_wheels_and_tags_the_charts_name(tmp_path):
    argv = images.bud_argv(tmp_path, "Dockerfile.trainer", ".", "localhost/qlora-base:k",
                           "ghcr.io/qlora-operator/qlora-trainer:0.1.0", tmp_path / "wheels")
    assert argv[:7] == ["buildah", "--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"),
                        "--storage-driver", "overlay"]
    assert argv[7] == "bud" and "--layers" in argv and "--pull=never" in argv
    pairs = list(zip(argv, argv[1:]))
    assert ("--isolation", "chroot") in pairs
    assert ("--build-arg", "BASE_IMAGE=localhost/qlora-base:k") in pairs
    assert ("--build-arg", "WHEELS=/wheels") in pairs
    assert ("--volume", f"{tmp_path / 'wheels'}:/wheels:ro") in pairs
    assert ("-f", "Dockerfile.trainer") in pairs and ("-t", "ghcr.io/qlora-operator/qlora-trainer:0.1.0") in pairs
    assert argv[-1] == "."


def test_wheels_are_downloaded_for_the_base_python_as_binaries(tmp_path):
    argv = images.download_argv("/py", tmp_path / "req.txt", tmp_path / "w")
    assert argv[:4] == ["/py", "-m", "pip", "download"]
    pairs = list(zip(argv, argv[1:]))
    assert ("--python-version", "3.11") in pairs and "--only-binary=:all:" in argv
    assert ("-r", str(tmp_path / "req.txt")) in pairs and ("-d", str(tmp_path / "w")) in pairs
    assert ("--platform", "manylinux_2_36_x86_64") in pairs and ("--platform", "manylinux_2_37_x86_64") not in pairs


def test_requirements_are_the_deps_stages():
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = images.requirements(pyproject, "trainer")
    assert reqs[0].startswith("setuptools") and any(r.startswith("torch==") for r in reqs)
    assert not any(r.startswith("torch") for r in images.requirements(pyproject, "operator"))


def test_cli_says_what_is_missing_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(images.shutil, "which", lambda tool: None)
    monkeypatch.setattr(images, "CACHE", tmp_path)  # no archive there: a build is needed
    assert images.main(["build", "operator"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "images: buildah not found; install the Debian packages (apt-get install buildah, or `make deps`)"


# ---------------------------------------------------------------------------------------- a real build

def unpack(archive: Path, root: Path) -> dict:
    """The docker-archive's layers extracted in order into `root`; returns the image's config."""
    root.mkdir()
    with tarfile.open(archive) as tar:
        (manifest,) = json.load(tar.extractfile("manifest.json"))
        config = json.load(tar.extractfile(manifest["Config"]))
        for layer in manifest["Layers"]:
            tar.extract(layer, root.parent / "layers", filter="tar")
    for layer in manifest["Layers"]:
        subprocess.run(["tar", "-C", str(root), "-xf", str(root.parent / "layers" / layer)], check=True)
    return {"config": config, "tags": manifest["RepoTags"]}


@pytest.mark.images
@pytest.mark.skipif(not (shutil.which("buildah") and shutil.which("mmdebstrap")),
                    reason="buildah and mmdebstrap are needed (make deps)")
@pytest.mark.skipif(os.geteuid() != 0, reason="chroot into the unpacked image needs root")
def test_operator_image_runs_as_non_root_and_imports_the_operator(tmp_path):
    archive = images.ensure_images(["operator"])["operator"]
    assert archive.parent == images.CACHE / "images" and archive.name.startswith("operator-")
    image = unpack(archive, tmp_path / "rootfs")
    assert image["tags"] == [images.image_names()["operator"]]
    config = image["config"]["config"]
    user = config["User"].split(":")
    assert user[0].isdigit() and int(user[0]) != 0
    assert config["Entrypoint"] == ["python", "-m", "qlora_operator"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["HOME"] == "/tmp"
    proc = subprocess.run(["unshare", "--mount", "--fork", "chroot", f"--userspec={config['User']}",
                           str(tmp_path / "rootfs"), "python", "-c",
                           "import os, qlora_operator, kopf; print(os.getuid(), qlora_operator.__file__)"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    uid, path = proc.stdout.split()
    assert uid == user[0] and path.startswith("/opt/venv/lib/python3")
    # A second call finds the archive by its key and builds nothing.
    assert images.ensure_images(["operator"]) == {"operator": archive}
