#!/usr/bin/python3
"""qlustar-runner: the boot-time node runner of a Qlustar-style node OS image.

The qlimage pipeline copies this file verbatim into every node image as
/usr/lib/qlustar/qlustar-runner, so it uses nothing but the Python standard library and
imports nothing from qlimage.  /sbin/init.qlustar calls it once after udev and before the
final init (the role of QluMan execd's one-shot configure mode):

 1. read the node's identity from /proc/cmdline (qlustar.http=, BOOTIF=, debug) and the
    initrd's DHCP lease in /run/qlustar/net.env;
 2. fetch <qlustar.http>/nodes/<mac>/bundle.json and its .sha256 from the head, verify and
    validate the whole bundle before anything is written;
 3. write the bundle's files, directories and symlinks atomically;
 4. perform the bundle's actions (hostname, IPMI address, commands, lines ensured in
    files of the image);
 5. initialize and mount the local disk described by /etc/qlustar/options.d/disk-config,
    if the bundle has one and the disk is present (see "Local disk" below);
 6. run the executables in /lib/qlustar/init.d in byte-wise sorted order.

Everything is reported as `qlustar: ...` lines on the console and logged under
/var/log/qlustar.  Exit statuses: see EXIT_* below.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import grp
import hashlib
import http.client
import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

# Exit statuses (init.qlustar only logs a non-zero status and continues to the final init).
EXIT_OK = 0  # bundle applied; failed actions, disk setup and scripts are in the summary line
EXIT_INTERNAL = 1  # unexpected error in the runner itself (a bug; traceback in runner.log)
EXIT_USAGE = 2  # bad command-line arguments (argparse)
EXIT_UNCONFIGURED = 3  # no usable bundle: nothing was written, no actions, no scripts
EXIT_PARTIAL = 4  # writing the bundle failed part-way: actions, disk and scripts skipped

BUNDLE_FORMAT = 1

# Paths on the node.  Module-level (and read at call time) so tests can redirect them.
CMDLINE_FILE = "/proc/cmdline"
NET_ENV_FILE = "/run/qlustar/net.env"
SYS_NET_DIR = "/sys/class/net"
LOG_DIR = "/var/log/qlustar"
INIT_D_DIR = "/lib/qlustar/init.d"
HOSTNAME_FILE = "/etc/hostname"
DISK_CONFIG_FILE = "/etc/qlustar/options.d/disk-config"
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

Fetcher = Callable[[str], bytes]


class Runner(Protocol):
    """Runs argv (no shell) and returns (exit status, stdout+stderr). `input`, when given,
    is the command's standard input; callers pass it only when they need it, so a runner
    taking just argv still serves every other command."""

    def __call__(self, argv: Sequence[str], input: str | None = None) -> tuple[int, str]: ...


class BundleError(Exception):
    """The bundle cannot be used; the node stays unconfigured."""


class FetchError(BundleError):
    """The bundle could not be fetched or its checksum does not match."""


# --------------------------------------------------------------------------------------
# Reporting


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


class Reporter:
    """`qlustar: ...` lines on the console for the admin watching the boot; the same
    lines plus details and command output in runner.log."""

    def __init__(self, *, debug: bool = False) -> None:
        self.debug = debug
        self._log: TextIO | None = None

    def open_log(self, log_dir: str) -> None:
        try:
            create_log_dir(log_dir)
            # Kept open for the whole run and closed by close().
            self._log = open(  # noqa: SIM115
                os.path.join(log_dir, "runner.log"), "a", encoding="utf-8"
            )
        except OSError as e:
            # Logging is a convenience; configuring the node matters more.
            self.warn(f"cannot open {log_dir}/runner.log ({e}); logging to the console only")

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def step(self, message: str) -> None:
        self._console(message)
        self._write(message)

    def warn(self, message: str) -> None:
        self.step(f"WARNING: {message}")

    def error(self, message: str) -> None:
        self.step(f"ERROR: {message}")

    def detail(self, message: str) -> None:
        """Always logged; shown on the console only with `debug` on the kernel cmdline."""
        self._write(message)
        if self.debug:
            self._console(message)

    def output(self, label: str, text: str) -> None:
        """Log a command's output, one line per output line, tagged with `label`."""
        for line in text.splitlines():
            self.detail(f"[{label}] {line}")

    def _console(self, message: str) -> None:
        # Looked up per call: the console stream may be replaced (and is, under pytest).
        print(f"qlustar: {message}", file=sys.stdout, flush=True)

    def _write(self, message: str) -> None:
        if self._log is None:
            return
        try:
            self._log.write(f"{timestamp()} {message}\n")
            self._log.flush()  # the node may hang or be reset at any later point
        except OSError:
            self._log = None


def create_log_dir(path: str) -> None:
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o755, exist_ok=True)
        os.chmod(path, 0o755)  # independent of the umask


