#!/usr/bin/env bash
# Makes a root filesystem tarball for iperf3 benchmarks: the busybox rootfs of
# scripts/busybox-rootfs.sh plus the host's /usr/bin/iperf3, every shared library `ldd` lists
# for it and the dynamic loader, each at the path ldd names. Usage: scripts/iperf-rootfs.sh OUT.tar
set -euo pipefail
out=${1:?usage: iperf-rootfs.sh OUT.tar}
iperf=/usr/bin/iperf3
[ -x "$iperf" ] || { echo "$iperf not found: apt-get install iperf3" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
bash "$here/busybox-rootfs.sh" "$dir/busybox.tar"
mkdir "$dir/root"
tar -C "$dir/root" -xf "$dir/busybox.tar"
# Copies FILE (following symlinks) to the same path in the rootfs.
add() {
  mkdir -p "$dir/root$(dirname "$1")"
  cp -L "$1" "$dir/root$1"
}
add "$iperf"
# ldd lines: "libx.so.1 => /path/libx.so.1 (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)" and the
# vdso (no file). Both the path ldd resolved and the loader's own path are kept.
libs=$(ldd "$iperf" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
[ -n "$libs" ] || { echo "ldd listed no libraries for $iperf" >&2; exit 1; }
for lib in $libs; do
  add "$lib"
done
chmod 755 "$dir/root"
tar -C "$dir/root" -cf "$out.tmp" .
mv -f "$out.tmp" "$out"
