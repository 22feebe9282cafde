#!/usr/bin/env bash
# Makes a root filesystem tarball from Debian's busybox-static: /bin/busybox plus a symlink per
# applet. Usage: scripts/busybox-rootfs.sh OUT.tar
set -euo pipefail
out=${1:?usage: busybox-rootfs.sh OUT.tar}
bb=$(command -v busybox || true)
[ -x /bin/busybox ] && bb=/bin/busybox
[ -n "$bb" ] || { echo "busybox not found: apt-get install busybox-static" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/bin" "$dir/tmp" "$dir/etc" "$dir/proc" "$dir/sys" "$dir/dev"
cp "$bb" "$dir/bin/busybox"
for a in $("$bb" --list); do
  [ "$a" = busybox ] || ln -sf busybox "$dir/bin/$a"
done
echo "root:x:0:0:root:/root:/bin/sh" > "$dir/etc/passwd"
chmod 1777 "$dir/tmp"
tar -C "$dir" -cf "$out" .
