"""The bad-input corpus for site files (issue 8, classes 2, 3, 4, 5 and 8).

First the refusals: every site file kind (site.toml, images.d, nodes.d and their file names,
chroots, `.rootpw`, option sets) broken one file per case, each refused by `qlimage build`
before any task with one line naming the file, exit status 2 and nothing served changed
(helpers.assert_refused). Then the escaping: per template family, values with the consumer's
special characters render to files the real consumer reads back to the same value, and values
the consumer cannot take are refused by the template filters themselves.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qlimage import contract, templates
from qlimage.bundle.render import _Renderer
from qlimage.site import BootConfig, load_site
from qlimage.templates import UnsafeValue

from helpers import ADMIN_KEY, REPO, assert_refused, edit, make_site, render, write_site

SITE, IMAGE, NODES = "site.toml", "images.d/demo.toml", "nodes.d/cluster.toml"
ROOTPW = "images.d/demo.rootpw"
CHROOT = "chroots/hpc/chroot.toml"


def append(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(text.encode() if isinstance(text, str) else text)


def in_file(rel: str, old: str, new: str) -> Callable[[Path], None]:
    return lambda root: edit(root / rel, old, new)


def appended(rel: str, text: str | bytes) -> Callable[[Path], None]:
    return lambda root: append(root / rel, text)


def host_options(toml: str) -> Callable[[Path], None]:
    """Options of beo-02, the last host of the build site's nodes file."""
    return appended(NODES, f"[hosts.options]\n{toml}\n")


def compute_option(toml: str) -> Callable[[Path], None]:
    """An option of the option set `compute` (used by beo-01 through group rack1)."""
    return in_file(NODES, "\n[groups.rack1]", f"{toml}\n\n[groups.rack1]")


def rootpw(data: bytes | None, mode: int = 0o600) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        path = root / ROOTPW
        if data is None:
            path.mkdir(mode=0o700)
        else:
            path.write_bytes(data)
            os.chmod(path, mode)

    return make


def named_file(directory: str, name: str, text: str) -> Callable[[Path], None]:
    return lambda root: append(root / directory / name, text)


def chroot_dir(name: str) -> Callable[[Path], None]:
    return lambda root: append(root / "chroots" / name / "chroot.toml", 'export = "/srv/c"\n')


ED25519_BLOB = ADMIN_KEY.split()[1]
DEEP = "x = " + "[" * 4000 + "]" * 4000 + "\n"
EVIL_LINE = "\\nLABEL evil\\n  KERNEL http://evil/vmlinuz"


def case(name: str, mutate: Callable[[Path], None], names: str, lines: int = 1) -> Any:
    """One corpus case: a mutation of a fresh write_site site and what every line names."""
    return pytest.param(mutate, names, lines, id=name)


BOOT = "[boot]\n"
HOSTS1 = f"{NODES}: .hosts[1]"
IFACE = f"{HOSTS1}.options.network.interfaces[0]"
KEYS = "authorized_keys (from optionset compute (group rack1)): [0]"
YESCRYPT = b"$y$j9T$abcdefghijklmnop$3dL1LkYnZM.OVXuVdnnaKVDlLYT92dRwOzDZ5XiVCe."
BAD_HASH = f"{ROOTPW}: expected one crypt(3) hash"
BOND = '{ device = "bond0", bond = { slaves = ["eth1\\n    up touch /tmp/pwned"] } }'
DUP_MOUNTS = '[{ what = "a:/x", where = "/srv" }, { what = "b:/y", where = "/srv/" }]'

