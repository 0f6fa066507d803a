"""The bundle: parsing and validation (all of it happens before anything is written)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import names


class BundleError(Exception):
    """The bundle cannot be used; the node stays unconfigured."""


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
    doc = decode_json(data)
    if not isinstance(doc, dict):
        raise BundleError("bundle is not a JSON object")
    fmt = doc.get("format")
    if type(fmt) is not int or fmt != names.BUNDLE_FORMAT:
        raise BundleError(
            f"unsupported bundle format {fmt!r} (this runner reads {names.BUNDLE_FORMAT})"
        )
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


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers may keep different ones of two equal keys; the head never writes them.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise BundleError(f"bundle is not valid JSON: duplicate key {key!r}")
        obj[key] = value
    return obj


def refuse_constant(name: str) -> Any:
    raise BundleError(f"bundle is not valid JSON: {name} is not a JSON number")


def decode_json(data: bytes) -> Any:
    """Strict JSON: a malformed, very deeply nested or ambiguous document is a BundleError,
    never an internal error of the runner."""
    try:
        return json.loads(
            data.decode("utf-8"), object_pairs_hook=unique_keys, parse_constant=refuse_constant
        )
    # ValueError: also an integer longer than Python converts; RecursionError: deep nesting.
    except (UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"bundle is not valid JSON: {e}") from e
    except RecursionError:
        raise BundleError("bundle is not valid JSON: nested too deeply") from None


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
