"""Hosts' origins (site/load.py) and the bundle key they allow (bundle/render.py BundleInputs):
a host as loaded is keyed by what it was made of, not by hashing every field, and that key
changes whenever the key of its parts would, for every kind of edit a site sees."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import pytest

from qlimage import pieces
from qlimage.boot import pxelinux
from qlimage.bundle import sshfiles
from qlimage.bundle.render import BundleInputs
from qlimage.errors import ConfigError
from qlimage.serve import head
from qlimage.site import Site, load_site
from qlimage.site import load as site_load
from qlimage.site.model import Host, HostAddress

from helpers import KEY_ED25519, edit, make_site, write

ALL = {"beo-01", "beo-02", "beo-03", "beo-04", "beo-05", "beo-06"}
HOSTS, OPTIONS = "nodes.d/hosts.toml", "nodes.d/options.toml"
MAILER = '[optionsets.mailer]\nmail = { relayhost = "smtp1.example.org" }\n'
BEO_07 = '\n[[hosts]]\nname = "beo-07"\nmac = "52:54:00:12:34:5c"\nimage = "demo"\n'
Edit = Callable[[Path], object]


def add(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def changing(file: str, old: str, new: str) -> Edit:
    return lambda root: edit(root / file, old, new)


def adding(file: str, text: str) -> Edit:
    return lambda root: add(root / file, text)


def writing(file: str, text: str) -> Edit:
    return lambda root: write(root / file, text)


IPXE_COMPUTE = '[bootconfigs.compute]\nimage = "demo"\nloader = "ipxe"\n'


def rename_boot_network(root: Path) -> None:
    """The network `boot` becomes `pxe`, in site.toml and wherever nodes.d names it."""
    edit(root / "site.toml", "[networks.boot]", "[networks.pxe]")
    for path in (root / "nodes.d").glob("*.toml"):
        text = path.read_text().replace("networks.boot", "networks.pxe")
        path.write_text(text.replace('network = "boot"', 'network = "pxe"'))


def move_mailer(root: Path) -> None:
    """The option set `mailer` leaves options.toml for a file of its own: same definition."""
    edit(root / OPTIONS, MAILER, "")
    write(root / "nodes.d/mail.toml", MAILER)


# (what, the edit, hosts whose bundle inputs change, hosts whose key may change besides: edits
# of the bytes of their own [[hosts]] table that change nothing their bundle is made of). The
# edits apply in order, to one site; hosts are named as they were first (a rename keeps MAC).
EDITS: list[tuple[str, Edit, set[str], set[str]]] = [
    ("nothing", lambda root: None, set(), set()),
    ("a rootfs file of gpu", writing("rootfs/gpu/etc/motd", "GPU!\n"), {"beo-01"}, set()),
    (
        "a chmod in rootfs base",
        lambda root: os.chmod(root / "rootfs/base/etc/motd", 0o600),
        {"beo-01"},
        set(),
    ),
    ("a rootfs config nobody uses", writing("rootfs/unused/etc/x", "x\n"), set(), set()),
    ("another host's table", changing(HOSTS, "channel = 2", "channel = 3"), {"beo-02"}, set()),
    (
        "an option set of a group",
        changing(OPTIONS, '"vers=4,ro"', '"vers=4.2,ro"'),
        {"beo-01", "beo-03", "beo-04"},
        set(),
    ),
    # beo-01 and beo-04 name mailer themselves, later: only beo-03's mail (and its source).
    (
        "a group gains an option set",
        changing(OPTIONS, '["compute", "ib"]', '["compute", "ib", "mailer"]'),
        {"beo-03"},
        set(),
    ),
    (
        "an option set nobody names",
        adding(OPTIONS, "\n[optionsets.spare]\nopensm = true\n"),
        set(),
        set(),
    ),
    (
        "a comment between option sets",
        changing(OPTIONS, "[optionsets.ib]", "# IB\n[optionsets.ib]"),
        set(),
        set(),
    ),
    ("an option set moves to another file", move_mailer, set(), set()),
    (
        "a network's MTU",
        changing("site.toml", "mtu = 9000", "mtu = 8000"),
        {"beo-02", "beo-05"},
        set(),
    ),
    (
        "an unused network",
        adding("site.toml", '\n[networks.spare]\ncidr = "10.9.0.0/16"\n'),
        set(),
        set(),
    ),
    ("an image's flavor", changing("images.d/rhel.toml", '"el9"', '"rocky9"'), {"beo-02"}, set()),
    (
        "an image's description",
        adding("images.d/demo.toml", 'description = "demo"\n'),
        set(),
        set(),
    ),
    ("the chroot's contents", lambda root: (root / "chroots/hpc/bin").mkdir(), set(), set()),
    (
        "the chroot's export",
        changing("chroots/hpc/chroot.toml", 'hpc"', 'hpc2"'),
        {"beo-01"},
        set(),
    ),
    (
        "the head's address",
        changing("site.toml", 'address = "10.0.2.2"', 'address = "10.0.2.3"'),
        ALL,
        set(),
    ),
    (
        "the authorized_keys header",
        writing("ssh/authorized_keys.header", f"{KEY_ED25519} ops\n"),
        ALL,
        set(),
    ),
    ("a host renamed", changing(HOSTS, 'name = "beo-06"', 'name = "beo-60"'), {"beo-06"}, set()),
    ("a host readdressed", changing(HOSTS, '"10.0.2.17"', '"10.0.2.27"'), {"beo-03"}, set()),
    (
        "a host's inline option",
        changing(HOSTS, "pam_slurm = false", "pam_slurm = true"),
        {"beo-02"},
        set(),
    ),
    (
        "a host's option sets",
        changing(HOSTS, 'optionsets = ["mailer"]', "optionsets = []"),
        {"beo-04"},
        set(),
    ),
    (
        "a comment in a host's table",
        changing(HOSTS, 'image = "odd"', 'image = "odd"  # now'),
        set(),
        {"beo-06"},
    ),
    (
        "white space in a host's table",
        changing(HOSTS, 'name = "beo-05"', 'name  =  "beo-05"'),
        set(),
        {"beo-05"},
    ),
    # Host keys go to the cluster's SSH files, in no bundle.
    (
        "a host's SSH host key",
        adding(HOSTS, f'ssh_host_keys = ["{KEY_ED25519}"]\n'),
        set(),
        {"beo-06"},
    ),
    # After a blank line: the host before keeps its key (inventory.digest).
    ("a host added", adding(HOSTS, BEO_07 + 'networks.boot = "10.0.2.21"\n'), set(), set()),
    (
        "blank lines between hosts",
        changing(HOSTS, '\n[[hosts]]\nname = "beo-03"', '\n\n\n[[hosts]]\nname = "beo-03"'),
        set(),
        set(),
    ),
    ("a host removed", changing(HOSTS, BEO_07 + 'networks.boot = "10.0.2.21"\n', ""), set(), set()),
    (
        "the inventory file renamed",
        lambda root: (root / HOSTS).rename(root / "nodes.d/c.toml"),
        ALL,
        set(),
    ),
]


def parts_key(inputs: BundleInputs, host: Host) -> str:
    """The key of the host's parts: a copy of the host is not the loaded object, so it has no
    origin (Site.origin) and BundleInputs hashes every part."""
    copy = dataclasses.replace(host)
    assert copy == host and inputs.site.origin(copy) == ""
    return inputs.key(copy)


def keys(site: Site) -> dict[str, tuple[str, str, str]]:
    """By MAC: (host name, key, key of its parts)."""
    inputs = BundleInputs(site)
    return {h.mac: (h.name, inputs.key(h), parts_key(inputs, h)) for h in site.hosts}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    site = make_site(tmp_path / "site")
    (site / "bootfiles").mkdir()  # so that the validation cache is kept: all three ways to read
    return site


def test_the_key_changes_whenever_the_parts_key_does(root: Path) -> None:
    made_of: dict[str, Host] = {}  # origin -> the host loaded from it: equal hosts, always

    def load() -> Site:
        site = load_site(root)
        for host in site.hosts:
            origin = site.origin(host)
            assert origin, host.name  # every nodes.d file here cuts into hosts
            assert made_of.setdefault(origin, host) == host, host.name
        return site

    before = keys(load())
    first_name = {mac: name for mac, (name, _, _) in before.items()}  # what EDITS call them
    for what, change, inputs_changed, bytes_changed in EDITS:
        change(root)
        after = keys(load())
        common = before.keys() & after.keys()
        parts = {first_name[m] for m in common if before[m][2] != after[m][2]}
        keyed = {first_name[m] for m in common if before[m][1] != after[m][1]}
        assert parts == inputs_changed, what
        assert keyed == parts | bytes_changed, what
        before = after
    assert len(made_of) > 3 * len(ALL)  # the edits made new hosts, which the loop compared


def test_origins_are_the_same_however_the_inventory_was_read(root: Path) -> None:
    """Parsed chunk by chunk, from the validation cache, or after an edit of one host: one
    origin a host (and a host edited in a way its bundle does not see keeps its key)."""
    fresh = load_site(root)
    cached = load_site(root)  # the cache was written by the first load
    assert [fresh.origin(h) for h in fresh.hosts] == [cached.origin(h) for h in cached.hosts]
    assert keys(fresh) == keys(cached)
    edit(root / "nodes.d/hosts.toml", "channel = 2", "channel = 3")  # beo-02
    edited = load_site(root)
    changed = {
        h.name
        for h, e in zip(fresh.hosts, edited.hosts, strict=True)
        if fresh.origin(h) != edited.origin(e)
    }
    assert changed == {"beo-02"}
    (root / "bootfiles/.validated.json").unlink()
    cold = load_site(root)
    assert [edited.origin(h) for h in edited.hosts] == [cold.origin(h) for h in cold.hosts]


def test_a_file_read_whole_gives_its_hosts_no_origin(root: Path) -> None:
    """A table after the hosts: the file does not cut (inventory.py), its hosts are keyed by
    their parts, and their keys change once, from one way to the other."""
    site = load_site(root)
    before = keys(site)
    add(root / "nodes.d/hosts.toml", "\n[optionsets.late]\nopensm = true\n")
    after_site = load_site(root)
    assert all(after_site.origin(h) == "" for h in after_site.hosts)
    after = keys(after_site)
    assert {m for m in before if before[m][2] != after[m][2]} == set()
    assert all(after[m][1] == after[m][2] != before[m][1] for m in after)  # the parts key
    assert keys(load_site(root)) == after


def test_origin_is_trusted_for_the_loaded_object_only(root: Path) -> None:
    site = load_site(root)
    host = site.host("beo-01")
    inputs = BundleInputs(site)
    assert site.origin(host)
    renamed = dataclasses.replace(host, name="beo-99")
    rebuilt = type(host)(**host.__dict__)
    assert site.origin(renamed) == site.origin(rebuilt) == ""
    assert rebuilt == host and inputs.key(rebuilt) != inputs.key(host)  # another way, same host
    assert inputs.key(renamed) != inputs.key(rebuilt)
    # A site made of the loaded one keeps the origins of the hosts it keeps, and only those.
    other = dataclasses.replace(site, hosts=(renamed, *site.hosts[1:]))
    assert other.origin(renamed) == "" and other.origin(site.hosts[1]) == site.origin(site.hosts[1])
    # The key of a kept host still reads the site's parts: another head, another key.
    moved = dataclasses.replace(site, head_address="10.0.2.9")
    assert BundleInputs(moved).key(host) != inputs.key(host)


def test_new_host_is_hosts_own_constructor(root: Path) -> None:
    """load.new_host and new_address skip the frozen dataclass's __init__: they must make
    the very object it makes, field for field (a field added to Host fails here)."""
    address = site_load.new_address("boot", "10.0.2.15", "beo-01", ("node1",))
    assert address == HostAddress("boot", "10.0.2.15", "beo-01", ("node1",))
    assert list(vars(address)) == [f.name for f in dataclasses.fields(HostAddress)]
    values = (
        "beo-01",
        "52:54:00:12:34:56",
        (address,),
        "compute",
        "nodes.d/hosts.toml",
        MappingProxyType({"opensm": True}),
        MappingProxyType({"opensm": "host options"}),
        (KEY_ED25519,),
    )
    host = site_load.new_host(*values)
    assert host == Host(*values)
    assert vars(host) == vars(Host(*values))
    assert list(vars(host)) == [f.name for f in dataclasses.fields(Host)]
    assert not hasattr(Host, "__post_init__") and not hasattr(HostAddress, "__post_init__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        host.name = "x"  # type: ignore[misc]


def test_loader_code_is_part_of_every_origin(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another qlimage may make other hosts of the same table: a new loader, new origins."""
    site = load_site(root)
    monkeypatch.setattr(site_load, "loader_digest", lambda: "another loader")
    again = load_site(root)
    assert not {site.origin(h) for h in site.hosts} & {again.origin(h) for h in again.hosts}


