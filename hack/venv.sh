#!/usr/bin/env bash
# Makes the project's Python environment: the dependencies once, outside the repo, and a small .venv per checkout.
#
# torch alone is several GB, so the dependencies live in a venv in a cache folder shared by every checkout and
# are only topped up when pyproject.toml's dependencies change. Our own code is not installed there (an install
# would point at whichever checkout made it first). Instead each checkout gets .venv, a venv without packages of
# its own whose one .pth file adds the shared site-packages and this checkout's operator/ and trainer/: so
# `.venv/bin/python -m qlora_trainer` (or `python` after `source .venv/bin/activate`) runs this checkout's code.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${QLORA_CACHE:-$HOME/.cache/qlora-operator}"
venv="$cache/venv"
python="${PYTHON:-python3}"

if ! command -v "$python" >/dev/null; then
    echo "venv: $python not found; install Python 3.11 or newer (apt-get install python3 python3-venv)" >&2
    exit 1
fi
"$python" - <<'PY' || { echo "venv: Python 3.11 or newer is needed (tomllib)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

# Every dependency of the distribution and of its extras, one a line.
requirements=$("$python" - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = list(project["dependencies"])
for extra in project["optional-dependencies"].values():
    deps += extra
print("\n".join(deps))
PY
)
stamp="$venv/.deps-$(printf '%s' "$requirements" | sha256sum | cut -c1-16)"

if [ ! -f "$stamp" ]; then
    mkdir -p "$cache"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    echo "venv: installing the project's dependencies into $venv (the first time downloads torch, several GB; minutes)"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    printf '%s\n' "$requirements" > "$cache/requirements.txt"
    "$venv/bin/python" -m pip install --quiet -r "$cache/requirements.txt"
    rm -f "$venv"/.deps-*
    touch "$stamp"
fi

# This checkout's .venv (an older layout linked the shared venv itself as .venv).
repo=$(pwd -P)
[ -L .venv ] && rm .venv
# A checkout that moved keeps a .venv whose activate script names the old place: made again.
if [ ! -x .venv/bin/python ] || ! grep -qF "$repo/.venv" .venv/bin/activate 2>/dev/null; then
    "$python" -m venv --clear --without-pip .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
shared=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
pth="import site; site.addsitedir('$shared')
$repo/operator
$repo/trainer
$repo"
[ "$(cat "$site/qlora-operator.pth" 2>/dev/null)" = "$pth" ] || printf '%s\n' "$pth" > "$site/qlora-operator.pth"
# The shared venv's tools (pytest, hadolint, ...) beside this python, for whoever looks for them there.
for tool in "$venv"/bin/*; do
    name=$(basename "$tool")
    case "$name" in python*|activate*|pip*|Activate*) continue ;; esac
    [ -e ".venv/bin/$name" ] && [ ! -L ".venv/bin/$name" ] || ln -sfn "$tool" ".venv/bin/$name"
done
