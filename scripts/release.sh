#!/usr/bin/env bash
# Release artifacts for Rudder, into dist/ (or --out DIR):
#   rudder-VERSION-TARGET.tar.gz   static (musl) binaries, the systemd units, install.sh
#   rudder_VERSION_ARCH.deb        the same binaries and units as a Debian package
#   SHA256SUMS                     sha256 of every artifact above (`sha256sum -c SHA256SUMS`)
#
#   scripts/release.sh                         build x86_64 and aarch64 musl release binaries
#                                              (slow: minutes per target; a bench, not CI)
#   scripts/release.sh --target x86_64-unknown-linux-musl    one target only
#   scripts/release.sh --bin-dir target/debug --arch amd64   package binaries built already
#                                              (fast: what CI tests the package layout with)
#
# Build needs: rustup targets x86_64-unknown-linux-musl and aarch64-unknown-linux-musl,
# musl-tools (musl-gcc) for x86_64 and gcc-aarch64-linux-gnu for aarch64 (the C in ring and
# zstd). Cargo runs under the shared lock /tmp/rudder-cargo.lock when flock exists.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

out=dist
bin_dir=
arch=
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        --arch) arch=$2; shift 2 ;;
        --target) targets+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "release: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "release: no version in Cargo.toml" >&2; exit 1; }
# The binaries every host gets (`rudder`: init, join, leave, config check).
bins=(rudder rudder-controller rudder-agent rudder-shim rctl)
packages=(-p rudder-host -p rudder-controller -p rudder-agent -p rudder-shim -p rudder-ctl)
mkdir -p "$out"
out=$(cd "$out" && pwd)

deb_arch() {
    case "$1" in
        x86_64-*) echo amd64 ;;
        aarch64-*) echo arm64 ;;
        *) echo "release: no Debian architecture for $1" >&2; return 1 ;;
    esac
}

lock() {
    if command -v flock >/dev/null; then flock /tmp/rudder-cargo.lock "$@"; else "$@"; fi
}

# Release binaries for one target, statically linked. ring and zstd-sys compile C: musl-gcc
# for x86_64; for aarch64 the Debian cross gcc compiles it (freestanding enough for musl) and
# Rust links with its own self-contained musl crt and libc.
build() {
    local target=$1 upper
    upper=$(echo "$target" | tr a-z- A-Z_)
    case "$target" in
        x86_64-unknown-linux-musl) export CC_x86_64_unknown_linux_musl=musl-gcc ;;
        aarch64-unknown-linux-musl)
            export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
            export AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar
            export "CARGO_TARGET_${upper}_LINKER=aarch64-linux-gnu-gcc"
            ;;
    esac
    export "CARGO_TARGET_${upper}_RUSTFLAGS=-C target-feature=+crt-static -C link-self-contained=yes"
    CARGO_INCREMENTAL=0 lock cargo build --release --locked --target "$target" --bins "${packages[@]}"
}

# Stages the package tree for ARCH from the binaries in DIR, builds the .deb and the tarball.
package() {
    local dir=$1 arch=$2 name=$3 stage
    stage=$(mktemp -d)
    local root=$stage/deb
    install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" \
        "$root/usr/share/doc/rudder"
    for b in "${bins[@]}"; do
        [ -f "$dir/$b" ] || { echo "release: $dir/$b missing" >&2; return 1; }
        install -m 0755 "$dir/$b" "$root/usr/bin/$b"
    done
    install -m 0644 packaging/systemd/rudder-controller.service \
        packaging/systemd/rudder-agent.service "$root/lib/systemd/system/"
    install -m 0644 README.md "$root/usr/share/doc/rudder/README.md"
    for s in postinst prerm postrm; do
        install -m 0755 "packaging/deb/$s" "$root/DEBIAN/$s"
    done
    local size
    size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
    # Runtime dependencies, as the agent calls them: an OCI runtime and nft. It speaks netlink
    # itself (no ip, no iptables); tini-static serves `init: true`; iproute2 is for operators.
    cat >"$root/DEBIAN/control" <<CONTROL
Package: rudder
Version: $version
Architecture: $arch
Maintainer: Rudder developers <rudder@localhost>
Installed-Size: $size
Depends: runc | crun, nftables
Recommends: crun, tini, iproute2
Section: admin
Priority: optional
Description: Rudder container orchestrator (controller, agent, rctl)
 Runs OCI containers (crun or runc) across hosts with a raft-replicated controller,
 per-host agents and a WireGuard overlay. The units are installed but not enabled:
 run 'rudder init' on the first host and 'rudder join' on the others.
CONTROL
    # No conffile: `rudder init` / `rudder join` write /etc/rudder/rudder.toml.
    local deb="$out/rudder_${version}_${arch}.deb"
    dpkg-deb --root-owner-group -Z"$compress" -z"$level" --build "$root" "$deb" >/dev/null
    echo "release: $deb ($(du -h "$deb" | cut -f1))"
    # The tarball scripts/install.sh installs from: same files, flat.
    local tdir=$stage/rudder-$version-$name
    install -d -m 0755 "$tdir/bin" "$tdir/systemd"
    for b in "${bins[@]}"; do install -m 0755 "$dir/$b" "$tdir/bin/$b"; done
    install -m 0644 packaging/systemd/*.service "$tdir/systemd/"
    install -m 0755 scripts/install.sh "$tdir/install.sh"
    install -m 0644 README.md "$tdir/README.md"
    local tgz="$out/rudder-$version-$name.tar.gz"
    tar -C "$stage" --owner=0 --group=0 --numeric-owner --sort=name \
        -cf - "rudder-$version-$name" | gzip "-$level" -n >"$tgz"
    echo "release: $tgz ($(du -h "$tgz" | cut -f1))"
    rm -rf "$stage"
}

if [ -n "$bin_dir" ]; then
    # Fast mode: quick compression, the binaries as they are.
    compress=gzip level=1
    arch=${arch:-$(dpkg --print-architecture)}
    package "$bin_dir" "$arch" "$arch"
else
    compress=xz level=9
    for t in "${targets[@]}"; do
        start=$(date +%s)
        build "$t"
        for b in "${bins[@]}"; do
            file "target/$t/release/$b" 2>/dev/null | grep -q 'statically linked\|static-pie' ||
                { echo "release: target/$t/release/$b is not static" >&2; exit 1; }
        done
        echo "release: built $t in $(($(date +%s) - start)) s (with the wait for the cargo lock)"
        # Symbols off the shipped copies (a fifth of their size); target/ keeps them.
        stripped=$(mktemp -d)
        strip_tool=strip
        case "$t" in aarch64-*) strip_tool=aarch64-linux-gnu-strip ;; esac
        for b in "${bins[@]}"; do "$strip_tool" -o "$stripped/$b" "target/$t/release/$b"; done
        package "$stripped" "$(deb_arch "$t")" "$t"
        rm -rf "$stripped"
    done
fi
(cd "$out" && sha256sum -- *.deb *.tar.gz >SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)
echo "release: $out/SHA256SUMS"
