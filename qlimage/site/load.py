"""Loading the site: every config file validated against its schema, then frozen, once.

Like mkosi's config, nothing downstream re-reads or re-checks a site file: tasks receive the
`Site` object. Every problem of every file is collected first and reported together as
`file: json.path: message` lines, so an admin fixes a whole batch in one go.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import ipaddress
import json
import os
import re
import socket
import tomllib
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from operator import attrgetter
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qlimage.atomic import write_text
from qlimage.errors import ConfigError
from qlimage.layout import VALIDATION_CACHE
from qlimage.site import inventory
from qlimage.site.model import (
    Archive,
    BootConfig,
    Chroot,
    ChrootTask,
    Host,
    HostAddress,
    Image,
    Multicast,
    Network,
    Paths,
    Recipe,
    Site,
)

SITE_FILE = "site.toml"


@cache
def schema(name: str) -> dict[str, Any]:
    text = resources.files("qlimage.site").joinpath(f"schemas/{name}.schema.json").read_text()
    return json.loads(text)


def setting(raw: Mapping[str, Any], section: str, key: str) -> Any:
    """site.toml's `[section] key`, else its default. The site schema is the one table of
    defaults: each is written (and documented) there once, as the key's `default`."""
    table = raw.get(section, {})
    if key in table:
        return table[key]
    return schema("site")["properties"][section]["properties"][key].get("default")


def bootconfig_default(key: str) -> Any:
    """A boot config key's default, from the schema like every other default."""
    return schema("site")["properties"]["bootconfigs"]["additionalProperties"]["properties"][key][
        "default"
    ]


def json_path(path: Any) -> str:
    """Render a jsonschema error path the way osbuild does: `.hosts[2].mac`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out or "."


# Cache entries of an inventory's valid hosts, by file: "hosts:<path>" -> [schema, digests]; for
# inventories read whole (read_inventory keeps the hosts of the others in their own entry).
HOSTS_SLOT = "hosts:"


class ValidationCache:
    """Remembers which files passed their schema, by (content digest, schema digest), and
    their parsed data. The content, not size and mtime: a same-length edit whose mtime was set
    back must still be seen, and hashing a site file is cheap next to parsing it.

    Parsing and validating a 1 000-node inventory costs more than everything else a no-op
    build does, so a file unchanged since it last validated is neither parsed nor validated
    again (the cross-file checks, which are cheap, always run). Kept beside the outputs,
    rewritten only when it changed; a missing or unreadable cache means everything is validated.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        self.changed = False
        if path is not None:
            try:
                entries = json.loads(path.read_text())
            except (OSError, ValueError):
                entries = {}
            self.entries = entries if isinstance(entries, dict) else {}

    @staticmethod
    def key(file: Path, schema_name: str) -> list[Any]:
        content = hashlib.sha256(file.read_bytes()).hexdigest()
        return [content, schema_name, ValidationCache.schema_digest(schema_name)]

    @staticmethod
    @cache
    def schema_digest(name: str) -> str:
        return hashlib.sha256(json.dumps(schema(name)).encode()).hexdigest()[:16]

    def check(self, data: Any, schema_name: str, where: str, file: Path) -> list[str]:
        try:
            key = self.key(file, schema_name)
        except OSError:
            return validate(data, schema_name, where)
        if self.entries.get(str(file)) == key:
            return []
        errors = validate(data, schema_name, where)
        if not errors:
            self.entries[str(file)] = key
            self.changed = True
        return errors

    def read(
        self, file: Path, schema_name: str, where: str, problems: list[str]
    ) -> dict[str, Any] | None:
        """The file's data if it is valid (from the cache when unchanged), else None with its
        problems appended. Valid data holds only JSON types (the schemas allow no dates)."""
        try:
            key = self.key(file, schema_name)
        except OSError as e:
            problems.append(f"{where}: cannot read: {e.strerror}")
            return None
        hit = self.entries.get(str(file))
        if isinstance(hit, list) and len(hit) == 2 and hit[0] == key:
            return hit[1]
        raw = read_toml(file, problems, where)
        if raw is None:
            return None
        errors, valid_hosts = self.validate_file(raw, schema_name, where, file)
        if errors:
            problems += errors
            return None
        with contextlib.suppress(OSError):
            if self.key(file, schema_name) == key:  # not edited while it was parsed
                self.entries[str(file)] = [key, raw]
                if valid_hosts is not None:
                    self.entries[HOSTS_SLOT + str(file)] = [key[2], valid_hosts]
                self.changed = True
        return raw

    def read_inventory(
        self, file: Path, where: str, problems: list[str]
    ) -> tuple[dict[str, Any], list[str] | None] | None:
        """read() of a nodes.d file, host by host (site/inventory.py): after one node of a
        10,000-node file changed, only its chunk is parsed and validated. The file's entry is
        [key, prefix digest, prefix data, [[chunk digest, host table], ...] in file order],
        each table valid. A file that does not cut into hosts is read() whole. Returns the
        data and the digest of each host's chunk in file order (None: read whole), which the
        hosts' origins name."""
        try:
            blob = file.read_bytes()
        except OSError as e:
            problems.append(f"{where}: cannot read: {e.strerror}")
            return None
        key = [hashlib.sha256(blob).hexdigest(), "nodes", self.schema_digest("nodes")]
        entry = self.entries.get(str(file))
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == key:
            return self.read_whole(file, where, problems)  # read whole before, unchanged
        known = inventory.remembered(entry, key)
        if known is not None and known.key == key:
            return inventory.assemble(known.prefix, known.hosts), [d for d, _ in known.pairs]
        parsed = inventory.parse(blob, known.by_digest if known is not None else {})
        if parsed is None:
            return self.read_whole(file, where, problems)
        errors = []
        if known is None or known.prefix_digest != parsed.prefix_digest:  # else valid still
            errors += validate({**parsed.prefix, "hosts": []}, "nodes", where)
        for i in parsed.new:
            # Validated alone as hosts[0] of an otherwise empty file: renumbered to its place.
            alone = validate({"hosts": [parsed.hosts[i]]}, "nodes", where)
            errors += [e.replace(f"{where}: .hosts[0]", f"{where}: .hosts[{i}]", 1) for e in alone]
        if errors:
            problems += errors
            return None
        with contextlib.suppress(OSError):
            if self.key(file, "nodes") == key:  # not edited while it was parsed
                self.entries[str(file)] = inventory.entry(key, parsed)
                self.entries.pop(HOSTS_SLOT + str(file), None)  # the whole-file way's
                self.changed = True
        return parsed.data, parsed.digests

    def read_whole(
        self, file: Path, where: str, problems: list[str]
    ) -> tuple[dict[str, Any], None] | None:
        data = self.read(file, "nodes", where, problems)
        return None if data is None else (data, None)

    def validate_file(
        self, raw: dict[str, Any], schema_name: str, where: str, file: Path
    ) -> tuple[list[str], list[str] | None]:
        """validate(); an inventory host by host, so that editing one node of a 10 000-node
        file validates that node (and the file without its hosts), not 10 000 of them: a host
        whose table is the same as when the file last validated is valid still. Returns the
        errors and, for an inventory, the digests of its hosts (what the next edit compares)."""
        hosts = raw.get("hosts")
        if schema_name != "nodes" or not isinstance(hosts, list):
            return validate(raw, schema_name, where), None
        slot = self.entries.get(HOSTS_SLOT + str(file))
        schema_key = self.schema_digest(schema_name)
        known = set(slot[1]) if isinstance(slot, list) and slot[:1] == [schema_key] else set()
        errors = validate({**raw, "hosts": []}, schema_name, where)
        digests = []
        for i, host in enumerate(hosts):
            digest = hashlib.sha256(json.dumps(host, sort_keys=True).encode()).hexdigest()[:32]
            digests.append(digest)
            if digest not in known:
                # Validated alone as hosts[0] of an otherwise empty file: renumbered to its place.
                alone = validate({"hosts": [host]}, schema_name, where)
                errors += [
                    e.replace(f"{where}: .hosts[0]", f"{where}: .hosts[{i}]", 1) for e in alone
                ]
        return errors, digests

    def save(self) -> None:
        # Never the first thing written for a site: a check of a site that was not built yet
        # leaves no trace.
        if self.path is None or not self.changed or not self.path.parent.is_dir():
            return
        with contextlib.suppress(OSError):  # only a speed-up
            # Not key-sorted: a cache, not an output, and sorting 10,000 host tables costs.
            write_text(self.path, json.dumps(self.entries, separators=(",", ":")))