CASES = [
    # --- site.toml: values reaching pxelinux configs and the kernel command line ---------
    case(
        "site-serial-newline-adds-label",
        in_file(SITE, BOOT, f'{BOOT}serial = "0 115200{EVIL_LINE}"\n'),
        f"{SITE}: .boot.serial",
    ),
    case(
        "site-serial-trailing-newline",
        in_file(SITE, BOOT, f'{BOOT}serial = "0 115200\\n"\n'),
        f"{SITE}: .boot.serial",
    ),
    case(
        "site-console-newline-adds-label",
        in_file(SITE, BOOT, f'{BOOT}console = "ttyS0{EVIL_LINE}"\n'),
        f"{SITE}: .boot.console",
    ),
    case(
        "site-console-space-adds-kernel-arg",
        in_file(SITE, BOOT, f'{BOOT}console = "ttyS0 init=/bin/sh"\n'),
        f"{SITE}: .boot.console",
    ),
    case(
        "site-append-newline-adds-label",
        in_file(SITE, 'append = "debug"', f'append = "debug{EVIL_LINE}"'),
        f"{SITE}: .bootconfigs.compute.append",
    ),
    case(
        "site-name-newline",
        in_file(SITE, 'name = "test"', 'name = "test\\nAPT::Evil \\"1\\";"'),
        f"{SITE}: .site.name",
    ),
    case(
        "site-archive-uri-newline",
        appended(SITE, '[[archive.sources]]\nuri = "http://a/\\n"\nsuites = ["bookworm"]\n'),
        f"{SITE}: .archive.sources[0].uri",
    ),
    # --- site.toml: what mksquashfs, cpio and tar would refuse inside a task -------------
    case(
        "site-xz-takes-no-level",
        appended(SITE, '[squashfs]\ncompressor = "xz"\nlevel = 6\n'),
        f"{SITE}: .squashfs.level: xz takes no",
    ),
    case(
        "site-gzip-level-12",
        appended(SITE, '[squashfs]\ncompressor = "gzip"\nlevel = 12\n'),
        f"{SITE}: .squashfs.level: 12 is not a gzip level",
    ),
    case(
        "site-lzo-level-10",
        appended(SITE, '[squashfs]\ncompressor = "lzo"\nlevel = 10\n'),
        f"{SITE}: .squashfs.level",
    ),
    case(
        "site-epoch-beyond-32-bits",
        in_file(SITE, "= 1700000000", "= 4294967296"),
        f"{SITE}: .site.source_date_epoch",
    ),
    # --- site.toml: bad bytes ---------------------------------------------------------------
    case("site-invalid-utf8", appended(SITE, b"# caf\xe9\n"), f"{SITE}: not UTF-8 text"),
    case("site-nested-too-deeply", appended(SITE, DEEP), f"{SITE}: nested too deeply"),
    case(
        "site-integer-too-long",
        appended(SITE, "[publish]\nkeep = " + "9" * 5000 + "\n"),
        f"{SITE}: Exceeds the limit",
    ),
    # --- images.d -----------------------------------------------------------------------------
    case(
        "image-unknown-module-names-file",
        in_file(IMAGE, '["core"]', '["core", "slurm"]'),
        f"{IMAGE}: .modules[1]: module slurm",
    ),
    case(
        "image-file-name-newline",
        named_file("images.d", "evil\nname.toml", 'name = "x"\n'),
        "images.d/'evil\\nname.toml'",
    ),
    case("image-invalid-utf8", appended(IMAGE, b'description = "\xff"\n'), f"{IMAGE}: not UTF-8"),
    case("image-nested-too-deeply", appended(IMAGE, DEEP), f"{IMAGE}: nested too deeply"),
    # --- images.d/<image>.rootpw ----------------------------------------------------------------
    case("rootpw-plaintext", rootpw(b"hunter2\n"), BAD_HASH),
    case("rootpw-binary-garbage", rootpw(bytes(range(256))), BAD_HASH),
    case("rootpw-directory", rootpw(None), f"{ROOTPW}: expected a regular file"),
    case("rootpw-truncated-sha512", rootpw(b"$6$saltsalt$abc\n"), BAD_HASH),
    case("rootpw-two-lines", rootpw(YESCRYPT + b"\nroot::0\n"), BAD_HASH),
    # --- nodes.d: values reaching ifupdown, postfix, systemd units and shell files ------------
    case(
        "nodes-bond-slave-newline-adds-up-command",
        host_options(f"network = {{ interfaces = [{BOND}] }}"),
        f"{IFACE}.bond.slaves[0]",
    ),
    case(
        "nodes-device-trailing-newline",
        host_options('network = { interfaces = [{ device = "eth0\\n", dhcp = true }] }'),
        f"{IFACE}.device",
    ),
    case(
        "nodes-device-leading-dash",
        host_options('network = { interfaces = [{ device = "-eth0", dhcp = true }] }'),
        f"{IFACE}.device",
    ),
    case(
        "nodes-relayhost-newline-adds-postconf-line",
        host_options('mail = { relayhost = "smtp\\nmyhostname = evil" }'),
        f"{HOSTS1}.options.mail.relayhost",
    ),
    case(
        "nodes-relayhost-command-substitution",
        host_options('mail = { relayhost = "smtp$(reboot)" }'),
        f"{HOSTS1}.options.mail.relayhost",
    ),
    case(
        "nodes-mount-options-newline",
        host_options('mounts = [{ what = "h:/x", where = "/x", options = "ro\\nWhat=evil" }]'),
        f"{HOSTS1}.options.mounts[0].options",
    ),
    case(
        "nodes-mount-where-newline",
        host_options('mounts = [{ what = "head:/x", where = "/x\\n[Service]" }]'),
        f"{HOSTS1}.options.mounts[0].where",
    ),
    case(
        "nodes-duplicate-mount-points",
        host_options(f"mounts = {DUP_MOUNTS}"),
        f"{HOSTS1}: mounts (from host options): [1]: /srv is already mounted",
    ),
    case(
        "nodes-hostname-trailing-newline",
        in_file(NODES, 'name = "beo-02"', 'name = "beo-02\\n"'),
        f"{HOSTS1}.name",
    ),
    case(
        "nodes-file-name-newline",
        named_file("nodes.d", "x\nNAME=evil.toml", ""),
        "nodes.d/'x\\nNAME=evil.toml'",
    ),
    case("nodes-invalid-utf8", appended(NODES, b"# \xc3\x28\n"), f"{NODES}: not UTF-8 text"),
    case("nodes-nested-too-deeply", appended(NODES, DEEP), f"{NODES}: nested too deeply"),
    # --- nodes.d: addresses and MACs that cannot be a node's -----------------------------------
    case(
        "nodes-address-is-broadcast",
        in_file(NODES, '"10.0.2.16"', '"10.0.2.255"'),
        f"{HOSTS1}.networks.boot: 10.0.2.255 is the broadcast address",
    ),
    case(
        "nodes-address-is-network",
        in_file(NODES, '"10.0.2.16"', '"10.0.2.0"'),
        f"{HOSTS1}.networks.boot: 10.0.2.0 is the network address",
    ),
    case(
        "nodes-address-is-the-head",
        in_file(NODES, '"10.0.2.16"', '"10.0.2.2"'),
        f"{HOSTS1}.networks.boot: 10.0.2.2 is the head's own address",
    ),
    case(
        "nodes-mac-broadcast",
        in_file(NODES, "52:54:00:12:34:57", "ff:ff:ff:ff:ff:ff"),
        f"{HOSTS1}.mac: ff:ff:ff:ff:ff:ff is a broadcast, multicast",
    ),
    case(
        "nodes-mac-multicast",
        in_file(NODES, "52:54:00:12:34:57", "01:00:5e:00:00:01"),
        f"{HOSTS1}.mac: 01:00:5e:00:00:01 is a broadcast, multicast",
    ),
    # --- option sets (nodes.d) -------------------------------------------------------------------
    case(
        "optionset-key-type-mismatch",
        in_file(NODES, ADMIN_KEY, f"ssh-rsa {ED25519_BLOB} x"),
        f"{NODES}: .hosts[0]: {KEYS}",
    ),
    case("optionset-key-not-base64", in_file(NODES, ED25519_BLOB, "AAAA*not-base64*"), KEYS),
    case("optionset-key-truncated", in_file(NODES, ED25519_BLOB, ED25519_BLOB[:40]), KEYS),
    case(
        "optionset-key-newline-second-key",
        in_file(NODES, "admin@head", "admin\\nssh-ed25519 AAAA evil"),
        f"{NODES}: .optionsets.compute.authorized_keys[0]",
    ),
    case(
        "optionset-relayhost-newline",
        compute_option('mail = { relayhost = "smtp\\nrelayhost = evil" }'),
        f"{NODES}: .optionsets.compute.mail.relayhost",
    ),
    case(
        "optionset-name-newline",
        appended(NODES, '[optionsets."evil\\nname"]\nopensm = true\n'),
        f"{NODES}: .optionsets",
    ),
    # --- chroots ---------------------------------------------------------------------------------
    case(
        "chroot-export-space-adds-field",
        appended(CHROOT, 'export = "/srv/hpc root"\n'),
        f"{CHROOT}: .export",
    ),
    case(
        "chroot-export-newline",
        appended(CHROOT, 'export = "/srv/hpc\\nhpc 10.9.9.9 2049 /evil"\n'),
        f"{CHROOT}: .export",
    ),
    case("chroot-directory-name-space", chroot_dir("my hpc"), "chroots/'my hpc': a chroot name"),
]


