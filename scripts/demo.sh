#!/bin/sh
# The main job: build the demo site (modules from Debian packages, kernel, initrd, squashfs image,
# pxelinux tree) and PXE-boot its demo node beo-01 in QEMU, printing the node's console.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
.venv/bin/qlimage build
exec .venv/bin/qlimage vm beo-01 "$@"
