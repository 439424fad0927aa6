#!/usr/bin/env bash
# Build (once) and prepare a Debian bookworm arm64 root file system, run
# under qemu-user through the kernel's binfmt_misc: the base a Raspberry Pi
# OS Lite 64-bit is built on, with the python3 it ships and nothing of ours.
#
#   tests/arm64/rootfs.sh ROOT      # build ROOT if it has no stamp; mount /proc, /sys, /dev
#   tests/arm64/rootfs.sh ROOT --umount
#
# Needs root, debootstrap and qemu-user-static (installed here from Debian's
# packages when missing). The host's CA bundle is copied in: without it
# downloads inside fail certificate verification on these machines.
set -euo pipefail

root="${1:?usage: rootfs.sh ROOT [--umount]}"
action="${2:-}"
mirror="${FEDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

umount_all() {
    for m in dev/pts dev sys proc; do
        mountpoint -q "$root/$m" && umount -l "$root/$m" || true
    done
}
if [ "$action" = --umount ]; then umount_all; exit 0; fi

[ "$(id -u)" = 0 ] || { echo "rootfs.sh: needs root (debootstrap, chroot, binfmt_misc)" >&2; exit 2; }
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || need+=(qemu-user-static)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# binfmt_misc: mount it, and register aarch64 with the F flag (the kernel
# opens the interpreter now, so it works inside the chroot too).
if [ "$(uname -m)" != aarch64 ]; then
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
    fi
    grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || {
        echo "rootfs.sh: qemu-aarch64 is registered without the F flag; unregister it (echo -1 >" \
             "/proc/sys/fs/binfmt_misc/qemu-aarch64) and run again" >&2; exit 2; }
fi

if [ ! -e "$root/.fedge-rootfs" ]; then
    rm -rf "$root"
    mkdir -p "$root"
    echo "==> debootstrap bookworm arm64 into $root (first stage)"
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv,ca-certificates,procps \
        bookworm "$root" "$mirror" >/dev/null
    echo "==> second stage, under qemu-aarch64"
    chroot "$root" /debootstrap/debootstrap --second-stage >/dev/null
    date -u +%FT%TZ > "$root/.fedge-rootfs"
fi
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$root/etc/resolv.conf"
for m in proc sys dev dev/pts; do mkdir -p "$root/$m"; done
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
mountpoint -q "$root/sys" || mount -t sysfs sys "$root/sys"
mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
mountpoint -q "$root/dev/pts" || mount --bind /dev/pts "$root/dev/pts"
echo "==> $root: $(chroot "$root" uname -m), $(chroot "$root" python3 --version)"
