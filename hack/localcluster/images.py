"""The project's images, built from its own Dockerfiles without a registry or a Docker engine.

The base is Debian 12 made with mmdebstrap from this machine's apt sources (python3, python3-venv,
ca-certificates; no CUDA: the trainer runs on the CPU here). buildah builds Dockerfile.operator and
Dockerfile.trainer on it (`bud --layers --build-arg BASE_IMAGE=...`) with pip installing from a wheel folder
that the host's pip downloaded (its cache serves a second download), and writes each image as a docker-archive
that `ctr images import` reads, tagged with the names the chart and the operator use (`image_names()`).

An archive is `~/.cache/qlora-operator/images/NAME-KEY.tar`; KEY hashes the Dockerfile, pyproject.toml,
.dockerignore, every file of the build context and the base's key, so a second run builds nothing. buildah's
storage (overlay driver: layers shared, not copied as vfs would; the trainer's are GBs) is in
`~/.cache/qlora-operator/buildah`. A file lock keeps two builds apart.

    python hack/localcluster/images.py build [operator|trainer ...]   # prints each archive
    python hack/localcluster/images.py names                          # NAME REFERENCE
    python hack/localcluster/images.py prune                          # drop buildah's unused layers
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache/qlora-operator"))
DOCKERFILES = {"operator": "Dockerfile.operator", "trainer": "Dockerfile.trainer"}
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_PYTHON = "3.11"  # Debian 12's; the wheels are downloaded for it
BASE_GLIBC_MINOR = 36
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
# Docs, man pages and translations are of no use in a container.
DPKG_EXCLUDES = ("path-exclude=/usr/share/doc/*", "path-exclude=/usr/share/man/*",
                 "path-exclude=/usr/share/locale/*", "path-include=/usr/share/locale/locale.alias")
WHEELS_MOUNT = "/wheels"


class ImagesError(Exception):
    """A build that cannot run or failed; its message is one line for a person."""


# ---------------------------------------------------------------------------------------------- pure

def image_names(repo: Path = REPO) -> dict[str, str]:
    """name -> the full reference the chart's defaults (operator) and the operator's settings (trainer) use."""
    chart = repo / "charts/qlora-operator"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    tag = values["image"]["tag"] or str(yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"])
    settings = (repo / "operator/qlora_operator/settings.py").read_text()
    trainer = re.search(r'^DEFAULT_TRAINER_IMAGE = "([^"]+)"', settings, re.M).group(1)
    return {"operator": f"{values['image']['repository']}:{tag}", "trainer": trainer}


def context_files(repo: Path = REPO) -> list[str]:
    """The build context after .dockerignore (`*`, then `!path` entries, then `**/name` exclusions)."""
    kept, dropped = [], []
    for line in (repo / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line.startswith("!"):
            kept.append(line[1:].rstrip("/"))
        elif line.startswith("**/"):
            dropped.append(line[3:])
    out = []
    for entry in kept:
        path = repo / entry
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            relative = file.relative_to(repo)
            if not any(part_matches(part, dropped) for part in relative.parts):
                out.append(relative.as_posix())
    return sorted(set(out))


def part_matches(part: str, patterns: Iterable[str]) -> bool:
    return any(Path(part).match(p) for p in patterns)


def digest(parts: Iterable[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in parts:
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()[:16]


def base_key(sources: bytes) -> str:
    return digest([("suite", SUITE.encode()), ("packages", " ".join(BASE_PACKAGES).encode()),
                   ("dpkg", " ".join(DPKG_EXCLUDES).encode()), ("sources", sources)])


def image_key(name: str, base: str, files: Mapping[str, bytes]) -> str:
    """KEY of an image: its Dockerfile, pyproject.toml, .dockerignore and context files (path -> content)."""
    fixed = [DOCKERFILES[name], "pyproject.toml", ".dockerignore"]
    return digest([("name", name.encode()), ("base", base.encode())]
                  + [(path, files[path]) for path in fixed] + [(p, files[p]) for p in sorted(files) if p not in fixed])


def requirements(pyproject: Mapping, extra: str) -> list[str]:
    """What the Dockerfile's deps stage installs: the build backend, the core and the extra's requirements."""
    project = pyproject["project"]
    return [*pyproject["build-system"]["requires"], *project["dependencies"], *project["optional-dependencies"][extra]]


def mmdebstrap_argv(out: Path, sources: Path) -> list[str]:
    return ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
            *[f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES],
            '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*', SUITE, str(out), str(sources)]


def download_argv(python: str, requirements_file: Path, wheels: Path) -> list[str]:
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(5, BASE_GLIBC_MINOR + 1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    argv = [python, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", BASE_PYTHON,
            "--implementation", "cp", "-d", str(wheels), "-r", str(requirements_file)]
    for platform in platforms:
        argv += ["--platform", platform]
    return argv


def buildah_argv(storage: Path) -> list[str]:
    return ["buildah", "--root", str(storage / "root"), "--runroot", str(storage / "run"),
            "--storage-driver", "overlay"]


def bud_argv(storage: Path, dockerfile: str, context: str, base_ref: str, reference: str,
             wheels: Path | None = None) -> list[str]:
    # chroot isolation: no runc or user namespaces needed; docker format keeps HEALTHCHECK.
    wheel_args = ["--build-arg", f"WHEELS={WHEELS_MOUNT}", "--volume", f"{wheels}:{WHEELS_MOUNT}:ro"] if wheels else []
    return [*buildah_argv(storage), "bud", "--layers", "--pull=never", "--isolation", "chroot", "--format", "docker",
            "--build-arg", f"BASE_IMAGE={base_ref}", *wheel_args, "-f", dockerfile, "-t", reference, context]


def archive_path(images: Path, name: str, key: str) -> Path:
    return images / f"{name}-{key}.tar"


# ------------------------------------------------------------------------------------------------ I/O

def apt_sources() -> Path:
    for path in APT_SOURCES:
        if path.is_file() and path.read_text().strip():
            return path
    raise ImagesError(f"images: no apt sources at {' or '.join(map(str, APT_SOURCES))} for the Debian base")


def keys(names: Sequence[str], repo: Path = REPO) -> tuple[str, dict[str, str]]:
    base = base_key(apt_sources().read_bytes())
    files = {p: (repo / p).read_bytes() for p in [*DOCKERFILES.values(), ".dockerignore", *context_files(repo)]}
    return base, {name: image_key(name, base, files) for name in names}


def require(*tools: str) -> None:
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise ImagesError(f"images: {' and '.join(missing)} not found; install the Debian packages "
                          f"(apt-get install {' '.join(missing)}, or `make deps`)")


def run(argv: Sequence[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise ImagesError(f"images: {what} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return proc


def has_image(storage: Path, ref: str) -> bool:
    return subprocess.run([*buildah_argv(storage), "inspect", "--type", "image", ref],
                          capture_output=True).returncode == 0


@contextlib.contextmanager
def build_lock(cache: Path):
    """Held while building: another process waits, then finds the archive it would have built."""
    (cache / "images").mkdir(parents=True, exist_ok=True)
    with open(cache / "images" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_base(storage: Path, key: str) -> str:
    """The Debian base in buildah's storage, made with mmdebstrap if missing; returns its reference."""
    ref = f"localhost/qlora-base:{key}"
    if has_image(storage, ref):
        return ref
    require("mmdebstrap")
    with tempfile.TemporaryDirectory(prefix="qlora-base-", dir=storage) as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        run(mmdebstrap_argv(rootfs, apt_sources()), "mmdebstrap of the Debian base")
        container = run([*buildah_argv(storage), "from", "scratch"], "buildah from").stdout.strip()
        try:
            run([*buildah_argv(storage), "add", container, str(rootfs), "/"], "buildah add")
            run([*buildah_argv(storage), "config", "--cmd", "/bin/bash",
                 "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", container],
                "buildah config")
            run([*buildah_argv(storage), "commit", container, ref], "buildah commit")
        finally:
            subprocess.run([*buildah_argv(storage), "rm", container], capture_output=True)
    return ref


