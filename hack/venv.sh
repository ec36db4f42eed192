#!/usr/bin/env bash
# Makes the project's Python environment once, outside the repo, and links it as .venv.
#
# torch alone is several GB, so the environment lives in a cache folder shared by every checkout and is
# only topped up when pyproject.toml's dependencies change. Our own code is NOT installed into it: an
# install would point at whichever checkout made it first, so the code comes from PYTHONPATH instead.
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
ln -sfn "$venv" .venv