def validate(data: Any, schema_name: str, where: str) -> list[str]:
    import jsonschema  # only when a file really needs validating: the import is slow

    validator = strict_validator()(schema(schema_name), format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{where}: {json_path(e.absolute_path)}: {brief(e)}" for e in errors]


def anchored(pattern: str) -> str:
    r"""JSON Schema patterns are ECMA-262 regexes, whose `$` is the end of the string; Python's
    `$` also matches before a final newline, so "eth0\n" would pass "^[a-z0-9]+$" and end a
    line of a generated file. The schemas use `$` only as that anchor (a test checks), so each
    unescaped `$` becomes Python's `\Z`."""
    return re.sub(r"(?<!\\)\$", r"\\Z", pattern)


@cache
def strict_validator() -> Any:
    import jsonschema

    def pattern(validator: Any, patrn: str, instance: Any, subschema: Any) -> Any:
        if validator.is_type(instance, "string") and not re.search(anchored(patrn), instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {patrn!r}")

    return jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": pattern})


def brief(error: Any) -> str:
    # oneOf failures are unreadable by default; say what the alternatives were instead.
    if error.validator == "oneOf":
        return f"{error.instance!r} is not a valid address (expected an IPv4 string or a table)"
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties", "unknown field(s)")
    # A pattern says what it accepts in words (`expected`): the regex is for the schema's reader.
    if error.validator == "pattern" and "expected" in error.schema:
        return f"{error.instance!r}: expected {error.schema['expected']}"
    return str(error.message)


def read_toml(path: Path, problems: list[str], where: str) -> dict[str, Any] | None:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        problems.append(f"{where}: {e}")
    except UnicodeDecodeError as e:
        problems.append(f"{where}: not UTF-8 text (invalid byte at offset {e.start})")
    except RecursionError:
        problems.append(f"{where}: nested too deeply to be a site file")
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        problems.append(f"{where}: {e}")
    except OSError as e:
        problems.append(f"{where}: cannot read: {e.strerror}")
    return None


def rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def load_site(root: Path | str = ".") -> Site:
    """Read, validate and freeze the site below `root`; ConfigError lists every problem."""
    with gc_paused():
        return read_site(Path(root).resolve())


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cycle collector paused: a 10,000-node site makes some 200,000 objects, none
    in a cycle, and each collection the allocations trigger walks all of them again (20 ms of
    a 100 ms load). Collection resumes afterwards; nothing is lost, only deferred."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_site(root: Path) -> Site:
    problems: list[str] = []
    site_path = root / SITE_FILE
    if not site_path.exists():
        raise ConfigError([f"{site_path}: no site settings file (is {root} a qlimage site?)"])
    raw = read_toml(site_path, problems, SITE_FILE)
    if raw is None:  # nothing else can be checked without it
        raise ConfigError(problems)
    paths_ok = isinstance(raw.get("paths", {}), dict)  # not validated yet
    bootfiles = setting(raw, "paths", "bootfiles") if paths_ok else None
    checked = ValidationCache(
        (root / os.path.expanduser(bootfiles) / VALIDATION_CACHE)
        if isinstance(bootfiles, str)
        else None
    )
    problems += checked.check(raw, "site", SITE_FILE, site_path)
    if problems:
        raise ConfigError(problems)

    paths = make_paths(root, raw)
    networks = make_networks(raw["networks"], problems)
    chroot_tasks = make_chroot_tasks(raw.get("chroot_tasks", {}))
    chroots = load_chroots(paths, raw["head"]["address"], problems, checked, chroot_tasks)
    images = load_images(paths, chroots, problems, checked)
    # Names of images whose file is invalid: reported by itself, not again as "unknown image".
    broken = {p.stem for p in toml_files(paths.images, [], root)} - {
        i.source.stem for i in images.values()
    }
    bootconfigs = make_bootconfigs(
        raw.get("bootconfigs", {}), images, problems, setting(raw, "head", "http_port")
    )
    boot = raw.get("boot", {})
    default = boot.get("default")
    if default is not None and default not in bootconfigs:
        problems.append(f"{SITE_FILE}: .boot.default: unknown boot config {default!r}")
    hosts, origins = load_hosts(
        paths, networks, images, bootconfigs, chroots, problems, checked, raw["head"]["address"],
        broken,
    )  # fmt: skip
    recipes = load_recipes(paths, problems, checked)
    check_squashfs(raw, problems)
    check_multicast(raw, problems)
    name = raw.get("site", {}).get("name", root.name)
    if not SITE_NAME.fullmatch(name):
        problems.append(
            f"{SITE_FILE}: .site.name: {name!r} (the default is the site directory's name):"
            " expected printable characters without control characters"
        )
    for bc in bootconfigs.values():
        if bc.image not in images and bc.image not in broken:
            problems.append(
                f"{SITE_FILE}: .bootconfigs.{bc.name}.image: unknown image {bc.image!r}"
                f" (images.d has: {', '.join(sorted(images)) or 'none'})"
            )
    if problems:
        raise ConfigError(problems)
    checked.save()

    # Hosts that name only an image boot through an implicit boot config of that name.
    all_bootconfigs = dict(bootconfigs)
    for host in hosts:
        if host.bootconfig not in all_bootconfigs:
            all_bootconfigs[host.bootconfig] = BootConfig(host.bootconfig, host.bootconfig, "", "")

    epoch = source_date_epoch(raw)
    head = raw["head"]
    archive = raw.get("archive", {})
    kernel = raw.get("kernel", {})
    compressor = setting(raw, "squashfs", "compressor")
    return Site(
        name=name,
        source_date_epoch=epoch,
        head_address=head["address"],
        http_port=setting(raw, "head", "http_port"),
        head_shadow=root / setting(raw, "head", "shadow"),
        paths=paths,
        archive=Archive(
            sources=tuple(
                (s["uri"].rstrip("/"), tuple(s["suites"]), tuple(s.get("components", ["main"])))
                for s in archive.get("sources", [])
            ),
            arch=setting(raw, "archive", "arch"),
            index_max_age=float(setting(raw, "archive", "index_max_age")),
        ),
        kernel_package=setting(raw, "kernel", "package"),
        kernel_deb=(root / kernel["deb"]) if "deb" in kernel else None,
        initrd_modules=tuple(setting(raw, "initrd", "modules")),
        squashfs_compressor=compressor,
        squashfs_level=setting(raw, "squashfs", "level") or default_level(compressor),
        squashfs_block_size=setting(raw, "squashfs", "block_size"),
        networks=MappingProxyType(networks),
        images=MappingProxyType(images),
        bootconfigs=MappingProxyType(all_bootconfigs),
        default_bootconfig=default,
        serial=setting(raw, "boot", "serial"),
        console=setting(raw, "boot", "console"),
        keep_generations=setting(raw, "publish", "keep"),
        boot_test=setting(raw, "publish", "boot_test"),
        boot_test_timeout=float(setting(raw, "publish", "boot_test_timeout")),
        hosts=tuple(sorted(hosts, key=attrgetter("name"))),
        host_origins=MappingProxyType(origins),
        recipes=tuple(recipes),
        chroots=MappingProxyType(chroots),
        chroot_tasks=MappingProxyType(chroot_tasks),
        admin_networks=tuple(setting(raw, "head", "admin_networks")),
        dns_servers=tuple(setting(raw, "head", "dns")),
        serve_dns=setting(raw, "head", "serve_dns"),
        multicast=make_multicast(raw),
    )


# What names the site in generated files (the apt hook's config comment): one line.
SITE_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,128}")
# mksquashfs, cpio (newc: 8 hex digits) and tar all store a time as an unsigned 32-bit number.
MAX_EPOCH = 2**32 - 1


def source_date_epoch(raw: Mapping[str, Any]) -> int:
    """site.toml's value (its schema bounds it), else $SOURCE_DATE_EPOCH, else the default."""
    key = "source_date_epoch"
    epoch = raw.get("site", {}).get(key)
    if epoch is not None:
        return int(epoch)
    env_epoch = os.environ.get("SOURCE_DATE_EPOCH", str(setting({}, "site", key)))
    # Not str.isdigit(): it is true for digits int() refuses, such as "²".
    if not re.fullmatch(r"[0-9]{1,10}", env_epoch) or int(env_epoch) > MAX_EPOCH:
        raise ConfigError(
            [f"SOURCE_DATE_EPOCH: {env_epoch!r}: expected seconds since 1970, 0 to {MAX_EPOCH}"]
        )
    return int(env_epoch)


# The levels mksquashfs accepts per compressor (`mksquashfs -help`); None: it has no levels.
# lz4 has only -Xhc, which squashfs.py selects for a level of 9 or more (lz4's own HC levels).
SQUASHFS_LEVELS: Mapping[str, tuple[int, int] | None] = MappingProxyType(
    {"gzip": (1, 9), "lzo": (1, 9), "zstd": (1, 22), "lz4": (1, 12), "xz": None}
)


def mcast_setting(raw: Mapping[str, Any], key: str) -> Any:
    return setting(raw, "multicast", key)


def check_multicast(raw: Mapping[str, Any], problems: list[str]) -> None:
    """What the schema cannot say of [multicast]: the ranges fit, and the control port is not
    one a session could take."""
    where = f"{SITE_FILE}: .multicast"
    first, last = mcast_setting(raw, "data_port_first"), mcast_setting(raw, "data_port_last")
    if last - first < 1:
        problems.append(
            f"{where}.data_port_last: {last}: expected at least data_port_first + 1"
            f" ({first + 1}): a session uses a pair of ports"
        )
    port = mcast_setting(raw, "port")
    if first <= port <= last:
        problems.append(
            f"{where}.port: {port}: expected a port outside data_port_first .. data_port_last"
            f" ({first} .. {last})"
        )
    base = ipaddress.IPv4Address(mcast_setting(raw, "group_base"))
    groups = mcast_setting(raw, "groups")
    if base in ipaddress.IPv4Network("224.0.0.0/24") or int(base) + groups - 1 > int(
        ipaddress.IPv4Address("239.255.255.255")
    ):
        problems.append(
            f"{where}.group_base: {str(base)!r} with {groups} groups: expected groups inside"
            " 224.0.1.0 .. 239.255.255.255 (224.0.0.x is link-local control traffic)"
        )


def make_multicast(raw: Mapping[str, Any]) -> Multicast:
    return Multicast(
        enabled=mcast_setting(raw, "enabled"),
        address=mcast_setting(raw, "address") or raw["head"]["address"],
        port=mcast_setting(raw, "port"),
        group_base=mcast_setting(raw, "group_base"),
        groups=mcast_setting(raw, "groups"),
        data_port_first=mcast_setting(raw, "data_port_first"),
        data_port_last=mcast_setting(raw, "data_port_last"),
        window=float(mcast_setting(raw, "window")),
        max_bitrate=mcast_setting(raw, "max_bitrate"),
    )


def check_squashfs(raw: Mapping[str, Any], problems: list[str]) -> None:
    """A level the compressor has: mksquashfs would refuse it in the middle of a build."""
    level = raw.get("squashfs", {}).get("level")
    if level is None:
        return
    compressor = setting(raw, "squashfs", "compressor")
    levels = SQUASHFS_LEVELS[compressor]
    if levels is None:
        problems.append(
            f"{SITE_FILE}: .squashfs.level: {compressor} takes no compression level; remove it"
        )
    elif not levels[0] <= level <= levels[1]:
        problems.append(
            f"{SITE_FILE}: .squashfs.level: {level} is not a {compressor} level"
            f" (expected {levels[0]} to {levels[1]})"
        )


def default_level(compressor: str) -> int | None:
    """zstd 15 unless the site says otherwise. Measured on a 720 MB tree (bench_pipeline.py):
    zstd 3 packs in 9.8 s to 42.7 %, zstd 15 in 35 s to 38.8 %, gzip in 25 s to 41.3 %, xz in
    63 s to 36.8 %. The image stays in every node's RAM for its whole uptime and goes out by
    multicast, so its size matters more than a build that runs after module upgrades; zstd
    decompresses several times faster than xz on the node. Other compressors keep
    mksquashfs' own default."""
    return 15 if compressor == "zstd" else None


def make_paths(root: Path, raw: Mapping[str, Any]) -> Paths:
    def p(key: str) -> Path:
        value = setting(raw, "paths", key)
        if key == "cache" and key not in raw.get("paths", {}):
            value = os.environ.get("QLIMAGE_CACHE", value)
        return (root / os.path.expanduser(value)).resolve()

    keys = ("bootfiles", "pool", "images", "nodes", "overlays", "rootfs", "chroots", "modules",
            "chroot_trees")  # fmt: skip
    return Paths(root=root, cache=p("cache"), **{key: p(key) for key in keys})


def make_networks(raw: Mapping[str, Any], problems: list[str]) -> dict[str, Network]:
    networks: dict[str, Network] = {}
    for name, net in sorted(raw.items()):
        try:
            cidr = ipaddress.IPv4Network(net["cidr"], strict=False)
        except ValueError as e:
            problems.append(f"{SITE_FILE}: .networks.{name}.cidr: {e}")
            continue
        networks[name] = Network(
            name,
            cidr,
            net.get("gateway"),
            net.get("mtu"),
            net.get("boot", False),
            net.get("suffix", ""),
        )
    boot = [n for n in networks.values() if n.boot]
    if len(boot) != 1:
        problems.append(
            f"{SITE_FILE}: .networks: exactly one network needs boot = true"
            f" (found {len(boot)}: {', '.join(n.name for n in boot) or 'none'})"
        )
    return networks


# Names of site files and directories that name things: they appear in generated files (a
# nodes.d file name in every option file's header) and in error lines.
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def toml_files(directory: Path, problems: list[str], root: Path) -> Iterator[Path]:
    if not directory.is_dir():
        return
    for path in sorted(p for p in directory.iterdir() if p.suffix == ".toml" and p.is_file()):
        if FILE_NAME.fullmatch(path.name):
            yield path
        else:
            problems.append(f"{bad_name(path, root)}: expected letters, digits, '.', '_', '+', '-'")


def bad_name(path: Path, root: Path) -> str:
    """A file name that may hold a newline, for a one-line message: as a Python literal."""
    return f"{rel(path.parent, root)}/{path.name!a}"


def make_chroot_tasks(raw: Mapping[str, Any]) -> dict[str, ChrootTask]:
    return {
        name: ChrootTask(name, tuple(t["packages"]), t.get("description", ""))
        for name, t in sorted(raw.items())
    }


def load_chroots(
    paths: Paths,
    head: str,
    problems: list[str],
    checked: ValidationCache,
    tasks: Mapping[str, ChrootTask] | None = None,
) -> dict[str, Chroot]:
    chroots: dict[str, Chroot] = {}
    for path in sorted(paths.chroots.glob("*/chroot.toml")):
        name = path.parent.name
        if not CHROOT_NAME.fullmatch(name):
            problems.append(
                f"{bad_name(path.parent, paths.root)}: a chroot name: expected lower-case"
                " letters, digits, '.', '_', '-' (what images and hosts can name)"
            )
            continue
        where = rel(path, paths.root)
        raw = checked.read(path, "chroot", where, problems)
        if raw is None:
            continue
        for task in raw.get("tasks", []):
            if task not in (tasks or {}):
                problems.append(
                    f"{where}: .tasks: no chroot task {task!r} (site.toml [chroot_tasks] has:"
                    f" {', '.join(sorted(tasks or {})) or 'none'})"
                )
        # The head exports the tree to every node with no_root_squash: it must be one of the
        # chroot trees, never the head's / or the site (with its secrets), not even by a link.
        given = paths.root / raw["path"] if "path" in raw else paths.chroot_trees / name
        real = given.resolve()
        if paths.chroot_trees not in real.parents:
            problems.append(
                f"{where}: .path: {str(given)!r} (really {str(real)!r}) is not below [paths]"
                f" chroot_trees ({paths.chroot_trees}), where the head keeps its chroot trees"
            )
            continue
        tree = str(real)
        chroots[name] = Chroot(
            name,
            raw.get("server", head),
            raw.get("port", 2049),
            raw.get("export", tree),
            raw.get("description", ""),
            path=tree,
            flavor=raw.get("flavor", ""),
            version=raw.get("version", ""),
            tasks=tuple(raw.get("tasks", ())),
        )
    return chroots


CHROOT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")  # the schema's pattern for a chroot reference


def missing_chroot(paths: Paths, chroots: Mapping[str, Chroot], name: str) -> bool:
    """True when nothing defines the chroot (an invalid definition is reported by itself)."""
    return name not in chroots and not (paths.chroots / name / "chroot.toml").exists()


def load_images(
    paths: Paths, chroots: Mapping[str, Chroot], problems: list[str], checked: ValidationCache
) -> dict[str, Image]:
    images: dict[str, Image] = {}
    for path in toml_files(paths.images, problems, paths.root):
        where = rel(path, paths.root)
        raw = checked.read(path, "image", where, problems)
        if raw is None:
            continue
        name = raw["name"]
        if name in images:
            problems.append(
                f"{where}: .name: image {name!r} is already defined in "
                f"{rel(images[name].source, paths.root)}"
            )
            continue
        chroot = raw.get("chroot") or None
        if chroot is not None and missing_chroot(paths, chroots, chroot):
            problems.append(
                f"{where}: .chroot: no chroot {chroot!r} (no {chroot}/chroot.toml "
                f"under {paths.chroots})"
            )
        modules = ["core", *(m for m in raw["modules"] if m != "core")]
        images[name] = Image(
            name,
            raw["flavor"],
            raw["version"],
            tuple(modules),
            chroot,
            raw.get("description", ""),
            path,
            listed=tuple(raw["modules"]),
        )
    return images


def make_bootconfigs(
    raw: Mapping[str, Any], images: Mapping[str, Image], problems: list[str], http_port: int
) -> dict[str, BootConfig]:
    for name, bc in raw.items():
        if reserved_pxelinux_name(name):
            problems.append(
                f"{SITE_FILE}: .bootconfigs.{name}: {name!r} is reserved in pxelinux.cfg"
                " (default, or an 8-digit HOSTID); choose another name"
            )
        # Debian's signed GRUB 2.06 always connects to port 80: a head serving another port
        # needs an address whose port 80 reaches it, or GRUB would fetch nothing.
        if bc.get("grub_fetch") == "http" and "grub_http_server" not in bc and http_port != 80:
            problems.append(
                f"{SITE_FILE}: .bootconfigs.{name}.grub_fetch: 'http' needs HTTP on port 80"
                f" (GRUB 2.06 cannot name a port) but head.http_port is {http_port}; set"
                f" .bootconfigs.{name}.grub_http_server to an address whose port 80 serves the"
                " head's files, or use 'tftp'"
            )
    return {
        name: BootConfig(
            name,
            bc["image"],
            bc.get("append", ""),
            bc.get("description", ""),
            bc.get("loader", bootconfig_default("loader")),
            bc.get("grub_fetch", bootconfig_default("grub_fetch")),
            bc.get("grub_http_server", ""),
        )
        for name, bc in sorted(raw.items())
    }


def load_hosts(
    paths: Paths,
    networks: Mapping[str, Network],
    images: Mapping[str, Image],
    bootconfigs: Mapping[str, BootConfig],
    chroots: Mapping[str, Chroot],
    problems: list[str],
    checked: ValidationCache,
    head: str,
    broken: set[str],
) -> tuple[list[Host], dict[int, tuple[Host, str]]]:
    """Every host of nodes.d, checked against the rest of the site, and the origin of each
    host of a file read host by host (Site.host_origins). Paid per host of a 10,000-node site
    on every build, so what can be is worked out once per site (the images a host can name
    alone, the networks' ranges), and a value's claim keeps the host's place, not a message:
    messages are only worded for the problems found."""
    hosts: list[Host] = []
    origins: dict[int, tuple[Host, str]] = {}
    # Value -> the place that claimed it first: the host's `at` (names, MACs) or, for an
    # address, (`at`, network). A claim is its own: `is` tells a clash from itself.
    names: dict[str, str] = {}
    macs: dict[str, str] = {}
    claimed: dict[str, tuple[str, str]] = {}
    boot_name = next((n.name for n in networks.values() if n.boot), None)
    ranges = {name: host_range(net) for name, net in networks.items()}
    head_canonical = canonical_ipv4(head) is not None  # else: the slow way
    plain = images_named_alone(images, bootconfigs)
    files = read_inventories(paths, problems, checked)
    optionsets, groups = collect_named([(where, raw) for where, raw, _ in files], problems)
    refs = NamedRefs(optionsets, groups)
    for where, raw, digests in files:
        stem = origin_stem(where) if digests is not None else ""
        for i, h in enumerate(raw.get("hosts", [])):
            at = f"{where}: .hosts[{i}]"
            name = h["name"]
            first = names.setdefault(name, at)
            if first is not at:
                problems.append(f"{at}.name: name {name!r} is already used by {first}.name")
            mac = h["mac"].lower()
            first = macs.setdefault(mac, at)
            if first is not at:
                problems.append(f"{at}.mac: MAC {mac!r} is already used by {first}.mac")
            if not unicast_mac(mac):
                problems.append(
                    f"{at}.mac: {h['mac']} is a broadcast, multicast or zero MAC;"
                    " expected the station address of the node's NIC"
                )
            addresses = []
            nets = h["networks"]
            for net_name, value in sorted(nets.items()) if len(nets) > 1 else nets.items():
                if net_name not in networks:
                    problems.append(
                        f"{at}.networks.{net_name}: unknown network (site.toml "
                        f"defines: {', '.join(sorted(networks))})"
                    )
                    continue
                # A table, or just the address (no dict made for the usual host).
                address = value["address"] if isinstance(value, dict) else value
                fine = head_canonical and usable(address, ranges[net_name], head)
                unusable = "" if fine else unusable_address(address, networks[net_name], head)
                if unusable:
                    problems.append(f"{at}.networks.{net_name}: {address} {unusable}")
                mine = (at, net_name)
                place = claimed.setdefault(address, mine)
                if place is not mine:
                    problems.append(
                        f"{at}.networks.{net_name}: address {address!r} is already used by"
                        f" {place[0]}.networks.{place[1]}"
                    )
                if isinstance(value, dict):
                    hostname = value.get("hostname", name)
                    aliases = tuple(value["aliases"]) if "aliases" in value else ()
                else:
                    hostname, aliases = name, ()
                addresses.append(new_address(net_name, address, hostname, aliases))
            if boot_name is not None and boot_name not in nets:
                problems.append(f"{at}.networks: no address on the boot network {boot_name!r}")
            image = h.get("image")
            if image in plain and "bootconfig" not in h:
                bootconfig = image  # what host_bootconfig answers, without a problem
            else:
                bootconfig = host_bootconfig(h, images, bootconfigs, at, problems, broken)
            option_map: Mapping[str, Any]
            source_map: Mapping[str, str]
            named = "groups" in h or "optionsets" in h
            if named or "options" in h:
                options, sources = merge_options(h, optionsets, groups, at, problems)
                check_options(options, sources, h, paths, chroots, at, problems)
                option_map, source_map = MappingProxyType(options), MappingProxyType(sources)
            else:
                option_map, source_map = NO_OPTIONS, NO_OPTIONS
            hosts.append(
                new_host(
                    name,
                    mac,
                    tuple(addresses),
                    bootconfig,
                    where,
                    option_map,
                    source_map,
                    host_keys(h["ssh_host_keys"], f"{at}.ssh_host_keys", problems)
                    if "ssh_host_keys" in h
                    else (),
                )
            )
            if digests is not None:
                host = hosts[-1]
                refs_digest = refs.digest(h) if named else ""
                origins[id(host)] = (host, f"{stem}{digests[i]}{refs_digest}")
    problems += ssh_name_problems(hosts)
    return hosts, origins


def read_inventories(
    paths: Paths, problems: list[str], checked: ValidationCache
) -> list[tuple[str, dict[str, Any], list[str] | None]]:
    """Each valid nodes.d file: (its name, its data, its hosts' chunk digests or None)."""
    files = []
    for path in toml_files(paths.nodes, problems, paths.root):
        where = rel(path, paths.root)
        read = checked.read_inventory(path, where, problems)
        if read is not None:
            files.append((where, *read))
    return files


def images_named_alone(
    images: Mapping[str, Image], bootconfigs: Mapping[str, BootConfig]
) -> frozenset[str]:
    """The images a host naming only an image boots with no problem (see host_bootconfig):
    asked once per site, not once per host."""
    return frozenset(
        name
        for name in images
        if not reserved_pxelinux_name(name)
        and (name not in bootconfigs or bootconfigs[name].image == name)
    )


# The options of a host that has none: one empty mapping, shared (it cannot be changed).
NO_OPTIONS: Mapping[str, Any] = MappingProxyType({})

_new = object.__new__


def new_host(
    name: str,
    mac: str,
    addresses: tuple[HostAddress, ...],
    bootconfig: str,
    source: str,
    options: Mapping[str, Any],
    option_sources: Mapping[str, str],
    ssh_host_keys: tuple[str, ...],
) -> Host:
    """Host(...) at half the cost of a frozen dataclass's __init__ (which
    sets each field through object.__setattr__): 10,000 hosts a load. The same object, field
    for field; a test holds it to Host's fields."""
    host = _new(Host)
    d = host.__dict__
    d["name"] = name
    d["mac"] = mac
    d["addresses"] = addresses
    d["bootconfig"] = bootconfig
    d["source"] = source
    d["options"] = options
    d["option_sources"] = option_sources
    d["ssh_host_keys"] = ssh_host_keys
    return host


def new_address(network: str, address: str, hostname: str, aliases: tuple[str, ...]) -> HostAddress:
    """HostAddress(...) the way new_host makes a Host."""
    value = _new(HostAddress)
    d = value.__dict__
    d["network"] = network
    d["address"] = address
    d["hostname"] = hostname
    d["aliases"] = aliases
    return value


# --- origins: what a loaded Host was made of -------------------------------------------------
#
# A host's origin is `stem + chunk digest + refs`: the stem names the loader's code and the
# nodes.d file, the chunk digest the bytes of the host's own `[[hosts]]` table (inventory.py;
# the validation cache keeps each chunk's table by that digest), refs the options its groups
# and option sets give it (NamedRefs; "" when it names none). Each piece has a fixed length,
# so the string reads back into its pieces.
#
# Those are all a Host is made of: its fields come from its table (name, MAC, addresses,
# boot config or image, inline options, host keys), the file (`source`) and the options its
# groups and option sets give it, which its inline table then overrides (merge_options).
# Everything else load_hosts reads (networks, images, boot configs, chroots, rootfs trees, the
# head's address, the other hosts) only decides whether the site has a problem, and a site
# with one does not load. So two loaded hosts of one origin are equal, and a key of the
# origin stands for every field (tests/test_host_origin.py holds both to every kind of edit).


@cache
def loader_digest() -> str:
    """The code that turns a host's table into a Host (this module, which also makes every
    Host, see new_host, and the inventory's cut): a change to it may change any host."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("load.py", "inventory.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()


def origin_stem(where: str) -> str:
    """The part of an origin that all hosts of one nodes.d file share (16 hex digits)."""
    text = f"{loader_digest()}\0{where}"
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


class NamedRefs:
    """What a host's `groups` and `optionsets` give it, as one digest (16 hex digits; "" for
    a host that names none), worked out once per distinct pair of lists."""

    def __init__(
        self,
        optionsets: Mapping[str, tuple[str, dict[str, Any]]],
        groups: Mapping[str, tuple[str, dict[str, Any]]],
    ) -> None:
        self.optionsets = optionsets
        self.groups = groups
        self.known: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {}

    def digest(self, h: Mapping[str, Any]) -> str:
        if "groups" not in h and "optionsets" not in h:
            return ""
        names = (tuple(h.get("groups", ())), tuple(h.get("optionsets", ())))
        if names not in self.known:
            self.known[names] = self.work_out(*names)
        return self.known[names]

    def work_out(self, groups: tuple[str, ...], optionsets: tuple[str, ...]) -> str:
        # The options and their sources those lists give, as merge_options gives them before
        # the host's inline table (its last layer, in the host's own chunk), in key order as
        # the bundle key reads them: an edit of a group or option set that leaves them as
        # they were changes no host. An unknown name is a problem, and such a site does not
        # load, so the problems are not kept.
        named = {"groups": list(groups), "optionsets": list(optionsets)}
        options, sources = merge_options(named, self.optionsets, self.groups, "", [])
        text = json.dumps([options, sources], sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# Key types a host key can have (sshd's HostKey types; no ssh-dss, which OpenSSH dropped, and no
# security-key types, which are user keys only).
SSH_HOST_KEY_TYPES = frozenset(
    {"ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521"}
)


def host_keys(keys: list[str], at: str, problems: list[str]) -> tuple[str, ...]:
    """The host's public keys as "type base64": they become known_hosts lines, so nothing in
    one may start another line, add a host pattern or a marker (@cert-authority), or carry a
    private key."""
    out = []
    for i, key in enumerate(keys):
        problem = host_key_problem(key)
        if problem:
            problems.append(f"{at}[{i}]: {problem}")
        else:
            kind, blob = key.split()[:2]
            out.append(f"{kind} {blob}")  # the comment is the key owner's note, not ours
    return tuple(out)


CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def host_key_problem(key: str) -> str:
    """Why `key` is not one public host key line, or "". A pasted private key is named as such
    and never echoed: error lines end up in terminals, logs and CI output."""
    if "PRIVATE KEY" in key or key.lstrip().startswith("-----BEGIN"):
        return (
            "a private key; expected the public key (the .pub file): private host keys stay"
            " on their node and never enter the site"
        )
    if CONTROL_CHARACTER.search(key):
        return f"{key[:40]!r}: holds a control character or line break; expected one line"
    words = key.split()
    if not words or words[0] not in SSH_HOST_KEY_TYPES:
        types = ", ".join(sorted(SSH_HOST_KEY_TYPES))
        return f"{key[:40]!r}: expected a host key type ({types}), then the base64 key"
    problem = authorized_key_problem(key)
    return f"{key[:40]!r}: {problem}" if problem else ""


def ssh_name_problems(hosts: list[Host]) -> list[str]:
    """A host name or alias names one host: ssh_known_hosts and shosts.equiv would otherwise
    trust one host's key or logins for another."""
    problems = []
    owner: dict[str, Host] = {}
    for host in hosts:
        addresses = host.addresses
        if len(addresses) == 1 and addresses[0].hostname == host.name and not addresses[0].aliases:
            # The usual host, one address named by its inventory name: one name to own, as the
            # loop below owns it (its second look at the same name changes nothing).
            first = owner.setdefault(host.name, host)
            if first is not host and first.name != host.name:
                problems.append(
                    f"{host.source}: host {host.name}: .networks.{addresses[0].network}: name"
                    f" {host.name!r} is already a name of host {first.name} ({first.source})"
                )
            continue
        reported = set()
        for a in host.addresses:
            for name in (host.name, a.hostname, *a.aliases):
                first = owner.setdefault(name, host)
                # A clash of inventory names is reported by load_hosts already.
                if first is host or first.name == host.name or name in reported:
                    continue
                reported.add(name)
                problems.append(
                    f"{host.source}: host {host.name}: .networks.{a.network}: name {name!r}"
                    f" is already a name of host {first.name} ({first.source})"
                )
    return problems


