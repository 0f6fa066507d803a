"""Per-node configuration bundles: every option kind, layering, goldens, JSON, inputs, preview.

The sites are built in tmp_path by `make_site` (in helpers.py, also used by
test_bundle_consumers.py and test_noderunner.py). The templates' output is compared with golden
files in tests/golden/bundle/<host>/ (one file per generated node path, the symlinks, the
actions, the host's `describe` output and, for hosts without rootfs, its bundle.json indented).
After an intended change, regenerate them with

    QLIMAGE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_bundle.py

and review `git diff tests/golden/bundle` before committing.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from qlimage.bundle import render as qb
from qlimage.bundle.render import Bundle, NodeFile
from qlimage.errors import ConfigError, QlimageError
from qlimage.site import Site, load_site

from helpers import (
    BINARY,
    BUNDLE_IMAGES,
    KEY_ECDSA,
    KEY_ED25519,
    OPTIONS_HOSTS_TOML,
    UID,
    check_golden,
    edit,
    golden_outputs,
    make_site,
    render,
    write,
)
from helpers import (
    BUNDLE_GOLDEN as GOLDEN,
)

GOLDEN_HOSTS = ("beo-01", "beo-02", "beo-05")


@pytest.fixture
def site_root(tmp_path: Path) -> Path:
    return make_site(tmp_path / "site")


@pytest.fixture
def site(site_root: Path) -> Site:
    return load_site(site_root)


def files_of(b: Bundle) -> dict[str, NodeFile]:
    return {f.path: f for f in b.files}


def text(b: Bundle, path: str) -> str:
    return files_of(b)[path].content.decode()


def root_file(f: NodeFile, mode: int = 0o644) -> None:
    assert (f.type, f.mode, f.owner, f.group, f.uid, f.gid) == ("file", mode, "root", "root", 0, 0)


# --- always ---------------------------------------------------------------------------------


def test_identity_files_and_hostname_action(site: Site) -> None:
    b = render(site, "beo-01")
    files = files_of(b)
    assert b.node == "beo-01"
    root_file(files["/etc/hostname"])
    assert text(b, "/etc/hostname") == "beo-01\n"
    assert b.actions[0] == {"kind": "hostname", "name": "beo-01"}
    node = files["/etc/qlustar/options.d/node"]
    root_file(node)
    assert node.origin == "node"
    lines = [line for line in node.content.decode().splitlines() if not line.startswith("#")]
    assert lines == [
        "NAME=beo-01",
        "MAC=52:54:00:12:34:56",
        "IMAGE=demo",
        "FLAVOR=bookworm",
        "BOOTCONFIG=compute",
        "NETWORKS='boot ib ipmi'",
        "ADDRESS_BOOT=10.0.2.15",
        "ADDRESS_IB=10.10.0.15",
        "ADDRESS_IPMI=10.1.0.15",
    ]


def test_host_without_options_gets_identity_only(site_root: Path) -> None:
    extra = '[[hosts]]\nname = "beo-07"\nmac = "52:54:00:12:34:5c"\nimage = "demo"\n'
    extra += 'networks.boot = "10.0.2.21"\n'
    site = load_site(make_site(site_root.parent / "other", extra_hosts=extra))
    b = render(site, "beo-07")
    # ... and the time option, on for every node (test_options_time_sssd_nis.py).
    assert [f.path for f in b.files] == [
        qb.CHRONY_CONF,
        "/etc/hostname",
        "/etc/qlustar/options.d/node",
        "/etc/qlustar/options.d/time",
        qb.TIMESYNCD_CONF,
    ]
    assert b.actions == ({"kind": "hostname", "name": "beo-07"},)


def test_network_names_giving_the_same_variable_are_an_error(site_root: Path) -> None:
    with (site_root / "site.toml").open("a") as f:
        f.write(
            '\n[networks.x-y]\ncidr = "10.20.0.0/16"\n\n[networks.x_y]\ncidr = "10.21.0.0/16"\n'
        )
    boot = 'networks.boot = "10.0.2.20"\n'
    more = 'networks.x-y = "10.20.0.1"\nnetworks.x_y = "10.21.0.1"\n'
    edit(site_root / "nodes.d/hosts.toml", boot, boot + more)
    with pytest.raises(ConfigError) as e:
        render(load_site(site_root), "beo-06")
    assert e.value.problems == [
        "nodes.d/hosts.toml: host beo-06: networks 'x-y' and 'x_y' both give the variable "
        "ADDRESS_X_Y in /etc/qlustar/options.d/node"
    ]


# --- network --------------------------------------------------------------------------------


def test_network_debian_interfaces(site: Site) -> None:
    b = render(site, "beo-01")
    f = files_of(b)["/etc/network/interfaces.d/qluman"]
    root_file(f)
    assert f.origin == "network (optionset ib (group rack1))"
    body = [line for line in f.content.decode().splitlines() if not line.startswith("#")]
    assert body == [
        "",
        "auto eth0",
        "iface eth0 inet static",
        "    address 10.0.2.15",
        "    netmask 255.255.255.0",
        "    gateway 10.0.2.2",
        "",
        "auto ib0",
        "iface ib0 inet static",
        "    address 10.10.0.15",
        "    netmask 255.255.0.0",
        "    mtu 65520",  # the interface's MTU beats the network's 2044
    ]
    assert not any(p.startswith("/etc/sysconfig") for p in files_of(b))


def test_network_debian_bond_dhcp_and_no_gateway(site: Site) -> None:
    b = render(site, "beo-05")
    body = text(b, "/etc/network/interfaces.d/qluman")
    assert "gateway" not in body  # gateway = false on eth0, and data has none
    assert (
        "auto bond0\niface bond0 inet static\n    address 192.168.0.19\n"
        "    netmask 255.255.255.0\n    mtu 9000\n    bond-slaves eth1 eth2\n"
        "    bond-mode 802.3ad\n    bond-miimon 100\n"
    ) in body
    for slave in ("eth1", "eth2"):
        assert f"auto {slave}\niface {slave} inet manual\n    bond-master bond0\n" in body
    assert "iface ib0 inet dhcp\n    pre-up ip link set dev ib0 mtu 2044\n" in body


def test_network_rhel_ifcfg_files(site: Site) -> None:
    b = render(site, "beo-02")
    files = files_of(b)
    ifcfg = {p: f for p, f in files.items() if p.startswith("/etc/sysconfig/network-scripts/")}
    assert sorted(ifcfg) == [
        f"/etc/sysconfig/network-scripts/ifcfg-{d}"
        for d in ("bond0", "eth0", "eth1", "eth2", "ib0")
    ]
    for f in ifcfg.values():
        root_file(f)
        assert f.origin == "network (optionset bonded)"
    assert "/etc/network/interfaces.d/qluman" not in files

    def settings(device: str) -> dict[str, str]:
        lines = text(b, f"/etc/sysconfig/network-scripts/ifcfg-{device}").splitlines()
        return dict(line.split("=", 1) for line in lines if not line.startswith("#"))

    assert settings("bond0") == {
        "DEVICE": "bond0",
        "TYPE": "Bond",
        "BONDING_MASTER": "yes",
        "BONDING_OPTS": '"mode=802.3ad miimon=100"',
        "BOOTPROTO": "none",
        "ONBOOT": "yes",
        "IPADDR": "192.168.0.16",
        "PREFIX": "24",
        "NETMASK": "255.255.255.0",
        "MTU": "9000",
    }
    assert settings("eth1") == {
        "DEVICE": "eth1",
        "TYPE": "Ethernet",
        "BOOTPROTO": "none",
        "ONBOOT": "yes",
        "MASTER": "bond0",
        "SLAVE": "yes",
    }
    assert "GATEWAY" not in settings("eth0")
    assert settings("ib0")["BOOTPROTO"] == "dhcp"
    assert settings("ib0")["MTU"] == "2044"


def test_network_gateway_on_the_interface_whose_network_has_one(site_root: Path) -> None:
    extra = """
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
bootconfig = "rhel"
networks.boot = "10.0.2.22"
networks.ipmi = "10.1.0.22"
options.network = { interfaces = [
  { device = "eth0", network = "boot" },
  { device = "eth1", network = "ipmi", gateway = false },
] }
"""
    site = load_site(make_site(site_root.parent / "gw", extra_hosts=extra))
    b = render(site, "beo-08")
    assert "GATEWAY=10.0.2.2\n" in text(b, "/etc/sysconfig/network-scripts/ifcfg-eth0")
    assert "GATEWAY" not in text(b, "/etc/sysconfig/network-scripts/ifcfg-eth1")


def test_network_two_default_gateways_is_an_error(site_root: Path) -> None:
    extra = """
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
image = "demo"
networks.boot = "10.0.2.22"
networks.ipmi = "10.1.0.22"
options.network = { interfaces = [
  { device = "eth0", network = "boot" },
  { device = "eth1", network = "ipmi" },
] }
"""
    site = load_site(make_site(site_root.parent / "gw", extra_hosts=extra))
    with pytest.raises(ConfigError) as e:
        render(site, "beo-08")
    assert e.value.problems == [
        "nodes.d/hosts.toml: host beo-08: network (from host options): the default gateway "
        "would be set on eth0, eth1; set gateway = false on all interfaces but one"
    ]


def test_network_device_used_twice_is_an_error(site_root: Path) -> None:
    extra = """
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
image = "demo"
networks.boot = "10.0.2.22"
options.network = { interfaces = [
  { device = "eth0", network = "boot", bond = { slaves = ["eth1"] } },
  { device = "eth1" },
] }
"""
    site = load_site(make_site(site_root.parent / "dup", extra_hosts=extra))
    with pytest.raises(ConfigError, match="device eth1 is both a slave of eth0 and an interface"):
        render(site, "beo-08")


def test_unknown_flavor_with_network_option_is_a_clear_error(site_root: Path) -> None:
    extra = """
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
image = "odd"
networks.boot = "10.0.2.22"
options.network = { interfaces = [{ device = "eth0", network = "boot" }] }
"""
    site = load_site(make_site(site_root.parent / "odd", extra_hosts=extra))
    with pytest.raises(ConfigError) as e:
        render(site, "beo-08")
    (problem,) = e.value.problems
    assert problem.startswith(
        "nodes.d/hosts.toml: host beo-08: image 'odd' has flavor 'haiku', for which qlimage "
        "knows no network configuration format (known flavors: alma8, alma9, bionic, bookworm,"
    )
    # Without a network option the flavor does not matter.
    assert [f.path for f in render(site, "beo-06").files if "time" not in f.origin] == [
        "/etc/hostname",
        "/etc/qlustar/options.d/node",
    ]


@pytest.mark.parametrize(
    ("flavor", "family"),
    [("bookworm", "debian"), ("bullseye", "debian"), ("buster", "debian"), ("trixie", "debian"),
     ("jammy", "debian"), ("focal", "debian"), ("noble", "debian"), ("el7", "rhel"),
     ("el8", "rhel"), ("el9", "rhel"), ("centos7", "rhel"), ("centos8", "rhel"),
     ("rocky8", "rhel"), ("rocky9", "rhel"), ("alma9", "rhel")],
)  # fmt: skip
def test_flavor_families(flavor: str, family: str) -> None:
    assert qb.FLAVOR_FAMILIES[flavor] == family


# --- disk -----------------------------------------------------------------------------------


def test_disk_config(site: Site) -> None:
    f = files_of(render(site, "beo-01"))["/etc/qlustar/options.d/disk-config"]
    root_file(f)
    assert f.origin == "disk (optionset scratch)"
    body = [line for line in f.content.decode().splitlines() if not line.startswith("#")]
    assert body == [
        "device=/dev/sda",
        "label=gpt",
        "wipe=if-unformatted",
        "part 1 16GiB swap - - -",
        "part 2 rest xfs /scratch scratch noatime",
    ]
    header = f.content.decode().split("device=/dev/sda")[0]
    assert "part <n> <size> <fs> <mount> <label> <options>" in header


def test_disk_fields_are_escaped_and_defaults_written(site_root: Path) -> None:
    extra = r"""
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
image = "demo"
networks.boot = "10.0.2.22"
options.disk = { device = "/dev/disk/by-path/pci 0", partitions = [
  { size = "1GiB", fs = "ext4", mount = "/my data\\x", label = "-", options = "-" },
] }
"""
    site = load_site(make_site(site_root.parent / "esc", extra_hosts=extra))
    body = text(render(site, "beo-08"), "/etc/qlustar/options.d/disk-config")
    lines = [line for line in body.splitlines() if not line.startswith("#")]
    assert lines == [
        "device=/dev/disk/by-path/pci\\00400",
        "label=gpt",
        "wipe=if-unformatted",
        "part 1 1GiB ext4 /my\\0040data\\0134x \\0055 \\0055",
    ]


def test_disk_rest_must_be_last(site_root: Path) -> None:
    extra = """
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
image = "demo"
networks.boot = "10.0.2.22"
options.disk = { device = "/dev/sda", partitions = [
  { size = "rest", fs = "ext4" }, { size = "1GiB", fs = "swap" },
] }
"""
    site = load_site(make_site(site_root.parent / "rest", extra_hosts=extra))
    with pytest.raises(ConfigError, match="partition 1: size 'rest' is only valid last"):
        render(site, "beo-08")


# --- mounts ---------------------------------------------------------------------------------


def test_mount_units_and_links(site: Site) -> None:
    files = files_of(render(site, "beo-01"))
    units = "/etc/systemd/system"
    origin = "mounts (optionset compute (group rack1))"
    for name in ("srv-data.mount", "home.mount", "home.automount", "scratch-tmp.mount"):
        root_file(files[f"{units}/{name}"])
        assert files[f"{units}/{name}"].origin == origin
    links = {p: f for p, f in files.items() if f.type == "symlink" and ".target.wants/" in p}
    assert {p: f.target for p, f in links.items()} == {
        f"{units}/remote-fs.target.wants/srv-data.mount": f"{units}/srv-data.mount",
        f"{units}/remote-fs.target.wants/home.automount": f"{units}/home.automount",
        f"{units}/local-fs.target.wants/scratch-tmp.mount": f"{units}/scratch-tmp.mount",
        f"{units}/multi-user.target.wants/opensm.service": "/lib/systemd/system/opensm.service",
    }
    for f in links.values():
        assert (f.owner, f.group, f.uid, f.gid) == ("root", "root", 0, 0)

    srv = files[f"{units}/srv-data.mount"].content.decode()
    assert "What=head:/srv/data\nWhere=/srv/data\nType=nfs\nOptions=vers=4,ro\n" in srv
    assert "After=network-online.target\nWants=network-online.target\n" in srv
    assert srv.endswith("[Install]\nWantedBy=remote-fs.target\n")

    home = files[f"{units}/home.mount"].content.decode()
    assert "Where=/home\nType=nfs4\n" in home
    assert "[Install]" not in home  # started through the automount only
    auto = files[f"{units}/home.automount"].content.decode()
    assert "[Automount]\nWhere=/home\nTimeoutIdleSec=600\n" in auto
    assert auto.endswith("[Install]\nWantedBy=remote-fs.target\n")

    tmp = files[f"{units}/scratch-tmp.mount"].content.decode()
    assert "network-online" not in tmp
    assert "Options=size=10%%,mode=1777\n" in tmp  # % is a systemd specifier
    assert tmp.endswith("WantedBy=local-fs.target\n")


def test_mount_tricky_paths_and_errors(site_root: Path) -> None:
    extra = """
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
image = "demo"
networks.boot = "10.0.2.22"
options.mounts = [{ what = "head:/x", where = "/srv/my-data 100%/ü", automount = true }]
"""
    site = load_site(make_site(site_root.parent / "tricky", extra_hosts=extra))
    files = files_of(render(site, "beo-08"))
    name = "srv-my\\x2ddata\\x20100\\x25-\\xc3\\xbc"
    mount = files[f"/etc/systemd/system/{name}.mount"].content.decode()
    assert "Where=/srv/my-data 100%%/ü\n" in mount
    assert "TimeoutIdleSec" not in files[f"/etc/systemd/system/{name}.automount"].content.decode()
    link = files[f"/etc/systemd/system/remote-fs.target.wants/{name}.automount"]
    assert link.target == f"/etc/systemd/system/{name}.automount"

    twice = extra.replace(
        "automount = true }]",
        'automount = true }, { what = "b:/y", where = "/srv/my-data 100%/ü/" }]',
    )
    # Refused when the site is loaded (validate, and a build before any task), not by a task.
    with pytest.raises(ConfigError, match="/srv/my-data 100%/ü is already mounted by mounts"):
        load_site(make_site(site_root.parent / "twice", extra_hosts=twice))

    bad = extra.replace('what = "head:/x"', 'what = "head:/x\\\\"')
    with pytest.raises(ConfigError, match=r"\.what: 'head:/x\\\\': expected .* final backslash"):
        load_site(make_site(site_root.parent / "bad", extra_hosts=bad))


def test_mount_over_root_is_an_error(site_root: Path) -> None:
    extra = """
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
image = "demo"
networks.boot = "10.0.2.22"
options.mounts = [{ what = "head:/", where = "/" }]
"""
    with pytest.raises(ConfigError, match=r"\(from host options\): \[0\]: cannot mount over /"):
        load_site(make_site(site_root.parent / "slash", extra_hosts=extra))


# --- opensm, ipmi, chroot, authorized_keys, mail, pam_slurm ---------------------------------


def test_opensm(site: Site) -> None:
    files = files_of(render(site, "beo-01"))
    f = files["/etc/qlustar/options.d/opensm"]
    root_file(f)
    assert f.origin == "opensm (optionset ib (group rack1))"  # ib comes after compute
    assert f.content.decode().endswith("\nOPENSM=yes\n")
    off = files_of(render(site, "beo-02"))
    assert "/etc/qlustar/options.d/opensm" not in off  # beo-02 has no opensm option


def test_opensm_off_writes_no_link(site_root: Path) -> None:
    extra = """
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
image = "demo"
networks.boot = "10.0.2.22"
options.opensm = false
"""
    site = load_site(make_site(site_root.parent / "sm", extra_hosts=extra))
    files = files_of(render(site, "beo-08"))
    assert text(render(site, "beo-08"), "/etc/qlustar/options.d/opensm").endswith("OPENSM=no\n")
    assert not any("opensm.service" in p for p in files)


def test_ipmi(site: Site) -> None:
    b = render(site, "beo-01")
    assert b.actions[1] == {
        "kind": "ipmi",
        "address": "10.1.0.15",
        "netmask": "255.255.0.0",
        "gateway": "10.1.0.1",
        "channel": 1,
    }
    f = files_of(b)["/etc/qlustar/options.d/ipmi"]
    root_file(f)
    assert f.origin == "ipmi (host options)"
    assert f.content.decode().endswith(
        "IPMI_NETWORK=ipmi\nIPMI_ADDRESS=10.1.0.15\nIPMI_NETMASK=255.255.0.0\n"
        "IPMI_GATEWAY=10.1.0.1\nIPMI_CHANNEL=1\n"
    )
    b2 = render(site, "beo-02")
    assert b2.actions[1] == {
        "kind": "ipmi",
        "address": "10.0.2.16",
        "netmask": "255.255.255.0",
        "gateway": "10.0.2.2",
        "channel": 2,
    }


def test_ipmi_network_without_gateway(site_root: Path) -> None:
    extra = """
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
image = "demo"
networks.boot = "10.0.2.22"
networks.ib = "10.10.3.4"
options.ipmi = { network = "ib" }
"""
    site = load_site(make_site(site_root.parent / "ipmi", extra_hosts=extra))
    b = render(site, "beo-08")
    assert b.actions[1]["gateway"] == ""
    assert "IPMI_GATEWAY=''\n" in text(b, "/etc/qlustar/options.d/ipmi")


def test_chroot(site: Site) -> None:
    f = files_of(render(site, "beo-01"))["/etc/qlustar/options.d/chroot"]
    root_file(f)
    assert f.origin == "chroot (host options)"
    assert f.content.decode().endswith("\nCHROOT=hpc\n")
    assert "initrd in\n# a later step" in f.content.decode()


def test_authorized_keys(site: Site) -> None:
    files = files_of(render(site, "beo-01"))
    d = files["/root/.ssh"]
    assert (d.type, d.mode, d.owner, d.group, d.uid, d.gid) == ("dir", 0o700, "root", "root", 0, 0)
    f = files["/root/.ssh/authorized_keys"]
    root_file(f, 0o600)
    assert f.origin == d.origin == "authorized_keys (optionset compute (group rack1))"
    keys = [line for line in f.content.decode().splitlines() if not line.startswith("#")]
    assert keys == [KEY_ED25519, KEY_ECDSA]


def test_mail_and_override_order(site: Site) -> None:
    """group option sets < the host's option sets < the host's own options."""
    relays = {}
    for name in ("beo-03", "beo-04", "beo-01"):
        b = render(site, name)
        f = files_of(b)["/etc/qlustar/options.d/mail"]
        root_file(f)
        (command,) = [a for a in b.actions if a["kind"] == "command"]
        relays[name] = (f.origin, f.content.decode().splitlines()[-1], command)
    assert relays["beo-03"][:2] == ("mail (optionset compute (group rack1))", "RELAYHOST='[head]'")
    assert relays["beo-04"][:2] == ("mail (optionset mailer)", "RELAYHOST=smtp1.example.org")
    assert relays["beo-01"][:2] == ("mail (host options)", "RELAYHOST='[smtp2.example.org]:587'")
    assert relays["beo-01"][2] == {
        "kind": "command",
        "argv": ["/usr/sbin/postconf", "-e", "relayhost=[smtp2.example.org]:587"],
        "description": "postfix relay host [smtp2.example.org]:587",
        "if_exists": "/usr/sbin/postconf",
    }
    # Option kinds merge independently: beo-04's disk/opensm etc. still come from the group.
    assert files_of(render(site, "beo-04"))["/etc/qlustar/options.d/opensm"].origin == (
        "opensm (optionset ib (group rack1))"
    )


def test_pam_slurm(site: Site) -> None:
    b = render(site, "beo-01")
    f = files_of(b)["/etc/qlustar/options.d/pam-slurm"]
    root_file(f)
    assert f.origin == "pam_slurm (optionset gpu)"
    assert f.content.decode().endswith("\nPAM_SLURM=yes\n")
    assert b.actions[-1] == {
        "kind": "ensure-line",
        "path": "/etc/pam.d/sshd",
        "line": "account    required     pam_slurm_adopt.so",
    }
    b2 = render(site, "beo-02")
    assert text(b2, "/etc/qlustar/options.d/pam-slurm").endswith("\nPAM_SLURM=no\n")
    assert not any(a["kind"] == "ensure-line" for a in b2.actions)


def test_action_order(site: Site) -> None:
    kinds = [a["kind"] for a in render(site, "beo-01").actions]
    assert kinds == ["hostname", "ipmi", "command", "ensure-line"]


# --- rootfs ---------------------------------------------------------------------------------


def test_rootfs_entries_keep_head_metadata(site: Site) -> None:
    files = files_of(render(site, "beo-01"))

    def meta(path: str) -> tuple[object, ...]:
        f = files[path]
        return (f.type, oct(f.mode), f.owner, f.group, f.uid, f.gid, f.origin)

    assert meta("/etc") == ("dir", "0o755", "root", "root", 0, 0, "rootfs gpu")
    assert meta("/opt/tool") == ("file", "0o4755", str(UID), str(UID), UID, UID, "rootfs base")
    assert files["/opt/tool"].content == BINARY
    assert meta("/var/spool/jobs") == ("dir", "0o1777", "daemon", "daemon", 1, 1, "rootfs base")
    assert meta("/root/secret") == ("file", "0o600", "root", "root", 0, 0, "rootfs base")
    assert meta("/usr/local/bin/nv") == ("symlink", "0o777", str(UID), str(UID), UID, UID,
                                         "rootfs gpu")  # fmt: skip
    assert files["/usr/local/bin/nv"].target == "/opt/nvidia/bin/nv"
    assert meta("/lib/qlustar/init.d/50-nvidia")[:2] == ("file", "0o755")
    # gpu comes after base: its motd (and mode, group) wins.
    assert meta("/etc/motd") == ("file", "0o640", "root", "daemon", 0, 1, "rootfs gpu")
    assert files["/etc/motd"].content == b"GPU node\n"
    # gpu's symlink replaces base's directory /opt/cfg together with its contents.
    assert files["/opt/cfg"].type == "symlink"
    assert "/opt/cfg/a.conf" not in files
    # The configs' own directories are not node paths; every directory below them is.
    assert "/" not in files and "/rootfs" not in files
    assert files["/etc/security"].type == files["/etc/security/limits.d"].type == "dir"
    assert files["/etc/security/limits.d/90-hpc.conf"].origin == "rootfs base"


def test_rootfs_overrides_generated_files(site_root: Path) -> None:
    write(site_root / "rootfs/gpu/root/.ssh/authorized_keys", "ssh-ed25519 AAAA mine\n", 0o644)
    os.chmod(site_root / "rootfs/gpu/root", 0o700)
    site = load_site(site_root)
    files = files_of(render(site, "beo-01"))
    f = files["/root/.ssh/authorized_keys"]
    assert (f.origin, f.mode, f.content) == ("rootfs gpu", 0o644, b"ssh-ed25519 AAAA mine\n")
    assert files["/root/.ssh"].origin == "rootfs gpu"
    assert files["/root"].mode == 0o700


def test_rootfs_special_file_is_an_error(site_root: Path) -> None:
    os.mkfifo(site_root / "rootfs/base/etc/pipe")
    site = load_site(site_root)
    with pytest.raises(ConfigError, match=r"etc/pipe: not a regular file, directory or symlink"):
        render(site, "beo-01")


def test_rootfs_file_name_must_be_utf8(site_root: Path) -> None:
    with open(os.fsencode(site_root / "rootfs/base/etc") + b"/bad\xff", "wb") as f:
        f.write(b"x")
    with pytest.raises(ConfigError, match=r"b'etc/bad\\xff': file name is not valid UTF-8"):
        render(load_site(site_root), "beo-01")


def test_files_are_sorted_directories_first(site: Site) -> None:
    for host in site.hosts:
        if host.name == "beo-06":
            continue
        paths = [f.path for f in render(site, host.name).files]
        assert paths == sorted(paths, key=lambda p: p.split("/"))
        assert len(set(paths)) == len(paths)
        listed = set(paths)
        for i, p in enumerate(paths):
            parent = os.path.dirname(p)
            while parent != "/":
                if parent in listed:
                    assert paths.index(parent) < i
                parent = os.path.dirname(parent)


# --- goldens --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GOLDEN_HOSTS)
def test_golden_files(site: Site, name: str) -> None:
    check_golden(GOLDEN / name, golden_outputs(render(site, name)))


def test_goldens_cover_every_template(site: Site) -> None:
    used = set()
    for name in GOLDEN_HOSTS:
        for f in render(site, name).files:
            if f.type == "file" and not f.origin.startswith("rootfs "):
                used.add(f.path)
    kinds = {
        "hostname": "/etc/hostname",
        "node": "/etc/qlustar/options.d/node",
        "interfaces": "/etc/network/interfaces.d/qluman",
        "ifcfg": "/etc/sysconfig/network-scripts/ifcfg-bond0",
        "disk-config": "/etc/qlustar/options.d/disk-config",
        "mount": "/etc/systemd/system/home.mount",
        "automount": "/etc/systemd/system/home.automount",
        "opensm": "/etc/qlustar/options.d/opensm",
        "ipmi": "/etc/qlustar/options.d/ipmi",
        "chroot": "/etc/qlustar/options.d/chroot",
        "mail": "/etc/qlustar/options.d/mail",
        "pam-slurm": "/etc/qlustar/options.d/pam-slurm",
        "authorized_keys": "/root/.ssh/authorized_keys",
        "time": "/etc/qlustar/options.d/time",
        "chrony": "/etc/chrony/conf.d/qlustar.conf",
        "timesyncd": "/etc/systemd/timesyncd.conf.d/qlustar.conf",
        "sssd": "/etc/sssd/sssd.conf",
        "nsswitch": "/etc/nsswitch.conf",
        "yp": "/etc/yp.conf",
        "defaultdomain": "/etc/defaultdomain",
    }
    # The cluster's SSH host files: served once for all nodes, in no bundle (test_sshfiles.py).
    cluster = {"ssh_known_hosts.j2", "shosts.equiv.j2"}
    # sssd and nis: the goldens of test_options_time_sssd_nis.py.
    extra = load_site(
        make_site(Path(site.paths.root).parent / "options", extra_hosts=OPTIONS_HOSTS_TOML)
    )
    for f in render(extra, "beo-09").files:
        used.add(f.path)
    templates = Path(qb.__file__).parent / "templates"
    names = sorted(p.name for p in templates.iterdir() if p.name not in cluster)
    assert names == sorted(f"{k}.j2" for k in kinds)
    assert set(kinds.values()) <= used


# --- JSON -----------------------------------------------------------------------------------


def test_bundle_json_is_canonical_and_complete(site_root: Path, site: Site) -> None:
    b = render(site, "beo-01")
    data = qb.bundle_json(b)
    assert data == qb.bundle_json(render(load_site(site_root), "beo-01"))
    assert data.endswith(b"}\n") and data.count(b"\n") == 1
    doc = json.loads(data)
    assert json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n" == data
    assert (doc["format"], doc["node"]) == (1, "beo-01")
    entries = {e["path"]: e for e in doc["files"]}
    assert [e["path"] for e in doc["files"]] == [f.path for f in b.files]
    assert entries["/opt/tool"] == {
        "path": "/opt/tool",
        "type": "file",
        "mode": "4755",
        "owner": str(UID),
        "group": str(UID),
        "uid": UID,
        "gid": UID,
        "content": base64.b64encode(BINARY).decode(),
        "encoding": "base64",
    }
    assert entries["/etc/motd"]["encoding"] == "utf-8"
    assert entries["/etc/motd"]["content"] == "GPU node\n"
    assert entries["/var/spool/jobs"] == {
        "path": "/var/spool/jobs",
        "type": "dir",
        "mode": "1777",
        "owner": "daemon",
        "group": "daemon",
        "uid": 1,
        "gid": 1,
    }
    assert entries["/etc/systemd/system/remote-fs.target.wants/srv-data.mount"] == {
        "path": "/etc/systemd/system/remote-fs.target.wants/srv-data.mount",
        "type": "symlink",
        "target": "/etc/systemd/system/srv-data.mount",
        "owner": "root",
        "group": "root",
        "uid": 0,
        "gid": 0,
    }
    assert all("origin" not in e for e in doc["files"])
    assert doc["actions"] == [dict(a) for a in b.actions]
    # The JSON reads back into the same bundle (apart from origins).
    back = qb.parse_bundle_json(data)
    assert [qb.bundle_json(back)] == [data]


def test_bundle_json_unicode_is_ascii_escaped(site_root: Path) -> None:
    write(site_root / "rootfs/base/etc/grüße", "Grüße\n")
    b = render(load_site(site_root), "beo-01")
    data = qb.bundle_json(b)
    assert data.isascii()
    entry = next(e for e in json.loads(data)["files"] if e["path"] == "/etc/grüße")
    assert entry["content"] == "Grüße\n"


# --- bundle_inputs --------------------------------------------------------------------------


def test_bundle_inputs_change_iff_inputs_change(site_root: Path) -> None:
    def inputs() -> dict[str, str]:
        site = load_site(site_root)
        return {h.name: qb.bundle_inputs(site, h) for h in site.hosts}

    def changed(before: dict[str, str]) -> set[str]:
        after = inputs()
        return {name for name in before if before[name] != after[name]}

    start = inputs()
    assert inputs() == start  # stable
    assert json.loads(start["beo-01"])["host"]["name"] == "beo-01"

    # A rootfs file used only by beo-01 (through its option set gpu).
    motd = site_root / "rootfs/gpu/etc/motd"
    motd.write_text("GPU node!\n")
    assert changed(start) == {"beo-01"}

    state = inputs()
    os.chmod(motd, 0o600)
    assert changed(state) == {"beo-01"}
    state = inputs()
    os.chown(site_root / "rootfs/base/opt/tool", 1, 1)
    assert changed(state) == {"beo-01"}
    state = inputs()
    write(site_root / "rootfs/base/etc/new", "new\n")
    assert changed(state) == {"beo-01"}

    # Same size, mtime set back: still noticed (ctime).
    state = inputs()
    st = motd.stat()
    motd.write_text("GPU nodx\n")
    os.utime(motd, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert changed(state) == {"beo-01"}

    # Another host's entry: beo-01 unchanged.
    state = inputs()
    edit(site_root / "nodes.d/hosts.toml", "channel = 2", "channel = 3")
    assert changed(state) == {"beo-02"}

    # An option set used by beo-01, beo-03 and beo-04 (through the group).
    state = inputs()
    edit(site_root / "nodes.d/options.toml", '"vers=4,ro"', '"vers=4.2,ro"')
    assert changed(state) == {"beo-01", "beo-03", "beo-04"}

    # A network: only hosts with an address on it.
    state = inputs()
    edit(site_root / "site.toml", "mtu = 9000", "mtu = 8000")
    assert changed(state) == {"beo-02", "beo-05"}

    # An image's flavor: its hosts.
    state = inputs()
    (site_root / "images.d/rhel.toml").write_text(
        BUNDLE_IMAGES["rhel.toml"].replace("el9", "rocky9")
    )
    assert changed(state) == {"beo-02"}

    # Unrelated: a rootfs config nobody uses, an unused network, the chroot's contents.
    state = inputs()
    write(site_root / "rootfs/unused/etc/x", "x\n")
    (site_root / "chroots/hpc/bin").mkdir()
    assert changed(state) == set()


def test_bundle_inputs_is_cheap(site_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stat() only: no file of the rootfs trees (or anything else) is opened."""
    site = load_site(site_root)
    host = site.host("beo-01")
    before = qb.bundle_inputs(site, host)  # also caches the digest of the code and templates

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"bundle_inputs opened {args[:1]}")

    monkeypatch.setattr(Path, "open", refuse)
    monkeypatch.setattr(Path, "read_bytes", refuse)
    monkeypatch.setattr("builtins.open", refuse)
    monkeypatch.setattr(os, "open", refuse)
    assert qb.bundle_inputs(site, host) == before


