"""The names the node shares with the head, mirrored from qlimage/contract.py (which the node
cannot import: it runs without qlimage).  tests/test_node_contract.py keeps them equal."""

from __future__ import annotations

# The bundle's format version: the runner refuses any other.
BUNDLE_FORMAT = 1

# URL paths below <qlustar.http>: nodes/<mac with dashes>/bundle.json and its checksum file.
NODES_DIR = "nodes"
BUNDLE_FILE = "bundle.json"
CHECKSUM_SUFFIX = ".sha256"

# The cluster-wide public files below <qlustar.http>/cluster/, listed with their digests in
# SHA256SUMS: the runner installs only the names of this table, each at its node path.
CLUSTER_DIR = "cluster"
CLUSTER_SUMS = "SHA256SUMS"
CLUSTER_FILES = (
    ("shosts.equiv", "/etc/ssh/shosts.equiv"),
    ("ssh_known_hosts", "/etc/ssh/ssh_known_hosts"),
)
CLUSTER_FILE_MODE = 0o644

# Kernel command-line keys the runner reads.
CMDLINE_HTTP = "qlustar.http"
CMDLINE_BOOTIF = "BOOTIF"
CMDLINE_DEBUG = "debug"

# Files the bundle writes that the runner reads, and where Root FS Customization scripts live.
OPTIONS_DIR = "/etc/qlustar/options.d"
DISK_CONFIG = "disk-config"
DEFAULT_DISK_LABEL = "gpt"  # what the head means when the disk option names no label
DEFAULT_DISK_WIPE = "if-unformatted"
INIT_D_DIR = "/lib/qlustar/init.d"
