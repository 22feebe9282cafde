#!/usr/bin/env bash
# Brings up a local 3-host lab and deploys manifests/hello.yaml. Idempotent: an existing lab
# named "rudder" is taken down first. Needs root (network namespaces, mounts, cgroups).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps
cargo build --release --bins
export PATH="$PWD/target/release:$PATH"
rctl local down --name rudder >/dev/null 2>&1 || true
rctl local up --nodes 3
scripts/busybox-rootfs.sh /tmp/rudder-busybox.tar
rctl image import /tmp/rudder-busybox.tar busybox:latest
rctl apply -f manifests/hello.yaml
for _ in $(seq 1 60); do
  running=$(rctl ps hello -o json | grep -c '"state": "running"' || true)
  [ "$running" -ge 6 ] && break
  sleep 0.5
done
rctl get services
rctl ps hello
echo
echo "try: rctl logs hello; rctl ps; rctl local down"