# --- describe and diff ----------------------------------------------------------------------


def test_describe(site: Site) -> None:
    out = qb.describe(render(site, "beo-01"))
    lines = out.splitlines()
    assert lines[0].startswith("node beo-01: ")
    assert "0644 root:root /etc/hostname  (node)" in lines
    assert (
        "0700 root:root /root/.ssh/  (authorized_keys (optionset compute (group rack1)))" in lines
    )
    assert f"4755 {UID}:{UID} /opt/tool  (rootfs base)" in lines
    assert "1777 daemon:daemon /var/spool/jobs/  (rootfs base)" in lines
    assert f"link {UID}:{UID} /usr/local/bin/nv -> /opt/nvidia/bin/nv  (rootfs gpu)" in lines
    i = lines.index("==> /opt/tool <==")
    assert lines[i + 1] == "<256 bytes binary>"
    i = lines.index("==> /etc/motd <==")
    assert lines[i + 1] == "GPU node"
    assert lines[lines.index("actions:") + 1 :] == [
        "  hostname name=beo-01",
        "  ipmi address=10.1.0.15 channel=1 gateway=10.1.0.1 netmask=255.255.0.0",
        "  command argv=[/usr/sbin/postconf -e 'relayhost=[smtp2.example.org]:587'] "
        "description='postfix relay host [smtp2.example.org]:587' if_exists=/usr/sbin/postconf",
        "  ensure-line line='account    required     pam_slurm_adopt.so' path=/etc/pam.d/sshd",
    ]