@pytest.mark.parametrize(("mutate", "names", "lines"), CASES)
def test_refused_before_any_task(
    tmp_path: Path, mutate: Callable[[Path], None], names: str, lines: int
) -> None:
    root = write_site(tmp_path / "site")
    mutate(root)
    assert_refused(root, names=names, lines=lines)


def test_rootpw_link_out_of_the_site_is_refused(tmp_path: Path, sentinel: Path) -> None:
    """A `.rootpw` link would read a file of the head (here the sentinel's secret) into the
    image: refused, whatever it points to."""
    root = write_site(tmp_path / "site")
    (root / ROOTPW).symlink_to(sentinel / "secret")
    assert_refused(root, names=f"{ROOTPW}: expected a regular file", sentinel=sentinel)


def test_source_date_epoch_from_the_environment_must_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_site(tmp_path / "site")
    edit(root / SITE, "source_date_epoch = 1700000000\n", "")
    for bad in ("4294967296", "-1", "²"):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", bad)
        assert_refused(root, "validate", names="SOURCE_DATE_EPOCH: ")


def test_every_broken_image_is_reported_at_once(tmp_path: Path) -> None:
    """Class 8: every problem of every image file, one line each, each naming its file."""
    root = write_site(tmp_path / "site")
    edit(root / IMAGE, '["core"]', '["core", "slurm"]')
    (root / "images.d/other.toml").write_text(
        'name = "other"\nflavor = "bookworm"\nversion = "12"\nmodules = ["mpi"]\n'
    )
    proc = assert_refused(root, "validate", names="images.d/", lines=3)
    assert proc.stderr.splitlines() == [
        "qlimage: images.d/demo.toml: .modules[1]: module slurm 11 (bookworm): not in the pool;"
        " modules for bookworm: core",
        "qlimage: images.d/other.toml: .modules (core, which every image has): module core"
        " (bookworm): no version matches '12'; the pool has 11.0.2",
        "qlimage: images.d/other.toml: .modules[0]: module mpi 12 (bookworm): not in the pool;"
        " modules for bookworm: core",
    ]


