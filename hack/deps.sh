#!/usr/bin/env bash
# Installs what the tests and the local cluster need from the machine itself, once; quick when it is there.
#
# Debian packages: openssl (the local cluster's certificates), util-linux (unshare: the node agent's mount
# namespaces), prometheus (the Prometheus-mode end-to-end test, and promtool for the chart's alert rules). Go
# builds the control plane from Go modules; Debian's golang-go is older than hack/localcluster/go.mod asks,
# and with GOTOOLCHAIN=auto (the Makefile exports it) it fetches the pinned toolchain from the module proxy.
# `make test`, `make demo`, `make cluster` and .ci/run call this.
set -euo pipefail

need=()
for pair in openssl:openssl unshare:util-linux prometheus:prometheus promtool:prometheus; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if ! command -v go >/dev/null && [ ! -x /usr/local/go/bin/go ]; then
    need+=(golang-go)
fi
[ ${#need[@]} -eq 0 ] && exit 0

mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "deps: missing Debian packages: ${need[*]}; install them (as root: apt-get install ${need[*]}) and run again" >&2
    exit 1
fi
echo "deps: installing ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
