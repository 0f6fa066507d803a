"""Paths and timeouts on the node.

Module-level constants that the other modules read at call time (`paths.LOG_DIR`), so that
tests can redirect them with monkeypatch.setattr(paths, ...).
"""

from __future__ import annotations

from . import names

CMDLINE_FILE = "/proc/cmdline"
NET_ENV_FILE = "/run/qlustar/net.env"
SYS_NET_DIR = "/sys/class/net"
LOG_DIR = "/var/log/qlustar"
INIT_D_DIR = names.INIT_D_DIR
HOSTNAME_FILE = "/etc/hostname"
DISK_CONFIG_FILE = f"{names.OPTIONS_DIR}/{names.DISK_CONFIG}"
FSTAB_FILE = "/etc/fstab"
MOUNTS_FILE = "/proc/self/mounts"  # what is mounted: a partition mounted already is kept
SWAPS_FILE = "/proc/swaps"  # active swap areas

# Used when the environment has no PATH: init.qlustar runs us with a minimal environment.
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

FETCH_TIMEOUT = 20.0  # seconds per HTTP request
# Pauses between fetch attempts: the head's web server or the network may need a moment
# right after the NIC came up, but a node must not hang in boot for long.
RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0, 4.0)
# A hung command must not block the boot forever, yet disk initialization scripts may
# legitimately take a long time.
COMMAND_TIMEOUT = 3600.0
# How long to wait for a partition's device node (udev, or the kernel's re-read) to appear.
PARTITION_WAIT = 5.0
# The time option's file (written by the bundle, read by the runner before it writes anything)
# and how long the one attempt to set the clock from the head may take: a head that does not
# answer must not hold up the boot.
TIME_FILE = f"{names.OPTIONS_DIR}/time"
TIME_SYNC_TIMEOUT = 10