def unicast_mac(mac: str) -> bool:
    """A NIC's own address, six hex pairs as the schema lets them through: not all zeros, and
    the group bit (multicast, broadcast), the lowest of the first octet, clear. Read off the
    text (the second hex digit is odd), not as a number: 10,000 hosts a load."""
    return mac[1] not in "13579bdfBDF" and mac != "00:00:00:00:00:00"


def unusable_address(address: str, net: Network, head: str) -> str:
    """Why a host cannot have `address` on `net`, or "": outside the network, its network or
    broadcast address (none on /31 and /32 networks, RFC 3021), or the head's own address."""
    addr = ipaddress.IPv4Address(address)
    if addr not in net.cidr:
        return f"is outside {net.cidr}"
    if net.cidr.prefixlen < 31 and addr in (net.cidr.network_address, net.cidr.broadcast_address):
        kind = "network" if addr == net.cidr.network_address else "broadcast"
        return f"is the {kind} address of {net.cidr}; expected a host address"
    if addr == ipaddress.IPv4Address(head):
        return "is the head's own address (site.toml .head.address)"
    return ""


def host_range(net: Network) -> tuple[int, int]:
    """The first and last address a host can have on `net`, as integers (see usable)."""
    low, high = int(net.cidr.network_address), int(net.cidr.broadcast_address)
    return (low + 1, high - 1) if net.cidr.prefixlen < 31 else (low, high)