def test_a_name_clash_is_worded_alike_for_plain_and_other_hosts(root: Path) -> None:
    """ssh_name_problems' fast way for a host of one address named as itself (beo-06) says
    what its general way says, whichever of the two hosts comes first."""
    hosts = root / HOSTS
    alias = '{ address = "ADDRESS", aliases = ["beo-06"] }'
    add(hosts, BEO_07 + f"networks.boot = {alias.replace('ADDRESS', '10.0.2.21')}\n")
    with pytest.raises(ConfigError) as refused:
        load_site(root)
    assert refused.value.problems == [
        "nodes.d/hosts.toml: host beo-07: .networks.boot: name 'beo-06' is already a name of"
        " host beo-06 (nodes.d/hosts.toml)",
    ]
    edit(hosts, '"10.0.2.15"', alias.replace("ADDRESS", "10.0.2.15"))  # beo-01, before both
    with pytest.raises(ConfigError) as refused:
        load_site(root)
    assert refused.value.problems == [
        "nodes.d/hosts.toml: host beo-06: .networks.boot: name 'beo-06' is already a name of"
        " host beo-01 (nodes.d/hosts.toml)",
        "nodes.d/hosts.toml: host beo-07: .networks.boot: name 'beo-06' is already a name of"
        " host beo-01 (nodes.d/hosts.toml)",
    ]


