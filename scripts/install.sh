#!/usr/bin/env bash
# Installs Rudder on a host without the .deb: the binaries in /usr/bin, the systemd units,
# private /etc/rudder and /var/lib/rudder (0700), and the runtime dependencies (apt-get).
# Idempotent: a second run changes nothing and says so. Never enables or starts a service:
# `rudder init` / `rudder join` do.
#
#   install.sh --from dist/rudder-VERSION-TARGET.tar.gz   checked against dist/SHA256SUMS
#   install.sh --from DIR          binaries in DIR/bin (an unpacked tarball) or DIR (a build)
#   install.sh                     from the unpacked tarball this script is in
# Options: --sums FILE (the SHA256SUMS for a tarball), --root DIR (install under DIR instead
# of /; dependencies are then only checked), --no-deps (do not check dependencies).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
from=
sums=
root=/
deps=1
while [ $# -gt 0 ]; do
    case "$1" in
        --from) from=$2; shift 2 ;;
        --sums) sums=$2; shift 2 ;;
        --root) root=$2; shift 2 ;;
        --no-deps) deps=0; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "install: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
die() { echo "install: $*" >&2; exit 1; }
if [ "$root" = / ] && [ "$(id -u)" != 0 ]; then die "run as root (or give --root DIR)"; fi
[ -d "$root" ] || die "root $root is not a directory"
root=$(cd "$root" && pwd)
[ "$root" = / ] && root=
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 022

# --- the files to install -------------------------------------------------------------------
if [ -z "$from" ]; then
    [ -d "$here/bin" ] || die "no --from given and $here holds no unpacked release (bin/)"
    from=$here
fi
if [ -f "$from" ]; then
    # A tarball is installed only if SHA256SUMS names it with the same digest.
    sums=${sums:-$(dirname "$from")/SHA256SUMS}
    [ -f "$sums" ] || die "no checksums for $from: $sums missing (give --sums FILE)"
    name=$(basename "$from")
    want=$(awk -v n="$name" '$2 == n || $2 == "*"n { print $1; exit }' "$sums")
    [ -n "$want" ] || die "$sums has no checksum for $name: refusing it"
    got=$(sha256sum "$from" | cut -d' ' -f1)
    [ "$got" = "$want" ] || die "checksum mismatch for $name (sha256 $got, $sums says $want): refusing it"
    tar -xzf "$from" -C "$work" --no-same-owner
    set -- "$work"/rudder-*/
    [ $# = 1 ] && [ -d "$1/bin" ] || die "$name is not a rudder release tarball"
    from=${1%/}
fi
[ -d "$from" ] || die "$from: no such file or directory"
if [ -d "$from/bin" ]; then
    bin_src=$from/bin units_src=$from/systemd doc_src=$from/README.md
else
    # A build directory (target/release): units and README from the source tree.
    bin_src=$from units_src=$here/../packaging/systemd doc_src=$here/../README.md
fi

changes=0
changed() { echo "install: $*"; changes=$((changes + 1)); }

# put SRC DEST MODE: copies when the content or mode differs (atomically: a running daemon's
# binary is replaced, never written into).
put() {
    local src=$1 dest=$root$2 mode=$3
    if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "$mode" ]; then
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    install -m "$mode" "$src" "$dest.rudder-new"
    mv -f "$dest.rudder-new" "$dest"
    changed "wrote $2 (mode $mode)"
}

# dir PATH MODE: creates it, or fixes its mode.
dir() {
    local d=$root$1 mode=$2
    if [ ! -d "$d" ]; then
        mkdir -p "$d"
        chmod "$mode" "$d"
        changed "created $1 (mode $mode)"
    elif [ "$(stat -c %a "$d")" != "$mode" ]; then
        chmod "$mode" "$d"
        changed "set $1 to mode $mode"
    fi
}

bins=(rudder rudder-controller rudder-agent rudder-shim rctl)
for b in "${bins[@]}"; do
    [ -f "$bin_src/$b" ] || die "$bin_src/$b missing"
done
for b in "${bins[@]}"; do
    # The agent finds rudder-shim (and a promoted host rudder-controller) next to itself.
    put "$bin_src/$b" "/usr/bin/$b" 755
done
units_before=$changes
for u in rudder-controller.service rudder-agent.service; do
    [ -f "$units_src/$u" ] || die "$units_src/$u missing"
    put "$units_src/$u" "/lib/systemd/system/$u" 644
done
units_changed=$((changes - units_before))
if [ -f "$doc_src" ]; then put "$doc_src" /usr/share/doc/rudder/README.md 644; fi
# Keys, tokens and the cluster's state: private to root.
dir /etc/rudder 700
dir /var/lib/rudder 700

# --- dependencies -----------------------------------------------------------------------------
if [ "$deps" = 1 ]; then
    missing=()
    command -v runc >/dev/null || command -v crun >/dev/null || missing+=(crun)
    command -v nft >/dev/null || [ -x /usr/sbin/nft ] || missing+=(nftables)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ -n "$root" ]; then
            echo "install: note: this host lacks ${missing[*]} (not installed under --root)"
        elif command -v apt-get >/dev/null; then
            export DEBIAN_FRONTEND=noninteractive
            # Refresh the package lists only when they do not know a package yet.
            for p in "${missing[@]}"; do
                if ! apt-cache show "$p" >/dev/null 2>&1; then apt-get update -qq; break; fi
            done
            apt-get install -y -qq "${missing[@]}" >/dev/null
            changed "installed packages ${missing[*]}"
        else
            die "missing ${missing[*]} and no apt-get: install them, then run this again"
        fi
    fi
fi

if [ -z "$root" ] && [ "$units_changed" -gt 0 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    changed "reloaded systemd"
fi
if [ "$changes" = 0 ]; then
    echo "install: nothing to change: rudder is installed${root:+ under $root}"
else
    echo "install: $changes changes${root:+ under $root}; start with \`rudder init\` or \`rudder join\`"
fi