def usable(address: str, host_range: tuple[int, int], head: str) -> bool:
    """The common case of unusable_address at an eighth of its cost (1 against 8 µs, paid for
    each of 10,000 hosts): a canonical dotted quad (what the schema's ipv4 format lets
    through) inside the network's host_range that is not the (canonical) `head`. False: ask
    unusable_address, which words the problem."""
    value = canonical_ipv4(address)
    return value is not None and host_range[0] <= value <= host_range[1] and address != head


def canonical_ipv4(text: str) -> int | None:
    """The address `text` spells the way ipaddress does (dotted decimal, no leading zeros),
    as an integer; else None. inet_aton alone also reads "10.1", "0x0a.0.0.1", "010.0.0.1"."""
    try:
        packed = socket.inet_aton(text)
    except (OSError, ValueError):  # ValueError: a NUL or a character that is not ASCII
        return None
    return int.from_bytes(packed, "big") if socket.inet_ntoa(packed) == text else None


def collect_named(
    files: list[tuple[str, dict[str, Any]]], problems: list[str]
) -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, tuple[str, dict[str, Any]]]]:
    """Option sets and groups from every nodes.d file: {name: (defining file, definition)}."""
    optionsets: dict[str, tuple[str, dict[str, Any]]] = {}
    groups: dict[str, tuple[str, dict[str, Any]]] = {}
    for where, raw in files:
        for kind, table in (("optionsets", optionsets), ("groups", groups)):
            for name, value in raw.get(kind, {}).items():
                if name in table:
                    problems.append(f"{where}: .{kind}.{name}: already defined in {table[name][0]}")
                else:
                    table[name] = (where, value)
    for name, (where, group) in groups.items():
        for j, ref in enumerate(group.get("optionsets", [])):
            if ref not in optionsets:
                problems.append(
                    f"{where}: .groups.{name}.optionsets[{j}]: unknown option set {ref!r}"
                    f" (defined: {', '.join(sorted(optionsets)) or 'none'})"
                )
    return optionsets, groups


