#!/usr/bin/env bash
# Boots this host's own systemd (/lib/systemd/systemd) as PID 1 of fresh pid, mount, uts, ipc,
# net and cgroup namespaces: a throwaway "machine" that runs Rudder's units under a real
# systemd, the way systemd runs in a container (systemd's Container Interface: `container=`
# in the environment, a private /run and /tmp, /sys read-only with the cgroup trees mounted, a
# delegated cgroup subtree of its own). Used by tests/tests/systemd_units.rs; by hand:
#
#   scripts/systemd-machine.sh NAME DIR [SHARE]     (stays in the foreground: systemd's stdio)
#
# NAME: host name and the cgroup subtree `rudder-machine-NAME` made in every hierarchy of this
# host. DIR (empty or missing): the machine's writable layers and state. SHARE: a directory
# bind-mounted read-only at /srv/share. Enter it with `nsenter -t PID -a CMD`, PID being the
# child of this process (systemd); kill that PID with SIGKILL to end the machine: every process
# of its pid namespace dies with it, its mounts with the last of them. The caller then removes
# the cgroup subtree (rmdir, deepest first) and DIR.
#
# The root is a tmpfs holding: /usr, /etc and /var as overlays over the host's (writes go to
# DIR/upper), /etc/systemd/system empty (none of the host's enabled units start), /var/lib/rudder
# on DIR/state (a real filesystem: the agent's container layers are overlay mounts, which an
# overlay cannot hold), fresh /proc (its /proc/sys read-only but for /proc/sys/net, so no sysctl
# reaches the host's kernel), /sys read-only, /dev with the basic nodes only, tmpfs /run, /tmp.
# systemd boots basic.target (journald, tmpfiles: no getty, no host daemon).
set -euo pipefail
name=${1:?usage: systemd-machine.sh NAME DIR [SHARE]}
dir=${2:?usage: systemd-machine.sh NAME DIR [SHARE]}
share=${3:-}
case "$name" in *[!a-z0-9-]* | "") echo "systemd-machine: bad name $name" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "systemd-machine: must run as root" >&2; exit 1; }
[ -x /lib/systemd/systemd ] || { echo "systemd-machine: /lib/systemd/systemd missing (apt-get install systemd)" >&2; exit 1; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
cg=rudder-machine-$name

# This host's cgroup hierarchies (mount point, type, options), from mountinfo.
mapfile -t hier < <(awk '$9 == "cgroup" || $9 == "cgroup2" {
    split($0, halves, " - "); split(halves[2], f, " ");
    sub(/^rw,?|^ro,?/, "", f[3]); print $5 " " f[1] " " f[3] }' /proc/self/mountinfo)
[ ${#hier[@]} -gt 0 ] || { echo "systemd-machine: no cgroup hierarchy mounted" >&2; exit 1; }
cg_top=$(findmnt -n -o FSTYPE /sys/fs/cgroup || true)
# The machine's subtree in every hierarchy, this shell moved into it: the cgroup namespace
# made below is rooted there, so systemd manages that subtree and nothing else.
for h in "${hier[@]}"; do
    set -- $h
    mkdir -p "$1/$cg"
    if [ -e "$1/cpuset.cpus" ] && [ ! -e "$1/cgroup.controllers" ]; then
        cat "$1/cpuset.cpus" >"$1/$cg/cpuset.cpus"
        cat "$1/cpuset.mems" >"$1/$cg/cpuset.mems"
    fi
    echo $$ >"$1/$cg/cgroup.procs"
done

mkdir -p "$dir/root" "$dir/state"
for d in usr etc var; do mkdir -p "$dir/upper/$d" "$dir/work/$d"; done
echo "$name" >"$dir/upper/etc/hostname"
# Its own machine id (journal directory, D-Bus), never the host's.
od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$dir/upper/etc/machine-id"
echo >>"$dir/upper/etc/machine-id"

export MACHINE_DIR=$dir MACHINE_SHARE=$share MACHINE_NAME=$name MACHINE_CG_TOP=$cg_top
export MACHINE_HIER
MACHINE_HIER=$(printf '%s\n' "${hier[@]}")
# --kill-child: should this process die, systemd (and with it the whole machine) dies too.
exec unshare --fork --kill-child --pid --mount --uts --ipc --net --cgroup --propagation private \
    bash -c '
set -euo pipefail
d=$MACHINE_DIR r=$MACHINE_DIR/root
mount -t tmpfs -o mode=755 machine-root "$r"
for x in usr etc var; do
    mkdir -p "$r/$x"
    mount -t overlay overlay -o "lowerdir=/$x,upperdir=$d/upper/$x,workdir=$d/work/$x" "$r/$x"
done
for x in bin sbin lib lib32 lib64 libx32; do
    if [ -L "/$x" ]; then ln -s "$(readlink "/$x")" "$r/$x"
    elif [ -d "/$x" ]; then mkdir "$r/$x"; mount --bind -o ro "/$x" "$r/$x"; fi
done
mkdir -p "$r"/{proc,sys,dev,run,tmp,root,home,srv,mnt,opt}
chmod 700 "$r/root"
mount -t tmpfs -o mode=755 machine-units "$r/etc/systemd/system"
mkdir -p "$r/var/lib/rudder"
mount --bind "$d/state" "$r/var/lib/rudder"
if [ -n "$MACHINE_SHARE" ]; then
    mkdir -p "$r/srv/share"
    mount --bind -o ro "$MACHINE_SHARE" "$r/srv/share"
fi

mount -t proc -o nosuid,nodev,noexec proc "$r/proc"
mount --bind "$r/proc/sys/net" "$r/proc/sys/net"
mount --rbind "$r/proc/sys" "$r/proc/sys"
mount -o remount,bind,ro "$r/proc/sys"
if [ -e "$r/proc/sysrq-trigger" ]; then
    mount --bind -o ro "$r/proc/sysrq-trigger" "$r/proc/sysrq-trigger"
fi

mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$r/sys"
if [ "$MACHINE_CG_TOP" = tmpfs ]; then
    mount -t tmpfs -o mode=755,nosuid,nodev,noexec cgroup "$r/sys/fs/cgroup"
fi
while read -r at fstype opts; do
    mkdir -p "$r$at"
    mount -t "$fstype" -o "nosuid,nodev,noexec${opts:+,$opts}" cgroup "$r$at"
done <<<"$MACHINE_HIER"

mount -t tmpfs -o mode=755,nosuid machine-dev "$r/dev"
for n in null zero full random urandom tty; do
    touch "$r/dev/$n"; mount --bind "/dev/$n" "$r/dev/$n"
done
if [ -e /dev/net/tun ]; then
    mkdir "$r/dev/net"; touch "$r/dev/net/tun"; mount --bind /dev/net/tun "$r/dev/net/tun"
fi
mkdir "$r/dev/pts" "$r/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,nosuid,noexec devpts "$r/dev/pts"
ln -s pts/ptmx "$r/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$r/dev/shm"
ln -s /proc/self/fd "$r/dev/fd"
ln -s /proc/self/fd/0 "$r/dev/stdin"
ln -s /proc/self/fd/1 "$r/dev/stdout"
ln -s /proc/self/fd/2 "$r/dev/stderr"

mount -t tmpfs -o mode=755,nosuid,nodev machine-run "$r/run"
mount -t tmpfs -o mode=1777,nosuid,nodev machine-tmp "$r/tmp"
hostname "$MACHINE_NAME"

cd "$r"
mkdir .old
pivot_root . .old
umount -l /.old
rmdir /.old
exec env -i container=rudder-machine PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --unit=basic.target
'
