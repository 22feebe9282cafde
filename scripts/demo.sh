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
# A web service on an encrypted overlay network, published on every host through the mesh.
rctl apply -f manifests/web.yaml
# An image built from a Dockerfile on a host of the cluster (manifests/build), then run once.
rctl build -t demo:1 manifests/build
rctl run --rm demo:1
rctl get services
rctl ps
addr=$(rctl node inspect h1 | sed -n 's/.*"addr": "\([0-9.]*\):.*/\1/p' | head -1)
echo "h1 ($addr) port 8080 answers from a web replica: $(busybox wget -qO- "http://$addr:8080/")"
echo
echo "try: rctl logs hello; rctl ps; rctl network ls; rctl local down"