def append_file(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


# --------------------------------------------------------------------------------------
# Node identity: kernel command line and the initrd's DHCP lease


def parse_cmdline(text: str) -> dict[str, str]:
    """Kernel parameters as a dict; a bare flag such as `debug` maps to ""."""
    try:
        tokens = shlex.split(text)  # the kernel accepts double-quoted values
    except ValueError:
        tokens = text.split()
    params: dict[str, str] = {}
    for token in tokens:
        key, _, value = token.partition("=")
        params[key] = value
    return params


def parse_net_env(text: str) -> dict[str, str]:
    """Shell-style KEY=value lines as written by the initrd's udhcpc hook."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        # DNS='10.0.2.3 10.0.2.4'; on an unbalanced quote keep the raw value.
        with contextlib.suppress(ValueError):
            value = " ".join(shlex.split(value))
        env[key.strip()] = value
    return env


_OCTET = re.compile(r"^[0-9a-f]{2}$")


def mac_from_bootif(value: str) -> str | None:
    """`01-52-54-00-12-34-56` (pxelinux: ARP hardware type, then the MAC) -> `52:54:00:...`."""
    parts = value.strip().lower().replace(":", "-").split("-")
    if len(parts) == 7:
        parts = parts[1:]
    if len(parts) != 6 or not all(_OCTET.match(p) for p in parts):
        return None
    return ":".join(parts)


def mac_from_nic(nic: str) -> str | None:
    """Fallback when the boot loader passed no BOOTIF: the MAC of the NIC the initrd used."""
    if not nic or "/" in nic:
        return None
    try:
        with open(os.path.join(SYS_NET_DIR, nic, "address"), encoding="ascii") as f:
            return mac_from_bootif(f.read())
    except OSError:
        return None


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def bundle_url(base: str, mac: str) -> str:
    return f"{base.rstrip('/')}/nodes/{mac.replace(':', '-').lower()}/bundle.json"


def check_base_url(base: str) -> None:
    parsed = urllib.parse.urlsplit(base)
    # Only the head's web server may configure a node; a file:// URL would read node files.
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise BundleError(f"qlustar.http={base!r} is not an http(s) URL")


# --------------------------------------------------------------------------------------
# Fetching and verifying


def fetch_url(url: str) -> bytes:
    """GET `url`; raises OSError (URLError, HTTPError, TimeoutError) or
    http.client.HTTPException on failure."""
    # No proxies: the head is on the cluster network, and a stray http_proxy in the boot
    # environment must not divert the node's configuration.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"User-Agent": "qlustar-runner/1"})
    with opener.open(request, timeout=FETCH_TIMEOUT) as response:
        data: bytes = response.read()
        return data


def is_permanent(error: Exception) -> bool:
    """A 404 means the head has no bundle for this node: retrying will not help."""
    if isinstance(error, urllib.error.HTTPError):
        return 400 <= error.code < 500 and error.code not in (408, 429)
    return isinstance(error, ValueError)  # malformed URL


def parse_checksum_file(data: bytes) -> str:
    """`<hex>  bundle.json` (sha256sum format) -> the hex digest."""
    words = data.decode("ascii", errors="replace").split()
    digest = words[0].lower() if words else ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise FetchError("bundle.json.sha256 does not hold a sha256 digest")
    return digest


def fetch_verified(url: str, fetch: Fetcher) -> tuple[bytes, str]:
    """One attempt: the bundle and its checksum file, verified. Returns (bytes, hex digest)."""
    data = fetch(url)
    expected = parse_checksum_file(fetch(url + ".sha256"))
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise FetchError(f"checksum mismatch for {url}: got {actual}, expected {expected}")
    return data, actual


def fetch_bundle(url: str, fetch: Fetcher, reporter: Reporter) -> tuple[bytes, str]:
    """Fetch and verify with a few retries; a mismatch is retried too, since the head
    may have been rewriting the bundle between our two requests."""
    delays = [*RETRY_DELAYS, None]
    for attempt, delay in enumerate(delays, 1):
        try:
            return fetch_verified(url, fetch)
        # HTTPException: e.g. IncompleteRead when the connection drops mid-transfer.
        except (OSError, ValueError, http.client.HTTPException, FetchError) as e:
            reason = describe_error(e)
            if delay is None or is_permanent(e):
                raise FetchError(f"cannot fetch bundle {url}: {reason}") from e
            reporter.detail(f"fetch attempt {attempt} failed ({reason}); retrying in {delay:g}s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def describe_error(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


# --------------------------------------------------------------------------------------
# The bundle: parsing and validation (all of it happens before anything is written)


@dataclass(frozen=True)
class Entry:
    path: str
    type: str  # "file" | "dir" | "symlink"
    uid: int
    gid: int
    owner: str | None = None
    group: str | None = None
    mode: int | None = None  # files and directories
    data: bytes | None = None  # files
    target: str | None = None  # symlinks


@dataclass(frozen=True)
class HostnameAction:
    name: str


@dataclass(frozen=True)
class IpmiAction:
    address: str
    netmask: str
    gateway: str  # "" when the network has no gateway: the BMC's is left as it is
    channel: int


@dataclass(frozen=True)
class CommandAction:
    argv: tuple[str, ...]
    description: str = ""
    if_exists: str | None = None  # skip the command when this path is not on the node


@dataclass(frozen=True)
class EnsureLineAction:
    """Append `line` to the existing file `path` unless it already has exactly that line."""

    path: str
    line: str


Action = HostnameAction | IpmiAction | CommandAction | EnsureLineAction


@dataclass(frozen=True)
class Bundle:
    node: str
    sha256: str
    files: tuple[Entry, ...] = ()
    actions: tuple[Action, ...] = ()


_MODE = re.compile(r"^[0-7]{1,4}$")
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_HOST_LABEL}(?:\.{_HOST_LABEL})*$")
_ID_MAX = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown


def parse_bundle(data: bytes, sha256: str) -> Bundle:
    """Decode and validate the complete bundle; raises BundleError naming the bad field."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"bundle is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise BundleError("bundle is not a JSON object")
    fmt = doc.get("format")
    if type(fmt) is not int or fmt != BUNDLE_FORMAT:
        raise BundleError(f"unsupported bundle format {fmt!r} (this runner reads {BUNDLE_FORMAT})")
    node = require(doc, "node", str, "bundle")
    files = require(doc, "files", list, "bundle")
    actions = doc.get("actions", [])
    if not isinstance(actions, list):
        raise BundleError("bundle: 'actions' must be a list")
    entries = tuple(parse_entry(i, item) for i, item in enumerate(files))
    check_entry_order(entries)
    return Bundle(
        node=node,
        sha256=sha256,
        files=entries,
        actions=tuple(parse_action(i, item) for i, item in enumerate(actions)),
    )


def require(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise BundleError(f"{where}: missing field {key!r}")
    value = obj[key]
    # bool is an int subclass, but `"uid": true` is a head bug, not uid 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError(f"{where}: field {key!r} must be of type {kind.__name__}")
    return value


def optional(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    return require(obj, key, kind, where) if key in obj else None


def check_path(path: str, where: str) -> None:
    if not path.startswith("/") or path.startswith("//"):
        raise BundleError(f"{where}: path {path!r} is not absolute")
    parts = path.split("/")[1:]
    if ".." in parts:
        raise BundleError(f"{where}: path {path!r} contains '..'")
    if "\0" in path or path == "/" or any(p in ("", ".") for p in parts):
        raise BundleError(f"{where}: path {path!r} is not a normalized file path")


def parse_mode(value: str, where: str) -> int:
    if not _MODE.match(value):
        raise BundleError(f"{where}: mode {value!r} is not an octal file mode")
    return int(value, 8)


def parse_id(obj: dict[str, Any], key: str, where: str) -> int:
    value: int = require(obj, key, int, where)
    if not 0 <= value <= _ID_MAX:
        raise BundleError(f"{where}: {key} {value} is out of range")
    return value


def parse_entry(index: int, item: object) -> Entry:
    where = f"files[{index}]"
    if not isinstance(item, dict):
        raise BundleError(f"{where}: not a JSON object")
    path = require(item, "path", str, where)
    check_path(path, where)
    where = f"{where} ({path})"
    kind = require(item, "type", str, where)
    uid, gid = parse_id(item, "uid", where), parse_id(item, "gid", where)
    if kind == "symlink":
        target = require(item, "target", str, where)
        if not target or "\0" in target:
            raise BundleError(f"{where}: invalid symlink target {target!r}")
        owner, group = optional(item, "owner", str, where), optional(item, "group", str, where)
        return Entry(path, kind, uid, gid, owner=owner, group=group, target=target)
    if kind not in ("file", "dir"):
        raise BundleError(f"{where}: unknown type {kind!r}")
    mode = parse_mode(require(item, "mode", str, where), where)
    owner, group = require(item, "owner", str, where), require(item, "group", str, where)
    if not owner or not group:
        raise BundleError(f"{where}: empty owner or group name")
    if kind == "dir":
        return Entry(path, kind, uid, gid, owner=owner, group=group, mode=mode)
    data = decode_content(item, where)
    return Entry(path, kind, uid, gid, owner=owner, group=group, mode=mode, data=data)


def decode_content(item: dict[str, Any], where: str) -> bytes:
    content: str = require(item, "content", str, where)
    encoding = optional(item, "encoding", str, where) or "utf-8"
    if encoding == "utf-8":
        return content.encode("utf-8")
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BundleError(f"{where}: content is not valid base64: {e}") from e
    raise BundleError(f"{where}: unknown encoding {encoding!r}")


def ancestors(path: str) -> list[str]:
    """/a/b/c -> ["/a/b", "/a"] (nearest first, "/" excluded)."""
    result = []
    parent = os.path.dirname(path)
    while parent != "/":
        result.append(parent)
        parent = os.path.dirname(parent)
    return result


def check_entry_order(entries: Sequence[Entry]) -> None:
    """No duplicates, and a directory listed in the bundle comes before its contents;
    nothing may live below a file or symlink entry."""
    index_of: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if entry.path in index_of:
            raise BundleError(f"files[{i}] ({entry.path}): duplicate path")
        index_of[entry.path] = i
    for i, entry in enumerate(entries):
        for parent in ancestors(entry.path):
            j = index_of.get(parent)
            if j is None:
                continue
            if entries[j].type != "dir":
                raise BundleError(
                    f"files[{i}] ({entry.path}): parent {parent} is a {entries[j].type} entry"
                )
            if j > i:
                raise BundleError(
                    f"files[{i}] ({entry.path}): listed before its directory {parent}"
                )


def parse_action(index: int, item: object) -> Action:
    where = f"actions[{index}]"
    if not isinstance(item, dict):
        raise BundleError(f"{where}: not a JSON object")
    kind = require(item, "kind", str, where)
    where = f"{where} ({kind})"
    if kind == "hostname":
        name = require(item, "name", str, where)
        if len(name) > 253 or not _HOSTNAME.match(name):
            raise BundleError(f"{where}: invalid host name {name!r}")
        return HostnameAction(name)
    if kind == "ipmi":
        address, netmask = (parse_ipv4(item, key, where) for key in ("address", "netmask"))
        # "" means the network has no gateway.
        gateway = "" if item.get("gateway") == "" else parse_ipv4(item, "gateway", where)
        channel = require(item, "channel", int, where)
        if not 0 <= channel <= 15:
            raise BundleError(f"{where}: IPMI channel {channel} is out of range")
        return IpmiAction(address, netmask, gateway, channel)
    if kind == "command":
        argv = require(item, "argv", list, where)
        if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv) or not argv[0]:
            raise BundleError(f"{where}: argv must be a non-empty list of strings")
        description = optional(item, "description", str, where) or ""
        if_exists = optional(item, "if_exists", str, where)
        if if_exists is not None:
            check_path(if_exists, f"{where} if_exists")
        return CommandAction(tuple(argv), description, if_exists)
    if kind == "ensure-line":
        path = require(item, "path", str, where)
        check_path(path, where)
        line = require(item, "line", str, where)
        if not line or any(c in line for c in "\n\r\0"):
            raise BundleError(f"{where}: line {line!r} is not a single non-empty line")
        return EnsureLineAction(path, line)
    raise BundleError(f"{where}: unknown action kind")


def parse_ipv4(item: dict[str, Any], key: str, where: str) -> str:
    value: str = require(item, key, str, where)
    try:
        ipaddress.IPv4Address(value)
    except ValueError as e:
        raise BundleError(f"{where}: {key}: {e}") from e
    return value


def check_node_paths(entries: Sequence[Entry]) -> None:
    """Refuse, before writing anything, entries that would collide with what is on the
    node (e.g. a file where the image has a directory) and so fail half-way through."""
    for i, entry in enumerate(entries):
        where = f"files[{i}] ({entry.path})"
        path = entry.path
        if entry.type == "dir":
            if os.path.lexists(path) and not os.path.isdir(path):
                raise BundleError(f"{where}: exists on the node and is not a directory")
        elif os.path.isdir(path) and not os.path.islink(path):
            raise BundleError(f"{where}: is a directory on the node")
        for parent in ancestors(path):
            if os.path.lexists(parent):
                if not os.path.isdir(parent):
                    raise BundleError(f"{where}: {parent} is not a directory on the node")
                break


# --------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class PendingDir:
    path: str
    mode: int
    uid: int
    gid: int


def resolve_uid(name: str | None, fallback: int, path: str, reporter: Reporter) -> int:
    """The node's uid for `name`; looked up at write time because the bundle itself may
    have just written /etc/passwd."""
    if name is None:
        return fallback
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        reporter.detail(f"user {name!r} unknown on node, using uid {fallback} for {path}")
        return fallback


def resolve_gid(name: str | None, fallback: int, path: str, reporter: Reporter) -> int:
    if name is None:
        return fallback
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        reporter.detail(f"group {name!r} unknown on node, using gid {fallback} for {path}")
        return fallback


def resolve_ids(entry: Entry, reporter: Reporter) -> tuple[int, int]:
    return (
        resolve_uid(entry.owner, entry.uid, entry.path, reporter),
        resolve_gid(entry.group, entry.gid, entry.path, reporter),
    )


def temp_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{secrets.token_hex(6)}.qlustar-tmp")


def write_file(path: str, data: bytes, mode: int, uid: int, gid: int) -> None:
    """Replace `path` atomically: readers see the old or the new file, never a part."""
    directory, name = os.path.split(path)
    # mkstemp creates the file 0600, so the content is never readable with a wrong mode.
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".qlustar-tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            set_owner_and_mode(f.fileno(), uid, gid, mode)
        os.replace(tmp, path)  # a rename never follows a symlink at `path`
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def set_owner_and_mode(fd: int, uid: int, gid: int, mode: int) -> None:
    # Through the open descriptor, so both surely hit the object we created, whatever
    # happens to its name.  chown first: it clears setuid/setgid on regular files.
    os.chown(fd, uid, gid)
    os.chmod(fd, mode)


def replace_symlink(path: str, target: str, uid: int, gid: int) -> None:
    tmp = temp_name(path)
    os.symlink(target, tmp)
    try:
        os.chown(tmp, uid, gid, follow_symlinks=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def create_parents(path: str, pending: list[PendingDir], reporter: Reporter) -> None:
    """Create missing parent directories; they become 0755 root:root once filled."""
    missing = [p for p in ancestors(path) if not os.path.lexists(p)]
    for parent in reversed(missing):
        os.mkdir(parent, 0o700)
        pending.append(PendingDir(parent, 0o755, 0, 0))
        reporter.detail(f"created parent directory {parent}")


def apply_entry(entry: Entry, pending: list[PendingDir], reporter: Reporter) -> None:
    create_parents(entry.path, pending, reporter)
    uid, gid = resolve_ids(entry, reporter)
    if entry.type == "dir":
        assert entry.mode is not None
        if not os.path.isdir(entry.path):
            # Owner-only until finalized, so nothing is exposed while it is being filled.
            os.mkdir(entry.path, 0o700)
        pending.append(PendingDir(entry.path, entry.mode, uid, gid))
        reporter.detail(f"directory {entry.path} ({entry.mode:04o} {uid}:{gid})")
    elif entry.type == "file":
        assert entry.data is not None and entry.mode is not None
        write_file(entry.path, entry.data, entry.mode, uid, gid)
        reporter.detail(
            f"wrote {entry.path} ({len(entry.data)} bytes, {entry.mode:04o} {uid}:{gid})"
        )
    else:
        assert entry.target is not None
        replace_symlink(entry.path, entry.target, uid, gid)
        reporter.detail(f"linked {entry.path} -> {entry.target}")


def finalize_dirs(pending: Sequence[PendingDir]) -> None:
    """Set directory owners and modes last, deepest first (like tar): a directory that
    becomes e.g. 0500 or root-only must not stop us from writing its contents."""
    first_error: OSError | None = None
    for d in reversed(pending):
        try:
            fd = os.open(d.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                set_owner_and_mode(fd, d.uid, d.gid, d.mode)
            finally:
                os.close(fd)
        except OSError as e:
            first_error = first_error or e
    if first_error is not None:
        raise first_error


def apply_files(entries: Sequence[Entry], reporter: Reporter) -> None:
    """Write all entries in bundle order; raises OSError on the first failure."""
    pending: list[PendingDir] = []
    try:
        for entry in entries:
            try:
                apply_entry(entry, pending, reporter)
            except OSError as e:
                raise OSError(e.errno, f"{entry.path}: {e.strerror or e}") from e
    finally:
        # Even after a failure, leave no directory with its temporary 0700 mode.
        finalize_dirs(pending)


# --------------------------------------------------------------------------------------
# Commands, actions and init.d scripts


def exec_path() -> str:
    return os.environ.get("PATH") or SEARCH_PATH


def find_program(name: str) -> str | None:
    for directory in exec_path().split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.stat(candidate).st_mode & 0o111:
            return candidate
    return None


def run_command(argv: Sequence[str], input: str | None = None) -> tuple[int, str]:
    """Run argv (no shell), stdout+stderr combined, with `input` (or nothing) as its standard
    input. Returns (status, output); a signal becomes 128+N and a program that cannot be
    started 126/127, as in the shell."""
    env = dict(os.environ)
    env.setdefault("PATH", SEARCH_PATH)
    # Output goes to a file, not a pipe: a script that starts a daemon in the background
    # would otherwise keep the pipe open and block us until the daemon exits. The input is
    # a file too, so a command that does not read it cannot block us either.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as stdin:
        if input is not None:
            stdin.write(input.encode("utf-8"))
            stdin.seek(0)
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL if input is None else stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        except FileNotFoundError as e:
            return 127, f"{argv[0]}: {e.strerror}\n"
        except OSError as e:
            return 126, f"{argv[0]}: {e.strerror or e}\n"
        note = ""
        try:
            status = proc.wait(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status, note = 124, f"killed after {COMMAND_TIMEOUT:g}s\n"
        out.seek(0)
        output = out.read().decode("utf-8", errors="replace") + note
    return (128 - status if status < 0 else status), output


def run_logged(
    argv: Sequence[str], run: Runner, reporter: Reporter, label: str, *, input: str | None = None
) -> int:
    reporter.detail(f"running {shlex.join(argv)}")
    if input is None:
        status, output = run(list(argv))
    else:
        reporter.output(f"{label} stdin", input)
        status, output = run(list(argv), input=input)
    reporter.output(label, output)
    if status != 0:
        reporter.detail(f"{shlex.join(argv)} exited with status {status}")
    return status


def set_hostname(action: HostnameAction, run: Runner, reporter: Reporter) -> bool:
    write_file(HOSTNAME_FILE, f"{action.name}\n".encode(), 0o644, 0, 0)
    reporter.detail(f"wrote {HOSTNAME_FILE} ({action.name})")
    if find_program("hostname") is None:
        # systemd sets the kernel host name from /etc/hostname later anyway.
        reporter.detail("hostname command not found; kernel host name left to systemd")
        return True
    return run_logged(["hostname", action.name], run, reporter, "hostname") == 0


def configure_ipmi(action: IpmiAction, run: Runner, reporter: Reporter) -> bool | None:
    if find_program("ipmitool") is None:
        reporter.warn(f"ipmitool not found: IPMI address {action.address} not configured")
        return None
    lan = ["ipmitool", "lan", "set", str(action.channel)]
    steps = [["ipsrc", "static"], ["ipaddr", action.address], ["netmask", action.netmask]]
    if action.gateway:
        steps.append(["defgw", "ipaddr", action.gateway])
    else:
        reporter.detail(f"no IPMI gateway: default gateway of channel {action.channel} unchanged")
    # Stops at the first failure: later settings make no sense once one failed (e.g. the
    # BMC did not answer).
    return all(run_logged([*lan, *args], run, reporter, "ipmitool") == 0 for args in steps)


def run_action_command(action: CommandAction, run: Runner, reporter: Reporter) -> bool | None:
    if action.if_exists is not None and not os.path.exists(action.if_exists):
        # Expected on nodes whose image lacks the program (e.g. no postfix): no warning.
        reporter.step(f"{action.if_exists} not on this node: {shlex.join(action.argv)} not run")
        return None
    return run_logged(action.argv, run, reporter, os.path.basename(action.argv[0])) == 0


def ensure_line(action: EnsureLineAction, reporter: Reporter) -> bool | None:
    """Append the line (after a newline, if the file lacks a final one) and replace the file
    atomically with its mode and owner kept. A symlink is followed: its target is edited."""
    path = os.path.realpath(action.path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        reporter.warn(f"{action.path} does not exist: line {action.line!r} not added")
        return None
    if not stat.S_ISREG(st.st_mode):
        reporter.detail(f"{action.path} is not a regular file")
        return False
    with open(path, "rb") as f:
        data = f.read()
    line = action.line.encode("utf-8")
    if line in data.split(b"\n"):
        reporter.detail(f"{action.path} already has the line {action.line!r}")
        return True
    if data and not data.endswith(b"\n"):
        data += b"\n"
    write_file(path, data + line + b"\n", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    reporter.detail(f"added the line {action.line!r} to {path}")
    return True


def describe_action(action: Action) -> str:
    if isinstance(action, HostnameAction):
        return f"hostname {action.name}"
    if isinstance(action, IpmiAction):
        return f"ipmi {action.address} (channel {action.channel})"
    if isinstance(action, EnsureLineAction):
        return f"ensure-line {action.path}"
    return f"command {action.description or shlex.join(action.argv)}"


def perform_action(action: Action, run: Runner, reporter: Reporter) -> bool | None:
    """True: done; False: failed; None: skipped (the reason is logged)."""
    if isinstance(action, HostnameAction):
        return set_hostname(action, run, reporter)
    if isinstance(action, IpmiAction):
        return configure_ipmi(action, run, reporter)
    if isinstance(action, EnsureLineAction):
        return ensure_line(action, reporter)
    return run_action_command(action, run, reporter)


def perform_actions(actions: Sequence[Action], run: Runner, reporter: Reporter) -> int:
    """Perform every action; a failure is reported and the rest still run. Returns the
    number of failed actions."""
    failed = 0
    for action in actions:
        what = describe_action(action)
        try:
            result = perform_action(action, run, reporter)
        except OSError as e:
            reporter.detail(f"{what}: {e}")
            result = False
        if result is False:
            failed += 1
            reporter.step(f"action {what} FAILED")
        elif result:
            reporter.step(f"action {what} done")
        else:
            reporter.step(f"action {what} skipped")
    return failed


def list_init_scripts(reporter: Reporter) -> list[str]:
    """Names of the runnable scripts, byte-wise sorted (as `LC_ALL=C ls` and run-parts);
    non-executables, directories and hidden (editor/temp) files are skipped."""
    try:
        names = os.listdir(INIT_D_DIR)
    except FileNotFoundError:
        reporter.detail(f"no {INIT_D_DIR}")
        return []
    scripts = []
    for name in sorted(names, key=os.fsencode):
        path = os.path.join(INIT_D_DIR, name)
        try:
            st = os.stat(path)
        except OSError as e:
            reporter.detail(f"init.d {name} skipped: {e.strerror}")
            continue
        if name.startswith("."):
            reporter.detail(f"init.d {name} skipped: hidden file")
        elif not stat.S_ISREG(st.st_mode):
            reporter.detail(f"init.d {name} skipped: not a regular file")
        elif not st.st_mode & 0o111:  # root may execute anything with an x bit
            reporter.detail(f"init.d {name} skipped: not executable")
        else:
            scripts.append(name)
    return scripts


def run_init_scripts(run: Runner, reporter: Reporter) -> tuple[int, int]:
    """Run each script in order; one failing does not stop the others.
    Returns (scripts run, scripts failed)."""
    scripts = list_init_scripts(reporter)
    log_dir = os.path.join(LOG_DIR, "init.d")
    if scripts:
        try:
            create_log_dir(log_dir)
        except OSError as e:
            reporter.warn(f"cannot create {log_dir}: {e}")
    failed = 0
    for name in scripts:
        reporter.step(f"init.d {name} started")
        status, output = run([os.path.join(INIT_D_DIR, name)])
        try:
            append_file(os.path.join(log_dir, f"{name}.log"), output)
        except OSError as e:
            reporter.detail(f"cannot write {log_dir}/{name}.log: {e}")
        reporter.output(name, output)
        reporter.step(f"init.d {name} exited with status {status}")
        failed += status != 0
    return len(scripts), failed


# --------------------------------------------------------------------------------------
# Local disk (/etc/qlustar/options.d/disk-config, written by the head; format in its header)
#
# After the actions and before the init.d scripts (which may rely on the local file
# systems), the disk named by the file is set up:
#
#  * a missing file means no local disk is configured; a disk not on this node is skipped
#    with a warning (the same bundle may serve nodes with and without one);
#  * `wipe` decides whether it is (re)partitioned: `never` leaves the partition table alone;
#    `always` repartitions and formats at every boot; `if-unformatted` only when the disk
#    is blank: `sfdisk --dump` finds no partition table AND `blkid -p` finds no other
#    signature either (exit status 2). A disk holding e.g. a file system or RAID member on
#    the whole device is thus never taken for blank: that is an error, not a wipe;
#  * partitioning is `sfdisk --wipe always --wipe-partitions always <disk>` fed a script on
#    stdin. Without --no-reread, sfdisk refuses a disk that is in use (a partition mounted
#    or swapped on). `partx -u` then tells the kernel about the new partitions (sfdisk's
#    own re-read does not always, e.g. on loop devices), `udevadm settle` waits for udev,
#    and we wait up to PARTITION_WAIT seconds for each partition's device node;
#  * each partition gets its file system (mkfs.ext4 -F -q, mkfs.xfs -f, mkswap) only right
#    after partitioning; kept partitions are only mounted;
#  * partitions with a mount point are mounted (the directory is created), swap partitions
#    activated; what is mounted already is left as it is. /etc/fstab then gets one line for
#    each partition mounted or activated (so systemd keeps them; not for one that failed,
#    which systemd would only fail again), marked with FSTAB_MARK; the marked lines of an
#    earlier run are replaced, all other lines are kept;
#  * any error (bad file, missing tool, a command failing) is reported and the step counted
#    as failed; the boot goes on with the init.d scripts.
#
# Partition device nodes are named after the disk's real path (a /dev/disk/by-id/... link is
# resolved first): /dev/sdb -> /dev/sdb1, and with a "p" when the name ends in a digit:
# /dev/nvme0n1 -> /dev/nvme0n1p1, /dev/loop0 -> /dev/loop0p1, /dev/mmcblk0 -> /dev/mmcblk0p1.

FSTAB_MARK = "# qlustar-disk"
DISK_LABELS = ("gpt", "dos")
DISK_WIPE = ("never", "if-unformatted", "always")
DISK_FS = ("ext4", "xfs", "swap")
DEFAULT_DISK_LABEL = "gpt"  # as qlimage.bundle writes when the option has none
DEFAULT_DISK_WIPE = "if-unformatted"
_SIZE = re.compile(r"^([0-9]+)(MiB|GiB|TiB)$")
_SIZE_MIB = {"MiB": 1, "GiB": 1024, "TiB": 1024 * 1024}
_LABEL_MAX = {"ext4": 16, "xfs": 12, "swap": 16}  # bytes, as mkfs.* / mkswap accept
_MKFS = {"ext4": "mkfs.ext4", "xfs": "mkfs.xfs", "swap": "mkswap"}
# Named in "not found" errors: the Debian package that has the program.
TOOL_PACKAGES = {
    "sfdisk": "fdisk",
    "blkid": "util-linux",
    "mkswap": "util-linux",
    "swapon": "mount",
    "mount": "mount",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
}


class DiskError(Exception):
    """The disk step cannot go on (bad disk-config, missing tool, a command failed)."""


@dataclass(frozen=True)
class Partition:
    number: int
    size_mib: int | None  # None: the rest of the disk
    fs: str  # "ext4" | "xfs" | "swap"
    mount: str = ""  # absolute mount point; "" for none
    label: str = ""  # file system label; "" for none
    options: str = ""  # mount options; "" for the defaults


@dataclass(frozen=True)
class DiskConfig:
    device: str
    label: str  # partition table: "gpt" | "dos"
    wipe: str  # "never" | "if-unformatted" | "always"
    partitions: tuple[Partition, ...]


_FIELD_ESCAPE = re.compile(r"\\0([0-7]{3})")


def decode_disk_field(raw: str, what: str) -> str:
    """A disk-config value: "-" is empty; `\\0ooo` is the byte ooo (octal), the bytes being
    UTF-8. Any other backslash is an error, as is a decoded NUL or invalid UTF-8."""
    if raw == "-":
        return ""
    out = bytearray()
    pos = 0
    while pos < len(raw):
        backslash = raw.find("\\", pos)
        if backslash < 0:
            out += raw[pos:].encode("utf-8")
            break
        out += raw[pos:backslash].encode("utf-8")
        match = _FIELD_ESCAPE.match(raw, backslash)
        if match is None:
            raise DiskError(f"{what} {raw!r}: a backslash must start a \\0ooo escape")
        byte = int(match.group(1), 8)
        if not 0 < byte < 256:
            raise DiskError(f"{what} {raw!r}: escape {match.group(0)} is not a non-NUL byte")
        out.append(byte)
        pos = match.end()
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DiskError(f"{what} {raw!r} is not UTF-8 once decoded") from e


def parse_size(raw: str, what: str) -> int | None:
    if raw == "rest":
        return None
    match = _SIZE.match(raw)
    if match is None or int(match.group(1)) == 0:
        raise DiskError(f"{what}: bad size {raw!r} (<N>MiB, <N>GiB, <N>TiB with N > 0, or rest)")
    return int(match.group(1)) * _SIZE_MIB[match.group(2)]


def normalize_mount_point(value: str, what: str) -> str:
    parts = value.split("/")
    if not value.startswith("/") or any(p in (".", "..") for p in parts):
        raise DiskError(f"{what}: mount point {value!r} is not an absolute normalized path")
    kept = [p for p in parts if p]
    if not kept:
        raise DiskError(f"{what}: mount point {value!r} is the root directory")
    return "/" + "/".join(kept)


def parse_partition(fields: list[str], expected: int, what: str) -> Partition:
    if len(fields) != 7:
        raise DiskError(f"{what}: a part line has 7 fields, not {len(fields)}")
    _, number, size, fs, mount, label, options = fields
    if number != str(expected):
        raise DiskError(f"{what}: partition number {number!r}, expected {expected}")
    size_mib = parse_size(size, what)
    if fs not in DISK_FS:
        raise DiskError(f"{what}: bad file system {fs!r} (one of {', '.join(DISK_FS)})")
    mount = decode_disk_field(mount, f"{what}: mount point")
    if mount:
        if fs == "swap":
            raise DiskError(f"{what}: a swap partition has no mount point ({mount!r})")
        mount = normalize_mount_point(mount, what)
    label = decode_disk_field(label, f"{what}: label")
    if any(ord(c) < 0x20 or c == "\x7f" for c in label):
        raise DiskError(f"{what}: label {label!r} has a control character")
    if len(label.encode("utf-8")) > _LABEL_MAX[fs]:
        raise DiskError(f"{what}: label {label!r} is longer than {_LABEL_MAX[fs]} bytes for {fs}")
    options = decode_disk_field(options, f"{what}: options")
    if any(c.isspace() or ord(c) < 0x20 for c in options):
        raise DiskError(f"{what}: mount options {options!r} contain white space")
    return Partition(int(number), size_mib, fs, mount, label, options)


def parse_disk_config(text: str) -> DiskConfig:
    """Parse and validate the whole file; raises DiskError naming the line."""
    settings: dict[str, str] = {}
    partitions: list[Partition] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        what = f"line {lineno}"
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        keyword = fields[0].partition("=")[0]
        if fields[0] == "part":
            if partitions and partitions[-1].size_mib is None:
                raise DiskError(f"{what}: partition after the one of size 'rest' (must be last)")
            partitions.append(parse_partition(fields, len(partitions) + 1, what))
        elif "=" in fields[0] and keyword in ("device", "label", "wipe"):
            if len(fields) != 1:
                raise DiskError(f"{what}: {keyword}= takes one value without spaces")
            if keyword in settings:
                raise DiskError(f"{what}: {keyword}= given twice")
            settings[keyword] = fields[0].partition("=")[2]
        else:
            raise DiskError(f"{what}: unknown keyword {keyword!r}")
    if "device" not in settings:
        raise DiskError("no device= line")
    device = decode_disk_field(settings["device"], "device")
    if not device.startswith("/") or "\0" in device:
        raise DiskError(f"device {device!r} is not an absolute path")
    label = settings.get("label", DEFAULT_DISK_LABEL)
    if label not in DISK_LABELS:
        raise DiskError(f"bad partition table label={label!r} (one of {', '.join(DISK_LABELS)})")
    wipe = settings.get("wipe", DEFAULT_DISK_WIPE)
    if wipe not in DISK_WIPE:
        raise DiskError(f"bad wipe={wipe!r} (one of {', '.join(DISK_WIPE)})")
    if not partitions:
        raise DiskError("no part lines")
    if label == "dos" and len(partitions) > 4:
        # More would need an extended partition.
        raise DiskError(f"a dos partition table holds 4 partitions, not {len(partitions)}")
    return DiskConfig(device, label, wipe, tuple(partitions))


def partition_device(disk: str, number: int) -> str:
    return f"{disk}p{number}" if disk[-1:].isdigit() else f"{disk}{number}"


def sfdisk_script(config: DiskConfig) -> str:
    lines = [f"label: {config.label}"]
    for part in config.partitions:
        kind = "swap" if part.fs == "swap" else "linux"
        size = "" if part.size_mib is None else f"size={part.size_mib}MiB, "
        lines.append(f"{size}type={kind}")
    return "\n".join(lines) + "\n"


def mkfs_argv(part: Partition, device: str) -> list[str]:
    label = ["-L", part.label] if part.label else []
    if part.fs == "ext4":
        return ["mkfs.ext4", "-F", "-q", *label, device]
    if part.fs == "xfs":
        return ["mkfs.xfs", "-f", *label, device]
    return ["mkswap", *label, device]


def require_tools(names: Sequence[str]) -> None:
    missing = [name for name in dict.fromkeys(names) if find_program(name) is None]
    if missing:
        raise DiskError(
            "; ".join(
                f"{n} not found (Debian package {TOOL_PACKAGES.get(n, '?')})" for n in missing
            )
        )


def fstab_escape(value: str) -> str:
    """Space, tab, newline and backslash as the octal escapes fstab and /proc/mounts use."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in value)


def fstab_unescape(value: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), value)


def is_mounted(device: str, mount: str) -> bool:
    """Whether `device` is mounted on `mount` (per MOUNTS_FILE)."""
    for line in (read_text(MOUNTS_FILE) or "").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fstab_unescape(fields[1]) == mount:
            source = fstab_unescape(fields[0])
            if os.path.realpath(source) == os.path.realpath(device):
                return True
    return False


def is_swap_active(device: str) -> bool:
    lines = (read_text(SWAPS_FILE) or "").splitlines()[1:]  # after the header line
    target = os.path.realpath(device)
    return any(
        line.split() and os.path.realpath(fstab_unescape(line.split()[0])) == target
        for line in lines
    )


def wait_for_devices(paths: Sequence[str]) -> list[str]:
    """Wait up to PARTITION_WAIT seconds for the device nodes; returns those still missing."""
    deadline = time.monotonic() + PARTITION_WAIT
    while True:
        missing = [p for p in paths if not os.path.exists(p)]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.1)


def has_partition_table(disk: str, run: Runner, reporter: Reporter) -> bool:
    """For wipe=if-unformatted. Raises DiskError when the disk holds something else, e.g. a
    file system on the whole device, or cannot be probed: never taken for blank."""
    if run_logged(["sfdisk", "--dump", disk], run, reporter, "sfdisk") == 0:
        return True
    status = run_logged(["blkid", "-p", disk], run, reporter, "blkid")
    if status == 2:  # blkid: nothing found
        return False
    if status == 0:
        raise DiskError(
            "no partition table, but a signature blkid recognizes (see runner.log); "
            "not partitioned (wipe=always would)"
        )
    raise DiskError(f"cannot probe the disk: blkid -p exited with status {status}")


def settle(run: Runner, reporter: Reporter) -> None:
    if find_program("udevadm") is not None:
        run_logged(["udevadm", "settle"], run, reporter, "udevadm")


def partition_disk(
    config: DiskConfig, disk: str, devices: Sequence[str], run: Runner, reporter: Reporter
) -> None:
    """Write the partition table, wait for the partitions and make their file systems."""
    argv = ["sfdisk", "--wipe", "always", "--wipe-partitions", "always", disk]
    status = run_logged(argv, run, reporter, "sfdisk", input=sfdisk_script(config))
    if status != 0:
        raise DiskError(f"sfdisk failed (status {status}; is the disk in use? see runner.log)")
    if find_program("partx") is not None:
        # The kernel may not have re-read the table (e.g. loop devices); updates only.
        run_logged(["partx", "-u", disk], run, reporter, "partx")
    settle(run, reporter)
    missing = wait_for_devices(devices)
    if missing:
        raise DiskError(f"partition {', '.join(missing)} did not appear within {PARTITION_WAIT:g}s")
    n = len(config.partitions)
    reporter.step(f"disk {config.device}: partitioned ({config.label}, {n} partitions)")
    for part, device in zip(config.partitions, devices, strict=True):
        argv = mkfs_argv(part, device)
        status = run_logged(argv, run, reporter, argv[0])
        if status != 0:
            raise DiskError(f"{argv[0]} failed on {device} (status {status}; see runner.log)")
        label = f", label {part.label}" if part.label else ""
        reporter.step(f"disk {config.device}: made {part.fs} on {device}{label}")


def mount_partition(
    config: DiskConfig, part: Partition, device: str, run: Runner, reporter: Reporter
) -> str | None:
    """Mount or swap on one partition; returns its fstab line, or None when it failed."""
    if part.fs == "swap":
        if is_swap_active(device):
            reporter.step(f"disk {config.device}: swap on {device} already active")
        else:
            argv = ["swapon", *(["-o", part.options] if part.options else []), device]
            status = run_logged(argv, run, reporter, "swapon")
            if status != 0:
                reporter.error(f"disk {config.device}: swapon {device} failed (status {status})")
                return None
            reporter.step(f"disk {config.device}: swap on {device}")
        return f"{fstab_escape(device)} none swap {part.options or 'sw'} 0 0 {FSTAB_MARK}"
    if is_mounted(device, part.mount):
        reporter.step(f"disk {config.device}: {device} already mounted on {part.mount}")
    else:
        try:
            os.makedirs(part.mount, mode=0o755, exist_ok=True)
        except OSError as e:
            reporter.error(f"disk {config.device}: cannot create mount point {part.mount}: {e}")
            return None
        options = ["-o", part.options] if part.options else []
        argv = ["mount", "-t", part.fs, *options, device, part.mount]
        status = run_logged(argv, run, reporter, "mount")
        if status != 0:
            reporter.error(
                f"disk {config.device}: mounting {device} on {part.mount} failed (status {status})"
            )
            return None
        reporter.step(f"disk {config.device}: mounted {device} on {part.mount}")
    return (
        f"{fstab_escape(device)} {fstab_escape(part.mount)} {part.fs} "
        f"{part.options or 'defaults'} 0 0 {FSTAB_MARK}"
    )


def update_fstab(lines: Sequence[str], reporter: Reporter) -> None:
    """Replace the lines marked FSTAB_MARK by `lines`, keeping all others; atomic, with the
    file's mode and owner kept. No file and nothing to add: nothing is written."""
    path = os.path.realpath(FSTAB_FILE)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not lines:
            return
        old, mode, uid, gid = "", 0o644, 0, 0
    else:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            old = f.read()
        mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    kept = [line for line in old.splitlines() if not line.rstrip().endswith(FSTAB_MARK)]
    new = "".join(f"{line}\n" for line in [*kept, *lines])
    if new == old:
        reporter.detail(f"{FSTAB_FILE} unchanged")
        return
    write_file(path, new.encode("utf-8", errors="surrogateescape"), mode, uid, gid)
    reporter.detail(f"{FSTAB_FILE}: {len(lines)} lines marked {FSTAB_MARK!r}")


def setup_disk(config: DiskConfig, run: Runner, reporter: Reporter) -> bool | None:
    """True: done; False: failed (reported); None: the disk is not on this node."""
    if not os.path.exists(config.device):
        reporter.warn(f"disk {config.device} not found on this node: disk setup skipped")
        return None
    disk = os.path.realpath(config.device)
    if disk != config.device:
        reporter.detail(f"disk {config.device} is {disk}")
    if not stat.S_ISBLK(os.stat(disk).st_mode):
        raise DiskError("not a block device")
    devices = [partition_device(disk, p.number) for p in config.partitions]
    used = [
        (part, device)
        for part, device in zip(config.partitions, devices, strict=True)
        if part.fs == "swap" or part.mount
    ]
    mount_tools = [("swapon" if part.fs == "swap" else "mount") for part, _ in used]
    if config.wipe == "if-unformatted":
        require_tools(["sfdisk", "blkid"])
        partition = not has_partition_table(disk, run, reporter)
    else:
        partition = config.wipe == "always"
    if partition:
        require_tools(["sfdisk", *(_MKFS[p.fs] for p in config.partitions), *mount_tools])
        partition_disk(config, disk, devices, run, reporter)
    else:
        require_tools(mount_tools)
        reporter.step(f"disk {config.device}: kept existing partitions (wipe={config.wipe})")
        if used:
            settle(run, reporter)
            wait_for_devices([device for _, device in used])
    fstab: list[str] = []
    ok = True
    for part, device in used:
        if not os.path.exists(device):
            reporter.error(f"disk {config.device}: partition {device} not found")
            ok = False
            continue
        line = mount_partition(config, part, device, run, reporter)
        if line is None:
            ok = False
        else:
            fstab.append(line)
    update_fstab(fstab, reporter)
    return ok


def initialize_disks(run: Runner, reporter: Reporter) -> tuple[int, int]:
    """The disk step. Returns (disks configured, disks failed): (0, 0) without a
    disk-config, (1, 1) when it is invalid or setting the disk up failed."""
    text = read_text(DISK_CONFIG_FILE)
    if text is None:
        reporter.detail(f"no {DISK_CONFIG_FILE}: no local disk to set up")
        return 0, 0
    result: bool | None = False
    try:
        config = parse_disk_config(text)
    except DiskError as e:
        reporter.error(f"{DISK_CONFIG_FILE}: {e}")
    else:
        try:
            result = setup_disk(config, run, reporter)
        except (DiskError, OSError) as e:
            reporter.error(f"disk {config.device}: {e}")
            result = False
    if result is False:
        reporter.step("disk setup FAILED")
        return 1, 1
    reporter.step("disk setup done" if result else "disk setup skipped")
    return 1, 0


# --------------------------------------------------------------------------------------
# Main


@dataclass(frozen=True)
class NodeIdentity:
    base: str | None
    mac: str | None
    debug: bool
    net: dict[str, str]


def read_identity(args: argparse.Namespace) -> NodeIdentity:
    cmdline = parse_cmdline(read_text(args.cmdline) or "")
    net = parse_net_env(read_text(args.net_env) or "")
    mac = mac_from_bootif(cmdline["BOOTIF"]) if "BOOTIF" in cmdline else None
    if mac is None:
        mac = mac_from_nic(net.get("NIC", ""))
    return NodeIdentity(
        base=cmdline.get("qlustar.http") or None,
        mac=mac,
        debug=args.debug or "debug" in cmdline,
        net=net,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qlustar-runner", description="Configure this node from its bundle on the head."
    )
    parser.add_argument("--cmdline", default=CMDLINE_FILE, help="kernel command line file")
    parser.add_argument("--net-env", default=NET_ENV_FILE, help="DHCP lease of the initrd")
    parser.add_argument("--debug", action="store_true", help="as `debug` on the cmdline")
    return parser.parse_args(argv)


def load_bundle(identity: NodeIdentity, fetch: Fetcher, reporter: Reporter) -> Bundle:
    if not identity.base:
        raise BundleError("no qlustar.http=<URL> on the kernel command line")
    if not identity.mac:
        raise BundleError("no usable BOOTIF=<mac> on the kernel command line")
    check_base_url(identity.base)
    url = bundle_url(identity.base, identity.mac)
    reporter.step(f"fetching bundle {url}")
    data, digest = fetch_bundle(url, fetch, reporter)
    bundle = parse_bundle(data, digest)
    check_node_paths(bundle.files)
    return bundle


def configure_node(identity: NodeIdentity, fetch: Fetcher, run: Runner, reporter: Reporter) -> int:
    reporter.step(
        f"runner started (node MAC {identity.mac or 'unknown'}, head {identity.base or 'unknown'})"
    )
    if identity.net:
        reporter.detail("net.env: " + " ".join(f"{k}={v}" for k, v in identity.net.items()))
    try:
        bundle = load_bundle(identity, fetch, reporter)
    except BundleError as e:
        reporter.error(f"{e}; nothing written, node stays unconfigured")
        return EXIT_UNCONFIGURED
    reporter.step(
        f"bundle for {bundle.node} verified: {len(bundle.files)} files, "
        f"{len(bundle.actions)} actions"
    )
    try:
        apply_files(bundle.files, reporter)
    except OSError as e:
        reporter.error(
            f"writing the bundle failed: {e}; node is only partly configured, "
            "actions, disk setup and init.d scripts skipped"
        )
        return EXIT_PARTIAL
    reporter.step(f"bundle applied: {len(bundle.files)} files (sha256 {bundle.sha256[:12]})")
    failed_actions = perform_actions(bundle.actions, run, reporter)
    # Before the init.d scripts: they may use the local file systems.
    disks, failed_disks = initialize_disks(run, reporter)
    scripts, failed_scripts = run_init_scripts(run, reporter)
    reporter.step(
        f"runner done: {len(bundle.files)} files, {len(bundle.actions)} actions "
        f"({failed_actions} failed), {disks} disks ({failed_disks} failed), "
        f"{scripts} scripts ({failed_scripts} failed)"
    )
    return EXIT_OK


def main(
    argv: Sequence[str] | None = None,
    *,
    fetch: Fetcher = fetch_url,
    run: Runner = run_command,
) -> int:
    """Entry point; returns the exit status (EXIT_*)."""
    args = parse_args(argv)
    identity = read_identity(args)
    reporter = Reporter(debug=identity.debug)
    reporter.open_log(LOG_DIR)
    try:
        return configure_node(identity, fetch, run, reporter)
    except Exception as e:
        reporter.error(f"internal error: {e!r}")
        reporter.detail(traceback.format_exc())
        return EXIT_INTERNAL
    finally:
        reporter.close()


if __name__ == "__main__":
    sys.exit(main())
