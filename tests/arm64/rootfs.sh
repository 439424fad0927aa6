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
command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }

cache="$(dirname "$root")"
if [ "$(uname -m)" != aarch64 ]; then
    # Two emulators, because neither runs everything (both seen here):
    # - Debian bookworm's qemu-user 7.2 runs the agent and its training
    #   worker, but `import onnxruntime` (1.21 and later) dies in it with SIGSEGV;
    # - qemu-user 10 (bookworm-backports) imports ONNX Runtime, but a waiting
    #   thread of the agent's training pool spins there and the agent stalls.
    # 7.2 is the kernel's binfmt_misc handler for every arm64 program; the
    # newer one is copied into the root as /usr/local/bin/qemu-aarch64-ort and
    # named explicitly for what imports ONNX Runtime (the inference role).
    q72="$cache/qemu-7.2/usr/bin/qemu-aarch64-static"
    if [ ! -x "$q72" ]; then
        (cd "$cache" && apt-get download -qq "qemu-user-static/bookworm" 2>/dev/null \
            || { apt-get update -qq && apt-get download -qq "qemu-user-static/bookworm"; })
        dpkg-deb -x "$(ls -t "$cache"/qemu-user-static_*7.2*_amd64.deb | head -1)" "$cache/qemu-7.2"
    fi
    qnew=""
    for q in /usr/bin/qemu-aarch64 /usr/bin/qemu-aarch64-static; do
        if [ -x "$q" ] && [ "$("$q" --version | sed -n 's/.*version \([0-9]*\).*/\1/p' | head -1)" -ge 8 ]; then
            qnew="$q"; break
        fi
    done
    if [ -z "$qnew" ]; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/fedge-backports.list
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports qemu-user-static >/dev/null
        qnew=/usr/bin/qemu-aarch64
    fi
    file -L "$qnew" | grep -q "static" || { echo "rootfs.sh: $qnew is not statically linked" >&2; exit 2; }
    # binfmt_misc: mount it, and register 7.2 afresh with the F flag (the
    # kernel opens the interpreter now, so it works inside the chroot too).
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64
    magic='\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
    mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
    echo ":qemu-aarch64:M::$magic:$mask:$q72:OCF" > /proc/sys/fs/binfmt_misc/register
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
[ -n "${qnew:-}" ] && install -m 0755 "$qnew" "$root/usr/local/bin/qemu-aarch64-ort"
cp /etc/resolv.conf "$root/etc/resolv.conf"
for m in proc sys dev dev/pts; do mkdir -p "$root/$m"; done
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
mountpoint -q "$root/sys" || mount -t sysfs sys "$root/sys"
mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
mountpoint -q "$root/dev/pts" || mount --bind /dev/pts "$root/dev/pts"
# Raspberry Pi OS ships systemd: install.sh enables the unit in it (offline,
# as when an SD-card image is built in a chroot), and its systemd-analyze
# checks the unit there. (Roots cached before this step get it now.)
if [ ! -x "$root/usr/bin/systemd-analyze" ]; then
    echo "==> systemd into $root"
    chroot "$root" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
echo "==> $root: $(chroot "$root" uname -m), $(chroot "$root" python3 --version), $(chroot "$root" systemctl --version | head -1)"