def download_wheels(name: str, wheels: Path) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wheels.mkdir(parents=True, exist_ok=True)
    listing = wheels / f".requirements-{name}.txt"
    listing.write_text("\n".join(requirements(pyproject, DOCKERFILES[name].split(".")[1])) + "\n")
    run(download_argv(sys.executable, listing, wheels), f"pip download of the {name} image's wheels")


def build(name: str, key: str, base_ref: str, cache: Path) -> Path:
    storage, images = cache / "buildah", cache / "images"
    reference = image_names()[name]
    download_wheels(name, images / "wheels")
    run(bud_argv(storage, DOCKERFILES[name], ".", base_ref, reference, images / "wheels"),
        f"buildah bud of {DOCKERFILES[name]}", cwd=REPO)
    return write_archive(storage, reference, archive_path(images, name, key))


def write_archive(storage: Path, reference: str, out: Path) -> Path:
    """The image as a docker-archive at `out`; older archives of the same name (NAME-KEY.tar) are removed."""
    tmp = out.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    run([*buildah_argv(storage), "push", reference, f"docker-archive:{tmp}:{reference}"], f"buildah push of {reference}")
    tmp.rename(out)
    name = out.name.rsplit("-", 1)[0]
    for old in out.parent.glob(f"{name}-*.tar"):
        if old != out and re.fullmatch(rf"{re.escape(name)}-[0-9a-f]{{16}}\.tar", old.name):
            old.unlink()
    return out