def test_diff(site_root: Path) -> None:
    site = load_site(site_root)
    old = qb.bundle_json(render(site, "beo-01"))
    assert qb.diff(old, render(site, "beo-01")) == ""

    (site_root / "rootfs/gpu/etc/motd").write_text("GPU node\nCUDA 12\n")
    os.chmod(site_root / "rootfs/base/root/secret", 0o640)
    (site_root / "rootfs/base/etc/security/limits.d/90-hpc.conf").unlink()
    write(site_root / "rootfs/base/etc/added.conf", "x = 1\n")
    write(site_root / "rootfs/base/opt/tool", BINARY[::-1], 0o4755, (UID, UID))
    os.chown(site_root / "rootfs/base/var/spool/jobs", 0, 0)
    edit(site_root / "nodes.d/hosts.toml", 'network = "ipmi" }', 'network = "ipmi", channel = 3 }')
    new = render(load_site(site_root), "beo-01")
    out = qb.diff(old, new)
    assert out == (
        "added 0644 root:root /etc/added.conf  (rootfs base)\n"
        "--- /dev/null\n"
        "+++ b/etc/added.conf\n"
        "@@ -0,0 +1 @@\n"
        "+x = 1\n"
        "changed /etc/motd: content  (rootfs gpu)\n"
        "--- a/etc/motd\n"
        "+++ b/etc/motd\n"
        "@@ -1 +1,2 @@\n"
        " GPU node\n"
        "+CUDA 12\n"
        "changed /etc/qlustar/options.d/ipmi: content  (ipmi (host options))\n"
        "--- a/etc/qlustar/options.d/ipmi\n"
        "+++ b/etc/qlustar/options.d/ipmi\n"
        "@@ -6,4 +6,4 @@\n"
        " IPMI_ADDRESS=10.1.0.15\n"
        " IPMI_NETMASK=255.255.0.0\n"
        " IPMI_GATEWAY=10.1.0.1\n"
        "-IPMI_CHANNEL=1\n"
        "+IPMI_CHANNEL=3\n"
        "removed 0644 root:root /etc/security/limits.d/90-hpc.conf\n"
        "--- a/etc/security/limits.d/90-hpc.conf\n"
        "+++ /dev/null\n"
        "@@ -1 +0,0 @@\n"
        "-* soft memlock unlimited\n"
        "changed /opt/tool: content  (rootfs base)\n"
        "  binary content differs (256 -> 256 bytes)\n"
        "changed /root/secret: mode 0600 -> 0640  (rootfs base)\n"
        "changed /var/spool/jobs: owner daemon:daemon -> root:root; ids 1:1 -> 0:0  (rootfs base)\n"
        "actions:\n"
        "--- a/actions\n"
        "+++ b/actions\n"
        "@@ -1,4 +1,4 @@\n"
        " hostname name=beo-01\n"
        "-ipmi address=10.1.0.15 channel=1 gateway=10.1.0.1 netmask=255.255.0.0\n"
        "+ipmi address=10.1.0.15 channel=3 gateway=10.1.0.1 netmask=255.255.0.0\n"
        " command argv=[/usr/sbin/postconf -e 'relayhost=[smtp2.example.org]:587'] "
        "description='postfix relay host [smtp2.example.org]:587' if_exists=/usr/sbin/postconf\n"
        " ensure-line line='account    required     pam_slurm_adopt.so' path=/etc/pam.d/sshd\n"
    )


def test_diff_type_change_and_bad_old_json(site: Site) -> None:
    b = render(site, "beo-02")
    old = json.loads(qb.bundle_json(b))
    old["files"].append({"path": "/opt/x", "type": "dir", "mode": "0755", "owner": "root",
                         "group": "root", "uid": 0, "gid": 0})  # fmt: skip
    new = Bundle(b.node, (*b.files, NodeFile("/opt/x", "symlink", 0o777, "root", "root", 0, 0,
                                             target="/y", origin="test")), b.actions)  # fmt: skip
    out = qb.diff(json.dumps(old).encode(), new)
    assert out == "changed /opt/x: type dir -> symlink; target - -> /y  (test)\n"
    with pytest.raises(QlimageError, match="not a bundle"):
        qb.diff(b"{}", b)
    with pytest.raises(QlimageError, match="not a bundle"):
        qb.diff(b"not json", b)
