#!/bin/sh
# Prepare a Debian 12 machine for qlimage (as root): Debian packages, a virtual environment in
# .venv and the package installed into it. Idempotent, and quick when everything is in place.
set -eu
cd "$(dirname "$0")/.."

PACKAGES="python3 python3-venv squashfs-tools cpio dpkg-dev kmod gzip xz-utils zstd
  pxelinux syslinux-common syslinux-utils qemu-system-x86 ipxe-qemu gpgv debian-archive-keyring
  dnsmasq-base udpcast systemd ifupdown openssh-client diffoscope-minimal fdisk e2fsprogs
  xfsprogs util-linux mount nfs-ganesha nfs-ganesha-vfs busybox-static nginx
  sssd-tools sssd-common chrony whois vim
  ovmf sbsigntool grub-common nftables mmdebstrap nfs-kernel-server socat gnuplot-nox"

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Packaged daemons (nginx) must not start on install: a system nginx on port 80 would
    # collide with the tests, and `qlimage serve` runs its own from the generated config.
    # policy-rc.d answering 101 tells invoke-rc.d and deb-systemd-invoke not to start them.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
    if [ -n "$policy" ]; then
        rm -f "$policy"
        trap - EXIT
    fi
    # ... nor at the next boot (only a daemon we just installed: never the admin's own). chrony
    # is here for `chronyd -p`, which parses the generated time configuration; nfs-kernel-server
    # for `exportfs`, which parses the generated chroot exports.
    for unit in nginx chrony nfs-kernel-server; do
        case " $missing " in *" $unit "*)
            if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
                systemctl disable --now "$unit.service" >/dev/null 2>&1 || true
            fi
        esac
    done
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.qlimage-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi
