#!/usr/bin/env bash
# Install fedge for one role on this machine: a virtualenv, a system user, a
# config file to edit, a state directory and a systemd unit.
#
#   sudo deploy/install.sh agent        # a device that trains (Raspberry Pi, Jetson)
#   sudo deploy/install.sh inference    # a device that only serves the published ONNX model
#   sudo deploy/install.sh aggregator   # the server beside the MQTT broker
#
# Options:
#   --prefix DIR          where the virtualenv goes (default /opt/fedge)
#   --etc DIR             where config files go (default /etc/fedge)
#   --python PY           interpreter for the virtualenv (default python3; 3.10 or newer)
#   --system-site-packages  let the virtualenv see the system's packages: on a Jetson,
#                         JetPack's PyTorch is used and none comes from PyPI (agent: it
#                         must be importable by the system Python, 2.3 or newer)
#   --worker-python PY    agent: train with this interpreter's PyTorch (a Jetson's
#                         /usr/bin/python3 with JetPack's); none is installed from PyPI,
#                         and the new config's [worker] python names PY
#   --torch SPEC          install PyTorch from this spec first, e.g. "torch==2.5.1" or
#                         a wheel file (default on aarch64: torch==2.9.1, PyPI's CPU-only
#                         build there; elsewhere whatever pip resolves for fedge[agent])
#   --aggregator-key KEY  agent, inference: the aggregator's public key (ed25519:..., as
#                         `fedge aggregator` logs it), pinned in ETC/aggregator.pub
#   --no-service          do not install the systemd unit (containers, tests)
#
# A device's key pair is made once, in ETC/device.key (0600, never leaves the
# device); its public key is printed for the operator to enroll on the
# aggregator's host (`fedge enroll`).
#
# Run it again to upgrade: the virtualenv is updated, configs are never overwritten.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }

role="${1:-}"
case "$role" in ""|-h|--help) usage ;; esac
shift
prefix=/opt/fedge etc=/etc/fedge python=python3 torch_spec="" service=1 venv_flags=() aggregator_key=""
worker_python=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --etc) etc="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --torch) torch_spec="$2"; shift 2 ;;
        --system-site-packages) venv_flags+=(--system-site-packages); shift ;;
        --worker-python) worker_python="$2"; shift 2 ;;
        --no-service) service=0; shift ;;
        --aggregator-key) aggregator_key="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

case "$role" in
    agent) extras=agent; config=agent.toml; unit=fedge-agent.service ;;
    inference) extras=inference; config=agent.toml; unit=fedge-agent.service ;;
    aggregator) extras=aggregator; config=job.toml; unit=fedge-aggregator.service ;;
    *) echo "install.sh: role must be agent, inference or aggregator, not '$role'" >&2; exit 2 ;;