def merge_options(
    h: Mapping[str, Any],
    optionsets: Mapping[str, tuple[str, dict[str, Any]]],
    groups: Mapping[str, tuple[str, dict[str, Any]]],
    at: str,
    problems: list[str],
) -> tuple[dict[str, Any], dict[str, str]]:
    """A host's effective options. Assignments apply in this order, each option kind of a later
    one replacing the same kind of an earlier one as a whole:

    1. the option sets of the host's groups, group by group in the host's `groups` order, and
       within a group in its `optionsets` order;
    2. the host's own `optionsets`, in order;
    3. the host's inline `options` table.
    """
    if "groups" not in h and "optionsets" not in h and "options" not in h:
        return {}, {}  # nothing to merge (and 10,000 such hosts cost nothing)
    layers: list[tuple[str, Mapping[str, Any]]] = []
    for j, g in enumerate(h.get("groups", [])):
        if g not in groups:
            problems.append(
                f"{at}.groups[{j}]: unknown group {g!r}"
                f" (defined: {', '.join(sorted(groups)) or 'none'})"
            )
            continue
        for ref in groups[g][1].get("optionsets", []):
            if ref in optionsets:
                layers.append((f"optionset {ref} (group {g})", optionsets[ref][1]))
    for j, ref in enumerate(h.get("optionsets", [])):
        if ref not in optionsets:
            problems.append(
                f"{at}.optionsets[{j}]: unknown option set {ref!r}"
                f" (defined: {', '.join(sorted(optionsets)) or 'none'})"
            )
            continue
        layers.append((f"optionset {ref}", optionsets[ref][1]))
    if "options" in h:
        layers.append(("host options", h["options"]))
    options: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for origin, layer in layers:
        for kind, value in layer.items():
            options[kind] = value
            sources[kind] = origin
    return options, sources


