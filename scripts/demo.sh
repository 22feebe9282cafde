#!/usr/bin/env bash
# Brings up a local 3-host lab and deploys manifests/hello.yaml. Idempotent: an existing lab
# named "rudder" is taken down first. Needs root (network namespaces, mounts, cgroups).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps
cargo build --release --bins
export PATH="$PWD/target/release:$PATH"
rctl local down --name rudder >/dev/null 2>&1 || true
rctl local up --nodes 3 --managers 3
scripts/busybox-rootfs.sh /tmp/rudder-busybox.tar
rctl image import /tmp/rudder-busybox.tar busybox:latest
# apply waits, showing progress, until every replica runs.
rctl apply -f manifests/hello.yaml
rctl get services
rctl ps hello
echo
echo "try: rctl logs hello; rctl ps; rctl local down"