def test_schema_patterns_use_dollar_only_as_the_end_anchor() -> None:
    """load.anchored turns every unescaped `$` into `\\Z`: true only if no schema uses `$`
    escaped or inside a character class."""
    found = 0
    for path in (REPO / "qlimage/site/schemas").glob("*.json"):
        for pattern in re.findall(r'"pattern": ("(?:[^"\\]|\\.)*")', path.read_text()):
            regex = json.loads(pattern)
            found += 1
            assert "\\$" not in regex, (path.name, regex)
            assert not re.search(r"\[[^\]]*\$[^\]]*\]", regex), (path.name, regex)
    assert found > 20


# --- escaping for the real consumers -------------------------------------------------------------


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)


HOSTILE = ["it's", '"q"', "$(reboot)", "`id`", "a b", "100%z", "x\\y", "", "-n", "*", "é"]


def source(tmp_path: Path, text: str, variables: list[str]) -> list[str]:
    """`text` checked by `sh -n`, then sourced; the variables' values as the shell has them."""
    path = tmp_path / "file.sh"
    path.write_text(text)
    assert run("sh", "-n", str(path)).returncode == 0, text
    script = f'. "{path}"; ' + "; ".join(f'printf "%s\\0" "${v}"' for v in variables)
    proc = subprocess.run(["sh", "-euc", script], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode().split("\0")[:-1]


IPMI_FIELDS = ("network", "address", "netmask", "gateway", "channel")


@pytest.mark.parametrize("value", HOSTILE)
def test_shell_option_files_read_back_exactly(tmp_path: Path, value: str) -> None:
    """The `sh` filter, through the templates of every shell-sourced option file: whatever the
    value, the shell reads back exactly it (the schemas allow far less)."""
    node = templates.render(
        "bundle/node.j2", node="beo-01", kind="node", source="nodes.d/a.toml", mac=value,
        image=value, flavor=value, bootconfig=value, networks=value,
        addresses={"ADDRESS_BOOT": value},
    )  # fmt: skip
    names = ["MAC", "IMAGE", "FLAVOR", "BOOTCONFIG", "NETWORKS", "ADDRESS_BOOT"]
    assert source(tmp_path, node, names) == [value] * len(names)
    context = {"node": "beo-01", "kind": "k", "source": "optionset x"}
    for template, variable, values in (
        ("mail", "RELAYHOST", {"relayhost": value}),
        ("chroot", "CHROOT", {"chroot": value}),
        ("ipmi", "IPMI_GATEWAY", dict.fromkeys(IPMI_FIELDS, value)),
    ):
        text = templates.render(f"bundle/{template}.j2", **context, **values)
        assert source(tmp_path, text, [variable]) == [value], template


def test_ifcfg_values_read_back_exactly(tmp_path: Path) -> None:
    """ifcfg files are shell assignments (initscripts source them; NetworkManager's ifcfg-rh
    parses the same quoting)."""
    values = {"device": "bond0", "address": "10.0.0.1", "netmask": "x y", "prefix": "$(id)",
              "gateway": "it's", "master": "`a`"}  # fmt: skip
    text = templates.render(
        "bundle/ifcfg.j2", node="n", kind="network", source="s", method="static", mtu=9000,
        bond=None, **values,
    )  # fmt: skip
    names = ["DEVICE", "IPADDR", "NETMASK", "PREFIX", "GATEWAY", "MASTER", "MTU"]
    assert source(tmp_path, text, names) == [*values.values(), "9000"]


def test_ifquery_reads_interface_names_with_every_allowed_character(tmp_path: Path) -> None:
    extra = """
[[hosts]]
name = "beo-09"
mac = "52:54:00:12:34:60"
image = "demo"
networks.boot = "10.0.2.30"
networks.data = "192.168.0.30"
[[hosts.options.network.interfaces]]
device = "en_p0.10"
network = "boot"
[[hosts.options.network.interfaces]]
device = "bond-a:1"
network = "data"
gateway = false
bond = { slaves = ["en.p1-0", "En_P2"] }"""
    site = load_site(make_site(tmp_path / "site", extra_hosts=extra))
    files = {f.path: f for f in render(site, "beo-09").files}
    path = tmp_path / "interfaces"
    path.write_bytes(files["/etc/network/interfaces.d/qluman"].content)

    def ifquery(device: str) -> list[str]:
        proc = run("ifquery", "-i", str(path), "--state-dir", str(tmp_path), device)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    assert "bond-slaves: en.p1-0 En_P2" in ifquery("bond-a:1")
    assert ifquery("en.p1-0") == ["bond-master: bond-a:1"]
    assert "address: 10.0.2.30" in ifquery("en_p0.10")
    listed = run("ifquery", "-i", str(path), "--state-dir", str(tmp_path), "--list")
    assert listed.stdout.split() == ["lo", "en_p0.10", "bond-a:1", "en.p1-0", "En_P2"]


def test_systemd_reads_mount_values_with_specifiers_quotes_and_dollars(tmp_path: Path) -> None:
    """`%z` is no systemd specifier: verify warns about it unless the template doubled it."""
    what, where = 'head:/srv/it\'s "q" $HOME 100%z', "/srv/a b/$x/%z"
    options = "x-a=%z,x-b=$y,x-c='q'"
    extra = f"""
[[hosts]]
name = "beo-09"
mac = "52:54:00:12:34:60"
image = "demo"
networks.boot = "10.0.2.30"
[[hosts.options.mounts]]
what = {json.dumps(what)}
where = {json.dumps(where)}
options = {json.dumps(options)}
"""
    site = load_site(make_site(tmp_path / "site", extra_hosts=extra))
    bundle = render(site, "beo-09")
    root = tmp_path / "root"
    units = []
    for f in bundle.files:
        path = root / f.path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if f.type == "file" and f.path.endswith(".mount"):
            path.write_bytes(f.content)
            units.append(path)
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (unit,) = units
    proc = run("systemd-analyze", "verify", f"--root={root}", "--man=no", unit.name)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    lines = [line for line in unit.read_text().splitlines() if "=" in line and line[0] != "#"]
    settings = dict(line.split("=", 1) for line in lines)
    read = {k: settings[k].replace("%%", "%") for k in ("What", "Where", "Options")}
    assert read == {"What": what, "Where": where, "Options": options}
    name = run("systemd-escape", "--path", where).stdout.strip()
    assert unit.name == f"{name}.mount"


def test_ssh_keygen_reads_keys_with_every_comment_character(tmp_path: Path) -> None:
    key = tmp_path / "id"
    comment = 'it\'s "ops" $HOME 100% `id` é'
    cmd = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)]
    subprocess.run(cmd, check=True, timeout=60)
    pub = Path(f"{key}.pub").read_text().strip()
    site = load_site(make_site(tmp_path / "site", keys=(pub,)))
    authorized = tmp_path / "authorized_keys"
    files = {f.path: f for f in render(site, "beo-01").files}
    authorized.write_bytes(files["/root/.ssh/authorized_keys"].content)
    got = run("ssh-keygen", "-l", "-f", str(authorized))
    want = run("ssh-keygen", "-l", "-f", f"{key}.pub")
    assert got.returncode == want.returncode == 0, got.stderr
    assert got.stdout == want.stdout
    assert comment in got.stdout


