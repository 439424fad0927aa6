#!/usr/bin/env bash
# Build (once) and prepare a Debian trixie amd64 root file system: the base
# of Raspberry Pi OS's current release, with the Python 3.13 it ships, to run
# fedge's test suite on that Python natively (no emulation).
#
#   tests/py313/rootfs.sh ROOT [REPO [DATA]]  # build ROOT if it has no stamp; mount; sync
#   tests/py313/rootfs.sh ROOT --umount
#
# With REPO (a checkout), the checkout's files (tracked and untracked-but-not-
# ignored, as in the working tree; never written to) are copied to
# ROOT/work/main; DATA (a directory holding mnist.npz) is bind-mounted
# read-only at ROOT/work/shared/data, the $FEDGE_DATA inside (and the
# ../shared/data beside the copy). The virtualenv /opt/venv has
# $FEDGE_TORCH_SPEC (default torch==2.13.0) and `pip install -e ".[dev]"` of
# the copy, redone when pyproject.toml changes.
#
# Needs root and debootstrap (installed here from Debian's packages when
# missing). The host's CA bundle is copied in: without it downloads inside fail
# certificate verification on these machines.
set -euo pipefail

root="${1:?usage: rootfs.sh ROOT [REPO [DATA] | --umount]}"
action="${2:-}"
mirror="${FEDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
torch_spec="${FEDGE_TORCH_SPEC:-torch==2.13.0}"
# What the suite needs from Debian: the broker and its tools, openssl (TLS
# test certificates), make, Prometheus (the dashboard test), qemu-user (the
# export tests' emulated x86 CPU without VNNI), procps (ps, pkill in tests),
# and systemd, as Raspberry Pi OS (and the host) has it: install.sh checks for
# systemctl before its other options (never started here, a chroot has no init).
packages=(mosquitto mosquitto-clients openssl make prometheus qemu-user procps systemd)

umount_all() {
    for m in work/shared/data dev/shm dev/pts dev sys proc; do
        if mountpoint -q "$root/$m"; then umount "$root/$m" 2>/dev/null || umount -l "$root/$m"; fi
    done
}
if [ "$action" = --umount ]; then umount_all; exit 0; fi

[ "$(id -u)" = 0 ] || { echo "rootfs.sh: needs root (debootstrap, chroot, mount)" >&2; exit 2; }
command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }

in_root() {
    chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"
}

if [ ! -e "$root/.fedge-rootfs" ]; then
    umount_all
    rm -rf "$root"
    mkdir -p "$root"
    echo "==> debootstrap trixie amd64 into $root"
    debootstrap --arch=amd64 --variant=minbase --include=python3,python3-venv,ca-certificates \
        trixie "$root" "$mirror" >/dev/null
    date -u +%FT%TZ > "$root/.fedge-rootfs"
fi
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp /etc/hosts "$root/etc/hosts"
# A package's maintainer script must not start its daemon (mosquitto's would
# listen on 1883 of the host's loopback, which a chroot shares).
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
# pip inside verifies with the host's bundle (as the host's pip does), PyPI only.
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ntimeout = 180\ndisable-pip-version-check = true\n' \
    > "$root/etc/pip.conf"

for m in proc sys dev work/shared/data; do mkdir -p "$root/$m"; done
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
mountpoint -q "$root/sys" || mount -t sysfs sys "$root/sys"
mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
mountpoint -q "$root/dev/pts" || mount --bind /dev/pts "$root/dev/pts"
# Its own /dev/shm (POSIX semaphores of multiprocessing), not the host's.
mountpoint -q "$root/dev/shm" || mount -t tmpfs -o mode=1777,size=2g shm "$root/dev/shm"

if [ ! -e "$root/.fedge-packages" ] || [ "$(cat "$root/.fedge-packages")" != "${packages[*]}" ]; then
    echo "==> ${packages[*]} into $root"
    in_root apt-get update -qq
    in_root apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    echo "${packages[*]}" > "$root/.fedge-packages"
fi
if [ ! -e "$root/.fedge-torch" ] || [ "$(cat "$root/.fedge-torch")" != "$torch_spec" ]; then
    echo "==> /opt/venv with $torch_spec"
    rm -rf "$root/opt/venv"
    in_root python3 -m venv /opt/venv
    in_root /opt/venv/bin/python -m pip install -q --upgrade pip
    in_root /opt/venv/bin/python -m pip install -q "$torch_spec"
    echo "$torch_spec" > "$root/.fedge-torch"
    rm -f "$root/.fedge-dev"
fi

if [ -n "$action" ]; then
    repo="$(cd "$action" && pwd)"
    mountpoint -q "$root/work/shared/data" && umount "$root/work/shared/data"
    if [ -n "${3:-}" ]; then
        data="$(cd "$3" && pwd)"
        [ -f "$data/mnist.npz" ] || { echo "rootfs.sh: no mnist.npz in $data" >&2; exit 2; }
        mount --bind "$data" "$root/work/shared/data"
        mount -o remount,bind,ro "$root/work/shared/data"
    fi
    # The working tree as it is (others' uncommitted edits included), as a
    # fresh copy each time: files deleted in the checkout go from the copy too.
    echo "==> $repo -> $root/work/main"
    rm -rf "$root/work/main.new"
    mkdir -p "$root/work/main.new"
    git -C "$repo" ls-files -z --cached --others --exclude-standard \
        | (cd "$repo" && python3 -c '
import os, sys
names = [n for n in sys.stdin.buffer.read().split(b"\0") if n and os.path.lexists(n)]
sys.stdout.buffer.write(b"\0".join(names))') \
        | tar -C "$repo" --null -T - -cf - | tar -C "$root/work/main.new" -xf -
    # The editable install's metadata stays with the copy it describes.
    [ -d "$root/work/main" ] && find "$root/work/main" -maxdepth 1 -name '*.egg-info' -exec mv {} "$root/work/main.new/" \;
    rm -rf "$root/work/main"
    mv "$root/work/main.new" "$root/work/main"
    want="$torch_spec $(sha256sum "$root/work/main/pyproject.toml" | cut -d' ' -f1)"
    if [ ! -e "$root/.fedge-dev" ] || [ "$(cat "$root/.fedge-dev")" != "$want" ]; then
        echo "==> pip install -e .[dev] in $root/work/main"
        in_root sh -c 'cd /work/main && /opt/venv/bin/python -m pip install -q -e ".[dev]"'
        echo "$want" > "$root/.fedge-dev"
    fi
fi
echo "==> $root: $(in_root python3 --version), $(in_root /opt/venv/bin/python -c \
    'import numpy, torch; print(f"numpy {numpy.__version__}, torch {torch.__version__}")' 2>/dev/null || echo 'no torch yet')"