esac
if [ -n "$worker_python" ]; then
    [ "$role" = agent ] || { echo "install.sh: --worker-python is for the agent role" >&2; exit 2; }
    case "$worker_python" in
        /*) [ -x "$worker_python" ] || { echo "install.sh: --worker-python $worker_python is not an executable" >&2
                                         exit 2; } ;;
        *) echo "install.sh: --worker-python needs a full path (e.g. /usr/bin/python3), not '$worker_python'" >&2
           exit 2 ;;
    esac
fi
if [ -n "$aggregator_key" ]; then
    [ "$role" != aggregator ] || { echo "install.sh: --aggregator-key is for agent and inference" >&2; exit 2; }
    case "$aggregator_key" in
        ed25519:*) ;;
        *) echo "install.sh: --aggregator-key must be the key the aggregator logs (ed25519:...), not '$aggregator_key'" >&2
           exit 2 ;;
    esac
fi

# The options are checked; now the machine.
if [ "$service" = 1 ] && ! command -v systemctl >/dev/null; then
    echo "install.sh: no systemd here (no systemctl): pass --no-service and run '$role' under your own supervisor" >&2
    exit 2
fi

# PyTorch and ONNX Runtime publish wheels for 64-bit ARM and x86-64 only: on a
# 32-bit OS (Raspberry Pi OS armhf) pip would build for hours, then fail.
arch="$(uname -m)"
case "$arch" in
    armv6l|armv7l|armv8l|armhf|arm)
        echo "install.sh: this is a 32-bit ARM system ($arch): PyTorch and ONNX Runtime publish no wheels for it;" \
             "install the 64-bit Raspberry Pi OS (or another aarch64 OS) and run this again" >&2
        exit 2 ;;
esac
# On aarch64, PyPI's newest torch wheels bring several GB of CUDA libraries
# that a Raspberry Pi can never use; 2.9.1 is PyPI's CPU-only build there
# (about 0.7 GB). A Jetson keeps JetPack's PyTorch: --system-site-packages,
# or --torch with NVIDIA's wheel.
ARM64_TORCH="torch==2.9.1"
if [ "$arch" = aarch64 ] && [ -z "$torch_spec" ] && [ "$role" = agent ] \
        && [ ${#venv_flags[@]} -eq 0 ] && [ -z "$worker_python" ]; then
    torch_spec="$ARM64_TORCH"
fi

src="$(cd "$(dirname "$0")/.." && pwd)"
"$python" - <<'PY' || { echo "install.sh: fedge needs Python 3.10 or newer (--python to pick one)" >&2; exit 2; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

"$python" -c "import venv, ensurepip" 2>/dev/null || {
    echo "install.sh: $python cannot make a virtualenv (no venv/ensurepip module): apt install python3-venv" >&2
    exit 2; }

# A Jetson's PyTorch is NVIDIA's build for JetPack, installed for the system
# Python. --system-site-packages (the virtualenv sees it) or --worker-python
# (that interpreter trains) reuse it, and pip must not replace it with PyPI's:
# its version, e.g. 2.5.0a0+872d972e41.nv24.08, is a pre-release pip would not
# count as satisfying fedge[agent]'s torch>=2.3, so fedge goes in without that
# extra, with the rest of what it brings (fedge[secagg], for secure-aggregation
# rounds). Checked before anything is made, with -s (the service user never
# sees root's ~/.local); for --system-site-packages by the interpreter the
# virtualenv is based on, whose packages it will see (not a virtualenv's).
torch_of() {
    "$1" -s - <<'PY' 2>/dev/null || true
import os, re, torch
release = tuple(int(n) for n in re.findall(r"\d+", torch.__version__.split("+")[0])[:2])
print("ok" if release >= (2, 3) else "old", torch.__version__, os.path.dirname(torch.__file__))
PY
}
extras_spec="[$extras]"
trainer=""
if [ "$role" = agent ] && [ -z "$torch_spec" ]; then
    if [ -n "$worker_python" ]; then
        trainer="$worker_python"
    elif [ ${#venv_flags[@]} -gt 0 ]; then
        trainer="$("$python" -c 'import sys; print(getattr(sys, "_base_executable", "") or sys.executable)')"
    fi
fi
if [ -n "$worker_python" ]; then
    # The worker imports fedge and its packages from the agent's virtualenv:
    # compiled ones (numpy, cryptography) load only into the same Python.
    mine="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    theirs="$("$worker_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "?")"
    if [ "$mine" != "$theirs" ]; then
        echo "install.sh: --worker-python $worker_python is Python $theirs and the virtualenv's $python is $mine:" \
             "the worker loads the virtualenv's packages, so pass --python $worker_python too" >&2
        exit 2
    fi
fi
if [ -n "$trainer" ]; then
    found="$(torch_of "$trainer")"
    case "$found" in
        ok\ *) system_torch="${found#ok }"; extras_spec="[secagg]" ;;
        old\ *) old="${found#old }"
                echo "install.sh: the system's PyTorch ${old% *} (${old#* }) is older than 2.3, which fedge's training" \
                     "worker needs: upgrade JetPack (6.x ships 2.3 or newer) or pass --torch with a newer wheel" >&2
                exit 2 ;;
        *) if [ -n "$worker_python" ]; then
               echo "install.sh: --worker-python $worker_python cannot import PyTorch: install JetPack's PyTorch" \
                    "(NVIDIA's wheel) for it, or name the interpreter it is installed for" >&2
           else
               echo "install.sh: --system-site-packages, but $python sees no PyTorch outside ~/.local: install" \
                    "JetPack's PyTorch (NVIDIA's wheel) system-wide, pass --torch SPEC, or drop --system-site-packages" >&2
           fi
           exit 2 ;;
    esac
fi

if [ "$(id -u)" = 0 ] && ! id fedge >/dev/null 2>&1; then
    useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin fedge
fi

echo "==> virtualenv in $prefix/venv"
mkdir -p "$prefix"
"$python" -m venv "${venv_flags[@]}" "$prefix/venv"
pip="$prefix/venv/bin/python -m pip"
$pip install --quiet --upgrade pip
if [ -n "$torch_spec" ] && [ "$role" != inference ]; then
    echo "==> PyTorch: $torch_spec"
    $pip install --quiet "$torch_spec"
elif [ -n "${system_torch:-}" ]; then
    echo "==> PyTorch: the system's, ${system_torch% *} (${system_torch#* }); none from PyPI"
fi
echo "==> fedge$extras_spec from $src"
$pip install --quiet "$src$extras_spec"

echo "==> config in $etc"
mkdir -p "$etc"
if [ ! -e "$etc/$config" ]; then
    if [ "$role" = inference ]; then
        sed -e 's/^\[agent\]$/[agent]\nrole = "inference"/' -e "s#/etc/fedge/#$etc/#g" \
            "$src/deploy/examples/agent.toml" > "$etc/$config"
    else
        sed -e "s#/etc/fedge/#$etc/#g" "$src/deploy/examples/$config" > "$etc/$config"
    fi
    if [ -n "$worker_python" ]; then
        sed -i "/^\[worker\]\$/a python = \"$worker_python\"     # trains with this interpreter's PyTorch" "$etc/$config"
    fi
    chmod 0640 "$etc/$config"
    created=1
else
    created=0
fi
if id fedge >/dev/null 2>&1; then
    chgrp -R fedge "$etc" 2>/dev/null || true
fi
enroll=""
if [ "$role" != aggregator ]; then
    if [ -n "$aggregator_key" ]; then
        echo "$aggregator_key" > "$etc/aggregator.pub"
        chmod 0644 "$etc/aggregator.pub"
    fi
    if [ ! -e "$etc/device.key" ]; then
        echo "==> this device's key pair in $etc/device.key"
        "$prefix/venv/bin/fedge" keys new --out "$etc/device.key" > /dev/null 2>&1
        if id fedge >/dev/null 2>&1; then
            chown fedge:fedge "$etc/device.key" 2>/dev/null || true
        fi
    fi
    enroll="$("$prefix/venv/bin/fedge" keys show "$etc/device.key")"
fi

if [ "$service" = 1 ]; then
    echo "==> systemd unit $unit"
    sed -e "s#/opt/fedge/venv#$prefix/venv#g" -e "s#/etc/fedge#$etc#g" \
        "$src/deploy/systemd/$unit" > "/etc/systemd/system/$unit"
    # An SD-card image built in a chroot has no running systemd: enable works
    # offline (the unit starts at first boot); only a running one is reloaded.
    if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
    systemctl enable --quiet "$unit"
fi

"$prefix/venv/bin/fedge" --version
echo
if [ -n "$worker_python" ] && [ "$created" = 0 ]; then
    echo "Training uses $worker_python: set [worker] python = \"$worker_python\" in $etc/$config."
fi
[ "$created" = 1 ] && echo "Edit $etc/$config (every key: $prefix/venv/bin/fedge config ${role/inference/agent})."
if [ -n "$enroll" ]; then
    echo "Enroll this device on the aggregator's host: fedge enroll --config job.toml <its agent.id> $enroll"
    [ -e "$etc/aggregator.pub" ] || echo "Pin the aggregator's key: rerun with --aggregator-key ed25519:... (it logs it at start)"
fi
if [ "$service" = 1 ]; then
    if [ -d /run/systemd/system ]; then
        echo "Then: systemctl start $unit; journalctl -u $unit -f"
    else
        echo "$unit is enabled and starts at boot (systemd is not running here)."
    fi
fi
exit 0