def test_ssh_keygen_agrees_with_the_key_check(tmp_path: Path) -> None:
    """What load refuses, ssh-keygen (the real consumer) cannot read either."""
    from qlimage.site.load import authorized_key_problem

    blob = base64.b64decode(ED25519_BLOB)
    for key in (
        f"ssh-rsa {ED25519_BLOB} x",
        f"ssh-ed25519 {base64.b64encode(blob[:30]).decode()} x",
        f"ssh-ed25519 {base64.b64encode(blob + b'junk').decode()} x",
    ):
        assert authorized_key_problem(key), key
        (tmp_path / "k").write_text(key + "\n")
        assert run("ssh-keygen", "-l", "-f", str(tmp_path / "k")).returncode != 0, key
    assert authorized_key_problem(ADMIN_KEY) == ""


# --- values the consumer has no escape for: refused by the filters themselves -------------------

BOOTCONFIG = BootConfig("compute", "demo", "", "")
REFUSED = [
    ("boot/pxelinux.cfg.j2", {"serial": "0 115200\nLABEL evil", "config_name": "default",
     "bootconfig": BOOTCONFIG, "kernel": "k", "initrd": "i", "append": "debug"}),
    ("boot/pxelinux.cfg.j2", {"serial": "0 115200", "config_name": "default",
     "bootconfig": BOOTCONFIG, "kernel": "k", "initrd": "i", "append": "debug\nLABEL evil"}),
    ("boot/pxelinux-unregistered.cfg.j2", {"serial": "0\rLABEL evil"}),
    ("bundle/node.j2", {"node": "n", "kind": "node", "source": "nodes.d/x\nNAME=evil.toml",
     "mac": "m", "image": "i", "flavor": "f", "bootconfig": "b", "networks": "",
     "addresses": {}}),
    ("bundle/interfaces.j2", {"node": "n", "kind": "network", "source": "s", "stanzas": [
        {"device": "bond0", "method": "manual", "mtu": None, "master": "",
         "bond": {"slaves": ["eth1\n    up x"], "mode": "balance-rr", "miimon": 100}}]}),
    ("bundle/interfaces.j2", {"node": "n", "kind": "network", "source": "s", "stanzas": [
        {"device": "eth0 inet", "method": "dhcp", "mtu": None, "master": "", "bond": None}]}),
    ("bundle/mount.j2", {"node": "n", "kind": "mounts", "source": "s", "what": "a", "type": "nfs",
     "where": "/x", "options": "ro\nExecStart=/bin/evil", "network": True, "target": "t",
     "automount": False}),
    ("bundle/mount.j2", {"node": "n", "kind": "mounts", "source": "s", "what": "a:/b\\",
     "type": "nfs", "where": "/x", "options": "", "network": True, "target": "t",
     "automount": False}),
    ("bundle/authorized_keys.j2", {"node": "n", "kind": "k", "source": "s",
     "keys": ["ssh-ed25519 AAAA a\nssh-ed25519 BBBB evil"]}),
    ("bundle/hostname.j2", {"node": "beo 01"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("template", "context"), REFUSED, ids=[f"{t}-{i}" for i, (t, _) in enumerate(REFUSED)]
)
def test_filters_refuse_what_the_consumer_cannot_take(
    template: str, context: dict[str, object]
) -> None:
    with pytest.raises(UnsafeValue, match=f"^{re.escape(template)}: "):
        templates.render(template, **context)


def test_a_nodes_file_name_never_reaches_a_generated_file_raw(tmp_path: Path) -> None:
    """Even past load (which refuses such names), the renderer cannot write it into a file."""
    site = load_site(make_site(tmp_path / "site"))
    host = site.host("beo-03")
    evil = type(host)(**{**host.__dict__, "source": "nodes.d/x\nNAME=evil.toml"})
    with pytest.raises(UnsafeValue):
        _Renderer(site, evil).identity()


# --- the chroot line: written by contract.chroot_line, read by the initrd's /init ---------------

INIT = (REPO / "qlimage/node/initrd/init").read_text()


def chroot_reader() -> str:
    """The initrd's chroot-line reader, cut out of /init from the fetch to its check."""
    start = INIT.index("CHROOT=$(wget")
    end = INIT.index("\nfi\n", start) + len("\nfi\n")
    return INIT[start:end]


def read_chroot_line(tmp_path: Path, line: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "line").write_text(line)
    (tmp_path / "decoy").write_text("")  # what an unquoted "*" would expand to
    script = (
        f'wget() {{ cat "{tmp_path}/line"; }}\n'
        'fail() { echo "FAIL: $*"; exit 3; }\n'
        "HTTP=http://head MACDIR=52-54-00-12-34-56\n" + chroot_reader() + 'printf "%s|" "$#" "$@"\n'
    )
    return run("sh", "-eu", "-c", script, cwd=tmp_path)


def test_initrd_reads_the_chroot_line_back_exactly(tmp_path: Path) -> None:
    path = "/srv/ch*/$HOME/%20/'q'/\"d\""  # everything the schema allows but white space
    line = contract.chroot_line("hpc", f"10.0.2.2 2049 {path}")
    proc = read_chroot_line(tmp_path, line)
    assert (proc.returncode, proc.stdout) == (0, f"4|hpc|10.0.2.2|2049|{path}|")
    assert read_chroot_line(tmp_path, "").stdout == "0|"  # no chroot


@pytest.mark.parametrize("line", ["hpc 10.0.2.2 2049 /srv/hpc root\n", "hpc 10.0.2.2\n"])
def test_initrd_refuses_a_chroot_line_of_another_field_count(tmp_path: Path, line: str) -> None:
    proc = read_chroot_line(tmp_path, line)
    assert proc.returncode == 3
    assert proc.stdout.startswith("FAIL: nodes/52-54-00-12-34-56/chroot: expected"), proc.stdout


@pytest.mark.parametrize(
    "source", ["10.0.2.2 2049 /srv/a b", "10.0.2.2 2049 /srv/a\tb", "10.0.2.2 2049"]
)
def test_chroot_line_refuses_fields_the_initrd_would_split(source: str) -> None:
    with pytest.raises(ValueError, match="expected 4 plain words"):
        contract.chroot_line("hpc", source)