def check_options(
    options: Mapping[str, Any],
    sources: Mapping[str, str],
    h: Mapping[str, Any],
    paths: Paths,
    chroots: Mapping[str, Chroot],
    at: str,
    problems: list[str],
) -> None:
    """What the schema cannot know: referenced networks, rootfs configs and chroots exist."""
    if not options:
        return

    def bad(kind: str, message: str) -> None:
        problems.append(f"{at}: {kind} (from {sources[kind]}): {message}")

    for iface in options.get("network", {}).get("interfaces", []):
        net = iface.get("network")
        if net is not None and net not in h["networks"]:
            bad("network", f"interface {iface['device']}: host has no address on network {net!r}")
    ipmi = options.get("ipmi")
    if ipmi is not None and ipmi["network"] not in h["networks"]:
        bad("ipmi", f"host has no address on network {ipmi['network']!r}")
    for name in options.get("rootfs", []):
        if not (paths.rootfs / name).is_dir():
            bad("rootfs", f"no Root FS Customization config {name!r} under {paths.rootfs}")
    chroot = options.get("chroot")
    if chroot is not None and missing_chroot(paths, chroots, chroot):
        bad("chroot", f"no chroot {chroot!r} (no {chroot}/chroot.toml under {paths.chroots})")
    seen: dict[str, int] = {}
    for i, mount in enumerate(options.get("mounts", [])):
        # Simplified as systemd does (the schema rules out "." and ".." components): two
        # spellings of one path would be one unit file.
        where = "/" + "/".join(part for part in mount["where"].split("/") if part)
        if where == "/":
            bad("mounts", f"[{i}]: cannot mount over /")
        elif where in seen:
            bad("mounts", f"[{i}]: {where} is already mounted by mounts[{seen[where]}]")
        else:
            seen[where] = i
    for i, key in enumerate(options.get("authorized_keys", [])):
        message = authorized_key_problem(key)
        if message:
            bad("authorized_keys", f"[{i}]: {key[:40]!r}: {message}")


