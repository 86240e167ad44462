#!/usr/bin/env bash
# Prepares a fresh machine to build and run Tern: Debian packages, the test
# guest, and a build of tern itself. Safe to run again (it skips what is done).
#   scripts/setup.sh            debug build (for tests)
#   scripts/setup.sh release    release build (for demos and benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."
configuration="${1:-debug}"

# linux-image-cloud-amd64: the Linux kernel the boot-protocol test boots (its files land in /boot);
# iputils-ping: the network tests ping the guest from a namespace; libsqlite3-dev: the cluster
# controller's store (GRDB); curl and chromium: the cluster tests read /metrics and render the
# controller's web page; etcd-server: the store of several controllers.
packages=(make gcc binutils libc6-dev libzstd-dev libssl-dev libsqlite3-dev iproute2 iputils-ping curl chromium etcd-server linux-image-cloud-amd64)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

command -v swift >/dev/null || { echo "setup: swift is not on PATH (Tern needs Swift 6)" >&2; exit 1; }
[ -e /dev/kvm ] || echo "setup: warning: /dev/kvm is missing; tern cannot run VMs here" >&2

make -s -C guest
swift build -c "$configuration" 2>&1 | grep -v "^\[" || true
test -x ".build/$configuration/tern" || { echo "setup: build failed" >&2; exit 1; }
echo "setup: ready (.build/$configuration/tern, guest/build/tern-guest.elf)"