# Edits of what the kept per-host pieces (qlimage.pieces) are made of besides the host.
PIECE_EDITS: list[tuple[str, Edit]] = [
    ("a domain suffix", changing("site.toml", "mtu = 2044\n", 'mtu = 2044\nsuffix = "ib.x."\n')),
    (
        "a boot config that loads iPXE",
        changing("site.toml", '[bootconfigs.compute]\nimage = "demo"\n', IPXE_COMPUTE),
    ),
    ("the boot network's name", rename_boot_network),
]


def every_node_file(site: Site) -> tuple[object, ...]:
    """What is made of the kept per-host pieces: every file that names every node."""
    return head.configs(site), sshfiles.render_all(site), pxelinux.host_links(site)


def made_fresh(root: Path) -> tuple[object, ...]:
    kept = root / "bootfiles/.host-pieces"
    aside = kept.with_name("aside")
    kept.rename(aside)
    try:
        return every_node_file(load_site(root))
    finally:
        aside.rename(kept)


def test_kept_pieces_make_what_fresh_ones_make(root: Path) -> None:
    """After every kind of edit, the files that name every node are the same made of the
    pieces kept by the build before as made afresh; unchanged hosts' pieces are not made."""
    site = load_site(root)
    every_node_file(site)
    pieces.of(site).save()
    for what, change in [(what, change) for what, change, _, _ in EDITS] + PIECE_EDITS:
        change(root)
        site = load_site(root)
        kept = every_node_file(site)
        if what == "nothing":
            assert pieces.of(site).new == 0, "a piece of an unchanged site was made again"
        pieces.of(site).save()
        assert kept == made_fresh(root), what
