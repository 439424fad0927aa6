#!/usr/bin/env bash
# Build (once) and prepare an amd64 root file system of a distribution whose
# Python fedge supports, to run fedge's test suite on that Python natively (no
# emulation):
#
#   trixie  Debian 13, the base of Raspberry Pi OS's current release: Python 3.13
#   jammy   Ubuntu 22.04, the base of JetPack 6 on a Jetson: Python 3.10
#
#   tests/pyversions/rootfs.sh DIST ROOT [REPO [DATA]]  # build ROOT if it has no stamp; mount; sync
#   tests/pyversions/rootfs.sh DIST ROOT --umount
#
# With REPO (a checkout), the checkout's files (tracked and untracked-but-not-
# ignored, as in the working tree; never written to) are copied to
# ROOT/work/main; DATA (a directory holding mnist.npz) is bind-mounted
# read-only at ROOT/opt/fedge-data, the $FEDGE_DATA inside. The virtualenv
# /opt/venv has $FEDGE_TORCH_SPEC (default torch==2.13.0) and
# `pip install -e ".[dev]"` of the copy, redone when pyproject.toml changes.
#
# Needs root and debootstrap (installed here from Debian's packages when
# missing). The host's CA bundle is copied in: without it downloads inside fail
# certificate verification on these machines.
set -euo pipefail

dist="${1:?usage: rootfs.sh trixie|jammy ROOT [REPO [DATA] | --umount]}"
root="${2:?usage: rootfs.sh trixie|jammy ROOT [REPO [DATA] | --umount]}"
action="${3:-}"
debian_mirror="${FEDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
torch_spec="${FEDGE_TORCH_SPEC:-torch==2.13.0}"
data_at=opt/fedge-data  # where DATA is mounted inside (the $FEDGE_DATA there)
# What the suite needs from the distribution: the broker and its tools, openssl
# (TLS test certificates), make, Prometheus (the dashboard test), qemu-user (the
# export tests' emulated x86 CPU without VNNI), procps (ps, pkill in tests),
# and systemd, as Raspberry Pi OS, JetPack (and the host) have it: install.sh
# checks for systemctl before its other options (never started here, a chroot
# has no init).
packages=(mosquitto mosquitto-clients openssl make prometheus qemu-user procps systemd)
debian_qemu=""
case "$dist" in
    trixie)
        mirror="$debian_mirror"
        python=3.13
        bootstrap=(--components=main)
        sources="deb $mirror trixie main" ;;
    jammy)
        mirror="${FEDGE_UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}"
        python=3.10
        # jammy's qemu-user (6.2) emulates no AVX2, so its EPYC-Rome is an
        # SSE-only CPU whose int8 kernels never saturate: the export tests'
        # emulator is Debian trixie's instead (statically linked, 10.x).
        for i in "${!packages[@]}"; do [ "${packages[$i]}" != qemu-user ] || unset 'packages[i]'; done
        packages=("${packages[@]}")
        debian_qemu=qemu-x86_64
        # universe: mosquitto and prometheus. The updates and security
        # pockets: a Jetson's JetPack 6 is an up-to-date jammy (Python
        # 3.10.12, not the release's 3.10.4).
        bootstrap=(--components=main,universe)
        sources="deb $mirror jammy main universe
deb $mirror jammy-updates main universe
deb $mirror jammy-security main universe" ;;
    *) echo "rootfs.sh: DIST must be trixie or jammy, not '$dist'" >&2; exit 2 ;;
esac

umount_all() {
    for m in "$data_at" dev/shm dev/pts dev sys proc; do
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

# One file of a Debian trixie package: `from_debian PACKAGE PATH OUT`. The
# host's apt fetches the package from Debian's archive and verifies it with
# the host's debian-archive-keyring, in a scratch apt state (the host's own
# sources, lists and packages are left alone; apt downloads as root there,
# since its _apt user cannot write a mktemp directory).
from_debian() {
    local package="$1" path="$2" out="$3" tmp
    tmp="$(mktemp -d)"
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/deb"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $debian_mirror trixie main" \
        > "$tmp/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/nonexistent
                -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o Debug::NoLocking=1
                -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" -qq update
    (cd "$tmp/deb" && apt-get "${opts[@]}" -qq download "$package")
    dpkg-deb -x "$tmp"/deb/"${package}"_*.deb "$tmp/x"
    cp "$tmp/x/$path" "$out"
    rm -rf "$tmp"
}

# Ubuntu's archive key, for debootstrap to verify jammy's Release file:
# Debian ships it in its ubuntu-keyring package (trixie and newer; bookworm,
# the host's release, has none).
ubuntu_keyring() {
    local host=/usr/share/keyrings/ubuntu-archive-keyring.gpg
    if [ -s "$host" ]; then cp "$host" "$1"; else from_debian ubuntu-keyring "${host#/}" "$1"; fi
}

if [ ! -e "$root/.fedge-rootfs" ]; then
    umount_all
    rm -rf "$root"
    mkdir -p "$root"
    keyring=()
    if [ "$dist" = jammy ]; then
        ubuntu_keyring "$root.keyring.gpg"
        keyring=(--keyring="$root.keyring.gpg")
    fi
    echo "==> debootstrap $dist amd64 into $root"
    debootstrap --arch=amd64 --variant=minbase "${bootstrap[@]}" "${keyring[@]}" \
        --include=python3,python3-venv,ca-certificates "$dist" "$root" "$mirror" >/dev/null
    rm -f "$root.keyring.gpg"
    printf '%s\n' "$sources" > "$root/etc/apt/sources.list"
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

for m in proc sys dev "$data_at"; do mkdir -p "$root/$m"; done
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
mountpoint -q "$root/sys" || mount -t sysfs sys "$root/sys"
mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
mountpoint -q "$root/dev/pts" || mount --bind /dev/pts "$root/dev/pts"
# Its own /dev/shm (POSIX semaphores of multiprocessing), not the host's.
mountpoint -q "$root/dev/shm" || mount -t tmpfs -o mode=1777,size=2g shm "$root/dev/shm"

want="${packages[*]}${debian_qemu:+ $debian_qemu(debian)}"
if [ ! -e "$root/.fedge-packages" ] || [ "$(cat "$root/.fedge-packages")" != "$want" ]; then
    echo "==> $want into $root"
    in_root apt-get update -qq
    in_root apt-get upgrade -y -qq >/dev/null
    in_root apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    if [ -n "$debian_qemu" ]; then
        from_debian qemu-user "usr/bin/$debian_qemu" "$root/usr/local/bin/$debian_qemu"
        chmod 0755 "$root/usr/local/bin/$debian_qemu"
    fi
    echo "$want" > "$root/.fedge-packages"
fi
# Again: a ca-certificates upgrade just now (jammy-updates has one) rewrote it.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
in_root python3 -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$python'.split('.'))), sys.version" \
    || { echo "rootfs.sh: $dist's python3 is not Python $python" >&2; exit 1; }
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
    mountpoint -q "$root/$data_at" && umount "$root/$data_at"
    if [ -n "${4:-}" ]; then
        data="$(cd "$4" && pwd)"
        [ -f "$data/mnist.npz" ] || { echo "rootfs.sh: no mnist.npz in $data" >&2; exit 2; }
        mount --bind "$data" "$root/$data_at"
        mount -o remount,bind,ro "$root/$data_at"
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