# Public key types sshd accepts in authorized_keys without options (ssh-keygen -l reads them).
SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519", "ssh-rsa", "ssh-dss", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)  # fmt: skip


def authorized_key_problem(key: str) -> str:
    """Why `key` is not an authorized_keys line `type base64-blob [comment]`, or "". The blob is
    a sequence of length-prefixed strings (RFC 4253, 6.6) whose first one is the key type."""
    import base64
    import binascii

    words = key.split(None, 2)
    if len(words) < 2 or words[0] not in SSH_KEY_TYPES:
        return f"expected a key type ({', '.join(sorted(SSH_KEY_TYPES))}), then the key"
    try:
        blob = base64.b64decode(words[1], validate=True)
    except binascii.Error:
        return "the key is not base64"
    fields = []
    while blob:
        size = int.from_bytes(blob[:4], "big")
        if len(blob) < 4 + size:
            return "the key is truncated"
        fields.append(blob[4 : 4 + size])
        blob = blob[4 + size :]
    if len(fields) < 2 or fields[0] != words[0].encode():
        return f"the key does not hold a {words[0]} key"
    return ""


def reserved_pxelinux_name(name: str) -> bool:
    """Names a boot config file cannot take: pxelinux's own `default` and HOSTID links."""
    return name == "default" or HOSTID.fullmatch(name) is not None