def ensure_images(names: Sequence[str] = ("operator", "trainer"), cache: Path = CACHE) -> dict[str, Path]:
    """The archive of each image, built (with its base) only when the archive for its current key is missing."""
    unknown = set(names) - set(DOCKERFILES)
    if unknown:
        raise ImagesError(f"images: unknown image {', '.join(sorted(unknown))}; known: {', '.join(DOCKERFILES)}")
    base, wanted = keys(names)
    out = {name: archive_path(cache / "images", name, key) for name, key in wanted.items()}
    if all(path.is_file() for path in out.values()):
        return out
    (cache / "buildah").mkdir(parents=True, exist_ok=True)
    with build_lock(cache):
        missing = [name for name in names if not out[name].is_file()]
        if missing:
            require("buildah")
            base_ref = ensure_base(cache / "buildah", base)
            for name in missing:
                build(name, wanted[name], base_ref, cache)
    return out


def ensure_derived(reference: str, containerfile: Path, base: str = "operator", cache: Path = CACHE) -> Path:
    """The archive of an image built FROM one of the project's (a test's stand-in): `containerfile` with its own
    folder as the context and BASE_IMAGE set to `base`'s reference; keyed by those files and `base`'s key."""
    base_archive = ensure_images((base,), cache)[base]
    context = containerfile.parent
    files = [(f.relative_to(context).as_posix(), f.read_bytes()) for f in sorted(context.rglob("*"))
             if f.is_file() and "__pycache__" not in f.parts]
    key = digest([("reference", reference.encode()), ("base", base_archive.name.encode()), *files])
    out = archive_path(cache / "images", re.sub(r"[^a-z0-9]+", "-", reference.lower()), key)
    if out.is_file():
        return out
    storage, base_ref = cache / "buildah", image_names()[base]
    with build_lock(cache):
        if not out.is_file():
            # the base is in buildah's storage when it was built here; otherwise from its archive
            if not has_image(storage, base_ref):
                run([*buildah_argv(storage), "pull", f"docker-archive:{base_archive}"], f"buildah pull of {base}")
            run(bud_argv(storage, str(containerfile), str(context), base_ref, reference),
                f"buildah bud of {containerfile}")
            write_archive(storage, reference, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="build the images whose archive is missing; print each archive")
    build_cmd.add_argument("names", nargs="*", help=f"default: {' '.join(DOCKERFILES)}")
    sub.add_parser("names", help="print each image's name and full reference")
    sub.add_parser("prune", help="remove buildah's images and layers no tag uses")
    args = parser.parse_args(argv)
    try:
        if args.command == "names":
            for name, reference in image_names().items():
                print(name, reference)
        elif args.command == "prune":
            require("buildah")
            run([*buildah_argv(CACHE / "buildah"), "rmi", "--prune"], "buildah rmi --prune")
        else:
            for path in ensure_images(args.names or list(DOCKERFILES), cache=CACHE).values():
                print(path)
    except ImagesError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
