#!/usr/bin/env bash
# Installs what the tests and the local cluster need from the machine itself, once; quick when it is there.
#
# Debian packages: openssl (the local cluster's certificates), util-linux (umount: the node's teardown;
# unshare), prometheus (the Prometheus-mode end-to-end test, and promtool for the chart's alert rules),
# python3-venv where Python cannot make a venv; for the real node: iptables and iproute2 (its network),
# pkg-config and libseccomp-dev (runc is built with seccomp), busybox-static (the node's busybox image);
# for the images: buildah (builds the Dockerfiles without a daemon) and mmdebstrap (the local base image).
# Go builds the control plane from Go modules: Go 1.21 or newer,
# which with GOTOOLCHAIN=auto (the Makefile exports it) fetches the exact toolchain hack/localcluster/go.mod
# pins from the module proxy; where no Go is on the machine, Debian's golang-go is tried (1.19 on Debian 12,
# too old: then this says what to install). `make test`, `make demo`, `make cluster` and .ci/run call this.
set -euo pipefail

find_go() { command -v go || { [ -x /usr/local/go/bin/go ] && echo /usr/local/go/bin/go; } || true; }

# Whether the Go at $1 is 1.21 or newer (older ones cannot read go.mod's three-part version nor switch toolchains).
go_is_recent() {
    local version
    version=$("$1" version 2>/dev/null | awk '{print $3}' | sed 's/^go//')
    [ -n "$version" ] && [ "$(printf '%s\n1.21\n' "$version" | sort -V | head -n1)" = "1.21" ]
}

need=()
for pair in openssl:openssl unshare:util-linux prometheus:prometheus promtool:prometheus iptables:iptables \
            ip:iproute2 pkg-config:pkg-config gcc:gcc busybox:busybox-static buildah:buildah mmdebstrap:mmdebstrap; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
[ -f /usr/include/seccomp.h ] || need+=(libseccomp-dev)
"${PYTHON:-python3}" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
[ -n "$(find_go)" ] || need+=(golang-go)

if [ ${#need[@]} -gt 0 ]; then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "deps: missing Debian packages: ${need[*]}; install them (as root: apt-get install ${need[*]}) and run again" >&2
        exit 1
    fi
    echo "deps: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

go=$(find_go)
if ! go_is_recent "$go"; then
    echo "deps: Go 1.21 or newer is needed to build the local cluster (found: $("$go" version 2>/dev/null || echo none));" \
         "install a Go release into /usr/local/go (or put one on PATH) and run again" >&2
    exit 1
fi