HOSTID = re.compile(r"[0-9A-Fa-f]{1,8}")  # pxelinux's hex IP names (checked for every host)


def host_bootconfig(
    h: Mapping[str, Any],
    images: Mapping[str, Image],
    bootconfigs: Mapping[str, BootConfig],
    at: str,
    problems: list[str],
    broken: set[str],
) -> str:
    """A host names a boot config, or just an image (then it boots the image's implicit config)."""
    image, bootconfig = h.get("image"), h.get("bootconfig")
    if bootconfig is not None:
        if bootconfig not in bootconfigs:
            problems.append(
                f"{at}.bootconfig: unknown boot config {bootconfig!r} (site.toml "
                f"defines: {', '.join(sorted(bootconfigs)) or 'none'})"
            )
        elif image is not None and bootconfigs[bootconfig].image != image:
            problems.append(
                f"{at}.image: {image!r} differs from the image "
                f"{bootconfigs[bootconfig].image!r} of boot config {bootconfig!r}"
            )
        return str(bootconfig)
    if image is None:
        problems.append(f"{at}: needs an image or a bootconfig")
        return ""
    if reserved_pxelinux_name(image):
        problems.append(
            f"{at}.image: an image named {image!r} cannot be booted by name;"
            " give the host a bootconfig"
        )
    elif image not in images and image not in broken:
        problems.append(
            f"{at}.image: unknown image {image!r} (images.d has: "
            f"{', '.join(sorted(images)) or 'none'})"
        )
    elif image in bootconfigs and bootconfigs[image].image != image:
        problems.append(
            f"{at}.image: boot config {image!r} exists and boots another image; "
            "name the bootconfig explicitly"
        )
    return str(image)


def load_recipes(paths: Paths, problems: list[str], checked: ValidationCache) -> list[Recipe]:
    recipes: list[Recipe] = []
    seen: dict[str, str] = {}
    for path in sorted(paths.modules.glob("*/recipe.toml")):
        where = rel(path, paths.root)
        raw = checked.read(path, "recipe", where, problems)
        if raw is None:
            continue
        recipe = Recipe(
            raw["module"],
            raw["flavor"],
            raw["version"],
            raw["description"],
            tuple(raw.get("packages", ())),
            tuple(raw.get("exclude", ())),
            raw.get("busybox_links", False),
            path.parent,
        )
        if recipe.package in seen:
            problems.append(
                f"{where}: .module: {recipe.package} is also built by {seen[recipe.package]}"
            )
            continue
        seen[recipe.package] = where
        recipes.append(recipe)
    return recipes
