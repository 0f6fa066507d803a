"""The cluster's SSH host files (qlimage/bundle/sshfiles.py): ssh_known_hosts and shosts.equiv
as build outputs served once in qlustar/cluster/ with their SHA256SUMS (nodes fetch them: the
runner's side is test_cluster_files.py), never in bundles; the authorized_keys header, which
bundles do carry; and hostile inventory values.

Golden files are in tests/golden/ssh/; after an intended change regenerate them with

    QLIMAGE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_sshfiles.py -k golden

and review `git diff tests/golden/ssh`. Keys for ssh-keygen's checks are made by ssh-keygen.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from qlimage.bundle import render as qb
from qlimage.bundle import sshfiles
from qlimage.errors import ConfigError
from qlimage.layout import Layout
from qlimage.site import Site, load_site
from qlimage.tasks.stamp import MARGIN_NS
from qlimage.templates import UnsafeValue

from helpers import (
    KEY_ECDSA,
    KEY_ED25519,
    assert_refused,
    check_golden,
    edit,
    make_edge_site,
    make_site,
    qlimage,
    render,
    sh,
    write,
)

GOLDEN = Path(__file__).resolve().parent / "golden" / "ssh"
NODES = "nodes.d/cluster.toml"  # the built test site's inventory (helpers.BUILD_NODES_TOML)

# Hosts with names on several networks, one with a domain suffix (the ib network, see
# suffixed_site), hostname overrides and aliases; beo-21 has no keys.
SSH_HOSTS_TOML = """
[[hosts]]
name = "beo-20"
mac = "52:54:00:12:35:20"
image = "demo"
networks.boot = {{ address = "10.0.2.40", aliases = ["login1"] }}
networks.ib = {{ address = "10.10.0.40", hostname = "beo-20-ib", aliases = ["login1-ib"] }}
ssh_host_keys = [{keys}]

[[hosts]]
name = "beo-21"
mac = "52:54:00:12:35:21"
image = "demo"
networks.boot = "10.0.2.41"
networks.data = {{ address = "192.168.0.41", hostname = "store1" }}
"""

KNOWN_HEADER = "# the head and the frontend, kept by hand\nhead,10.0.2.2 " + KEY_ED25519 + "\n"
EQUIV_HEADER = "head\nfrontend.example.org\n"


def suffixed_site(root: Path, keys: list[str]) -> Path:
    """The bundle test site plus SSH_HOSTS_TOML, and the domain suffix ib.cluster on network ib."""
    make_site(root, extra_hosts=SSH_HOSTS_TOML.format(keys=", ".join(map(json.dumps, keys))))
    edit(root / "site.toml", "mtu = 2044\n", 'mtu = 2044\nsuffix = "ib.cluster"\n')
    return root


def keygen(directory: Path, name: str, kind: str = "ed25519") -> tuple[str, Path]:
    """A fresh host key pair made by ssh-keygen: (the public key line, the private key file)."""
    path = directory / f"{name}_{kind}"
    sh("ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"root@{name}", "-f", str(path))
    return path.with_suffix(".pub").read_text().strip(), path


# --- the generated files -------------------------------------------------------------------


def test_golden_files(tmp_path: Path) -> None:
    root = suffixed_site(tmp_path / "site", [KEY_ED25519, KEY_ECDSA])
    write(root / "ssh/ssh_known_hosts.header", KNOWN_HEADER)
    write(root / "ssh/shosts.equiv.header", EQUIV_HEADER)
    rendered = sshfiles.render_all(load_site(root))
    check_golden(GOLDEN, {f.name: text for f, text in rendered.items()})


def test_names_cover_every_network_override_alias_and_suffix(tmp_path: Path) -> None:
    site = load_site(suffixed_site(tmp_path / "site", [KEY_ED25519]))
    names = sshfiles.host_names(site, site.host("beo-20"))
    assert names == [
        "beo-20", "login1",  # boot: no suffix, the inventory name is the hostname
        "beo-20-ib", "beo-20-ib.ib.cluster", "login1-ib", "login1-ib.ib.cluster",
    ]  # fmt: skip
    assert sshfiles.host_names(site, site.host("beo-21")) == ["beo-21", "store1"]


def test_ssh_keygen_finds_every_host_under_every_name_and_address(tmp_path: Path) -> None:
    ed, _ = keygen(tmp_path, "beo-20")
    ecdsa, _ = keygen(tmp_path, "beo-20", "ecdsa")
    site = load_site(suffixed_site(tmp_path / "site", [ed + " root@beo-20", ecdsa]))
    known = tmp_path / "ssh_known_hosts"
    known.write_text(sshfiles.render(site, sshfiles.KNOWN_HOSTS, ""))
    host = site.host("beo-20")
    lookups = [*sshfiles.host_names(site, host), *(a.address for a in host.addresses)]
    assert len(lookups) == 8
    for name in lookups:
        found = sh("ssh-keygen", "-F", name, "-f", str(known)).stdout
        keys = {" ".join(line.split()[1:3]) for line in found.splitlines() if line[:1] != "#"}
        assert keys == {" ".join(ed.split()[:2]), " ".join(ecdsa.split()[:2])}, name
    # A host without keys has no line under any of its names; so has an unknown name.
    for name in ("beo-21", "store1", "10.0.2.41", "192.168.0.41", "beo-2"):
        assert sh("ssh-keygen", "-F", name, "-f", str(known), check=False).returncode == 1
    # Every line is a key line ssh-keygen can read (the comments aside).
    listing = sh("ssh-keygen", "-l", "-f", str(known)).stdout.splitlines()
    assert len(listing) == 2


def test_shosts_equiv_has_every_name_and_address_one_a_line(tmp_path: Path) -> None:
    site = load_site(suffixed_site(tmp_path / "site", [KEY_ED25519]))
    text = sshfiles.render(site, sshfiles.SHOSTS_EQUIV, "")
    entries = [line for line in text.splitlines() if line and not line.startswith("#")]
    for host in site.hosts:
        for name in (*sshfiles.host_names(site, host), *(a.address for a in host.addresses)):
            assert entries.count(name) == 1, name
    assert all(re.fullmatch(r"[a-z0-9.-]+", e) for e in entries)


def test_header_is_checked_and_read_inside_the_site(tmp_path: Path) -> None:
    root = suffixed_site(tmp_path / "site", [])
    outside = tmp_path / "outside"
    outside.write_text("SENTINEL\n")
    site = load_site(root)
    header = root / "ssh/ssh_known_hosts.header"
    header.parent.mkdir()
    header.symlink_to(outside)  # resolved inside the site: nothing there
    with pytest.raises(ConfigError, match=r"^ssh/ssh_known_hosts.header: not a regular"):
        sshfiles.render_all(site)
    header.unlink()
    header.symlink_to(header.name)
    with pytest.raises(ConfigError, match=r"^ssh/ssh_known_hosts.header: cannot read: "):
        sshfiles.render_all(site)
    header.unlink()
    write(header, "ok\n\x1b[2Jcleared\n")
    with pytest.raises(ConfigError, match="line 2: a control character"):
        sshfiles.render_all(site)
    write(header, "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n")
    with pytest.raises(ConfigError, match="holds a private key"):
        sshfiles.render_all(site)
    write(header, b"\xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        sshfiles.render_all(site)
    write(header, "no final newline")
    text = sshfiles.render_all(site)[sshfiles.KNOWN_HOSTS]
    assert "\nno final newline\n# --- generated" in text


CLEAN = sshfiles.Entry("beo-00", "nodes.d/x.toml", ("beo-00", "10.0.2.14"), (KEY_ED25519,))


@pytest.mark.parametrize(
    ("entry", "refusing"),
    [
        (sshfiles.Entry("beo-01\nevil", "nodes.d/x.toml", ("beo-01",), ()), {"both"}),
        (sshfiles.Entry("beo-01\nevil", "nodes.d/x.toml", ("beo-01",), (KEY_ED25519,)), {"equiv"}),
        (sshfiles.Entry("beo-01", "x.toml\n*", ("beo-01",), ()), {"known"}),
        (sshfiles.Entry("beo-01", "nodes.d/x.toml", ("beo-01 evil",), (KEY_ED25519,)), {"both"}),
        (sshfiles.Entry("beo-01", "nodes.d/x.toml", ("beo-01", ""), (KEY_ED25519,)), {"equiv"}),
        (sshfiles.Entry("beo-01", "x", ("beo-01",), (KEY_ED25519 + "\n* evil",)), {"known"}),
        (sshfiles.Entry("beo-01", "x", ("b\u00e9o-01",), (KEY_ED25519 + " \u00e9",)), set()),
    ],
)
def test_files_refuse_what_ends_a_line_or_a_field(
    entry: sshfiles.Entry, refusing: set[str]
) -> None:
    """Past the loader (which refuses such values), neither file can be written with one: a
    value is refused where the file would print it, by the filter its template used to apply
    (templates.word or templates.line), also among clean hosts."""
    files = {"known": sshfiles.KNOWN_HOSTS, "equiv": sshfiles.SHOSTS_EQUIV}
    for key, f in files.items():
        if refusing & {key, "both"}:
            with pytest.raises(UnsafeValue, match=rf"^bundle/{f.name}.j2: .*(one word|control)"):
                sshfiles.render_entries(f, "", [CLEAN, entry, CLEAN])
        else:
            text = sshfiles.render_entries(f, "", [CLEAN, entry])
            assert text.endswith(sshfiles.render_entries(f, "", [entry]).split("---\n", 1)[1])


def test_sums_are_what_sha256sum_checks(tmp_path: Path) -> None:
    site = load_site(suffixed_site(tmp_path / "site", [KEY_ED25519]))
    texts = {f.name: text for f, text in sshfiles.render_all(site).items()}
    served = tmp_path / "cluster"
    for name, text in texts.items():
        write(served / name, text)
    sums = sshfiles.sums(texts)
    assert [line.split()[1] for line in sums.splitlines()] == sorted(texts)  # sorted by name
    assert sshfiles.sums(dict(reversed(texts.items()))) == sums
    write(served / sshfiles.SUMS, sums)
    checked = sh("sh", "-c", f"cd {served} && sha256sum --strict -c {sshfiles.SUMS}").stdout
    assert checked == "".join(f"{name}: OK\n" for name in sorted(texts))


# --- bundles -------------------------------------------------------------------------------


def test_no_bundle_carries_the_host_files(tmp_path: Path) -> None:
    """They name every host: served once (qlustar/cluster/), not N times in N bundles."""
    root = suffixed_site(tmp_path / "site", [KEY_ED25519])
    write(root / "ssh/shosts.equiv.header", EQUIV_HEADER)
    write(root / "ssh/ssh_known_hosts.header", KNOWN_HEADER)
    site = load_site(root)
    for host in site.hosts:
        paths = {f.path for f in render(site, host.name).files}
        assert not {f.node_path for f in sshfiles.HOST_FILES} & paths, host.name


def test_bundle_inputs_ignore_other_hosts_and_host_file_headers(tmp_path: Path) -> None:
    """A node's bundle is rebuilt for its own changes and the authorized_keys header only: not
    when another host's keys or names change, nor a host file's header (issue 13)."""
    root = suffixed_site(tmp_path / "site", [KEY_ED25519])

    def inputs() -> str:
        site = load_site(root)
        return qb.bundle_inputs(site, site.host("beo-01"))

    before = inputs()
    write(root / "ssh/shosts.equiv.header", EQUIV_HEADER)
    write(root / "ssh/ssh_known_hosts.header", KNOWN_HEADER)
    assert inputs() == before
    edit(root / "nodes.d/hosts.toml", f'["{KEY_ED25519}"]', f'["{KEY_ECDSA}"]')  # beo-20's
    edit(root / "nodes.d/hosts.toml", 'aliases = ["login1"]', 'aliases = ["login2"]')
    assert inputs() == before
    write(root / "ssh/authorized_keys.header", KEY_ED25519 + " ops\n")
    assert inputs() != before


def test_authorized_keys_header_reaches_every_node(tmp_path: Path) -> None:
    root = suffixed_site(tmp_path / "site", [])
    site = load_site(root)
    # Without the header nothing changes: beo-05 has no authorized_keys option, so no file.
    assert "/root/.ssh/authorized_keys" not in {f.path for f in render(site, "beo-05").files}
    without = {f.path: f for f in render(site, "beo-01").files}["/root/.ssh/authorized_keys"]
    admin = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGQ3b1mVf1cTg9v3k3mY5t3GQ2s0n1o8b2q4w6e8r0t2 ops"
    write(root / "ssh/authorized_keys.header", f'from="10.0.2.0/24" {admin}\n')
    site = load_site(root)
    plain = {f.path: f for f in render(site, "beo-05").files}
    keys = plain["/root/.ssh/authorized_keys"]
    assert (keys.mode, plain["/root/.ssh"].mode) == (0o600, 0o700)
    assert f'\nfrom="10.0.2.0/24" {admin}\n' in keys.content.decode()
    both = {f.path: f for f in render(site, "beo-01").files}["/root/.ssh/authorized_keys"]
    text = both.content.decode()
    assert text.index(admin) < text.index(KEY_ED25519.split()[1]) < text.index("nistp256 ")
    assert without.content.decode().splitlines()[-2:] == text.splitlines()[-2:]


# --- hostile inventory values --------------------------------------------------------------

PRIVATE = "-----BEGIN OPENSSH PRIVATE KEY-----"
ED_BLOB = KEY_ED25519.split()[1]

HOSTILE_KEYS = {
    "newline": (f"ssh-ed25519 {ED_BLOB}\nevil ssh-ed25519 {ED_BLOB}", "control character"),
    "carriage-return": (f"ssh-ed25519 {ED_BLOB}\r", "control character"),
    "comma": (f"ssh-ed25519 {ED_BLOB},evil", "not base64"),
    "cert-authority": (f"@cert-authority * ssh-ed25519 {ED_BLOB}", "expected a host key type"),
    "revoked": (f"@revoked ssh-ed25519 {ED_BLOB}", "expected a host key type"),
    "option": (f'command="sh" ssh-ed25519 {ED_BLOB}', "expected a host key type"),
    "pattern": (f"* ssh-ed25519 {ED_BLOB}", "expected a host key type"),
    "bad-base64": ("ssh-ed25519 AAAA!!!!", "not base64"),
    "truncated": ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICE5", "truncated"),
    "type-mismatch": (f"ssh-rsa {ED_BLOB}", "does not hold a ssh-rsa key"),
    "user-key-type": (f"sk-ssh-ed25519@openssh.com {ED_BLOB}", "expected a host key type"),
    "empty": ("", "non-empty"),
}


@pytest.mark.tools
@pytest.mark.network
@pytest.mark.parametrize("case", sorted(HOSTILE_KEYS))
def test_hostile_host_key_is_refused(built_copy: Path, case: str) -> None:
    value, why = HOSTILE_KEYS[case]
    set_keys(built_copy, [value])
    proc = assert_refused(built_copy, names=f"{NODES}: .hosts[0].ssh_host_keys")
    assert why in proc.stderr


@pytest.mark.tools
@pytest.mark.network
def test_pasted_private_key_is_refused_and_not_echoed(built_copy: Path, tmp_path: Path) -> None:
    _, private = keygen(tmp_path, "beo-01")
    secret = private.read_text()
    set_keys(built_copy, [secret])
    proc = assert_refused(built_copy, names=f"{NODES}: .hosts[0].ssh_host_keys[0]: a private key")
    body = [line for line in secret.splitlines() if line and not line.startswith("-----")]
    assert not any(line in proc.stderr + proc.stdout for line in body)


@pytest.mark.tools
@pytest.mark.network
@pytest.mark.parametrize("alias", ["evil,*", "@cert-authority", "a b", "!beo-02", "x\ny"])
def test_hostile_alias_is_refused(built_copy: Path, alias: str) -> None:
    """The schema's host name pattern keeps patterns, markers and separators out of the names;
    the address table is reported as a whole (the schema's oneOf)."""
    edit(built_copy / NODES, 'aliases = ["node1"]', f"aliases = [{json.dumps(alias)}]")
    proc = assert_refused(built_copy, names=f"{NODES}: .hosts[0].networks.boot: ")
    assert "is not a valid address" in proc.stderr


@pytest.mark.tools
@pytest.mark.network
def test_a_name_of_two_hosts_is_refused(built_copy: Path) -> None:
    edit(built_copy / NODES, 'aliases = ["node1"]', 'aliases = ["beo-02"]')
    proc = assert_refused(built_copy, names=NODES)
    assert "name 'beo-02' is already a name of host" in proc.stderr


@pytest.mark.tools
@pytest.mark.network
def test_hostile_header_is_refused(built_copy: Path, sentinel: Path) -> None:
    header = built_copy / "ssh/shosts.equiv.header"
    header.parent.mkdir()
    header.symlink_to(sentinel / "secret")
    assert_refused(built_copy, names="ssh/shosts.equiv.header", sentinel=sentinel)


def set_keys(site_root: Path, keys: list[str]) -> None:
    """Give the first host of the built test site (beo-01) these ssh_host_keys."""
    listed = ", ".join(json.dumps(k) for k in keys)  # JSON strings are TOML basic strings
    host = 'groups = ["rack1"]\n'
    edit(site_root / NODES, host, f"{host}ssh_host_keys = [{listed}]\n")


# --- the build -----------------------------------------------------------------------------


def executed(out: str) -> set[str]:
    return set(re.findall(r"^\.  (\S+)", out, re.M))


def build(root: Path) -> set[str]:
    return executed(qlimage("-C", str(root), "build").stdout)


@pytest.mark.tools
@pytest.mark.network
def test_build_serves_both_files_once_and_one_header_rebuilds_one(
    built_copy: Path, tmp_path: Path
) -> None:
    layout = Layout(built_copy / "bootfiles")
    public, private = keygen(tmp_path, "beo-01")
    set_keys(built_copy, [public])
    build(built_copy)
    known, equiv = (layout.cluster_file(f.name) for f in sshfiles.HOST_FILES)
    sums = layout.cluster_file(sshfiles.SUMS)
    epoch = load_site(built_copy).source_date_epoch
    for path in (known, equiv, sums, layout.cluster_dir()):
        # Served: public, and with the mtime every served output has (reproducible trees).
        assert (path.stat().st_mode & 0o777, path.stat().st_mtime) == (
            0o755 if path.is_dir() else 0o644,
            epoch,
        ), path
    for name in ("beo-01", "node1", "10.0.2.15"):
        found = sh("ssh-keygen", "-F", name, "-f", str(known)).stdout
        assert " ".join(public.split()[:2]) in found, name
    assert "beo-02: no ssh_host_keys in nodes.d/cluster.toml" in known.read_text()
    assert [e for e in equiv.read_text().splitlines() if e[:1] != "#"] == [
        "beo-01", "node1", "10.0.2.15", "beo-02", "10.0.2.16",
    ]  # fmt: skip
    assert_sums_check(layout)
    assert not (layout.head / "ssh").exists()  # one copy: the head's admin links to it
    assert build(built_copy) == set()

    # Editing one header rewrites that file and the sums, nothing else: no bundle.
    known_before = known.stat().st_mtime_ns, known.read_bytes()
    bundles_before = {h.name: layout.bundle(h).read_bytes() for h in load_site(built_copy).hosts}
    write(built_copy / "ssh/shosts.equiv.header", EQUIV_HEADER)
    ran = build(built_copy)
    assert ran == {"ssh:shosts.equiv", "ssh:SHA256SUMS"}, ran
    assert (known.stat().st_mtime_ns, known.read_bytes()) == known_before
    assert equiv.read_text().count(EQUIV_HEADER) == 1
    assert_sums_check(layout)
    equiv_before = equiv.stat().st_mtime_ns, equiv.read_bytes()
    write(built_copy / "ssh/ssh_known_hosts.header", KNOWN_HEADER)
    assert build(built_copy) == {"ssh:ssh_known_hosts", "ssh:SHA256SUMS"}
    assert (equiv.stat().st_mtime_ns, equiv.read_bytes()) == equiv_before
    assert known.read_text().count(KNOWN_HEADER) == 1
    assert_sums_check(layout)

    # No bundle carries them (nodes fetch them: test_cluster_files.py), and no private key
    # reaches anything served.
    site: Site = load_site(built_copy)
    secret = [line for line in private.read_text().splitlines() if not line.startswith("---")]
    for host in site.hosts:
        data = layout.bundle(host).read_bytes()
        assert data == bundles_before[host.name]
        paths = {f["path"] for f in json.loads(data)["files"]}
        assert not any(p.startswith("/etc/ssh/") for p in paths), host.name
    for path in (built_copy / "bootfiles").rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20:
            data = path.read_bytes()
            assert not any(line.encode() in data for line in secret), path
            # (libraries of the images mention private keys: bundles and SSH files may not)
            if path.is_relative_to(layout.nodes()) or path.is_relative_to(layout.cluster_dir()):
                assert b"PRIVATE KEY" not in data, path


def assert_sums_check(layout: Layout) -> None:
    """The served SHA256SUMS lists exactly the served files, and sha256sum agrees with it."""
    top = layout.cluster_dir()
    assert sorted(p.name for p in top.iterdir()) == sorted(
        [sshfiles.SUMS, *(f.name for f in sshfiles.HOST_FILES)]
    )
    sh("sh", "-c", f"cd {top} && sha256sum --strict --quiet -c {sshfiles.SUMS}")


# --- the edge site (issue 13: the generated part is built in Python, not in Jinja loops) ----

EDGE_GOLDEN = Path(__file__).resolve().parent / "golden" / "ssh-edge"


def test_edge_site_golden_files(tmp_path: Path) -> None:
    """Written by the Jinja loops before issue 13: the Python-built lines must not differ."""
    root = make_edge_site(tmp_path / "site")
    write(root / "ssh/ssh_known_hosts.header", KNOWN_HEADER + "no final newline")
    write(root / "ssh/shosts.equiv.header", "\r\n" + EQUIV_HEADER.replace("\n", "\r\n"))
    rendered = sshfiles.render_all(load_site(root))
    check_golden(EDGE_GOLDEN, {f.name: text for f, text in rendered.items()})
    site = load_site(root)
    for f in sshfiles.HOST_FILES:  # render() alone says the same
        assert rendered[f] == sshfiles.render(site, f, sshfiles.read_header(site, f.header))


def test_authorized_header_is_read_once_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sentinel: Path
) -> None:
    """Every node's bundle inputs ask for the authorized_keys header (10,000 times a build at
    10,000 nodes): it is read once, and again whenever it or its directory changed."""
    root = make_site(tmp_path / "site")
    reads: list[str] = []
    read_header = sshfiles.read_header

    def counted(site: Site, rel: str) -> str:
        reads.append(rel)
        return read_header(site, rel)

    monkeypatch.setattr(sshfiles, "read_header", counted)
    site = load_site(root)
    assert {sshfiles.authorized_header(site) for _ in range(1000)} == {""}  # no ssh/ at all
    assert reads == [sshfiles.AUTHORIZED_KEYS_HEADER]
    header = root / sshfiles.AUTHORIZED_KEYS_HEADER
    write(header, "# ops A\n")
    # Written within the kernel clock's margin: a rewrite could keep its stamps, so each ask reads.
    assert [sshfiles.authorized_header(site) for _ in range(3)] == ["# ops A\n"] * 3
    assert len(reads) == 4
    time.sleep(MARGIN_NS / 1e9 + 0.1)
    again = load_site(root)  # another load of the same site shares what was read
    assert {sshfiles.authorized_header(again) for _ in range(1000)} == {"# ops A\n"}
    assert len(reads) == 5
    # Rewritten in place, same size and mtime: the ctime still tells.
    before = header.stat()
    header.write_text("# ops B\n")
    os.utime(header, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert sshfiles.authorized_header(site) == "# ops B\n"
    # Gone: nothing; a link to a file outside the site: refused as read_header refuses it.
    header.unlink()
    assert sshfiles.authorized_header(site) == ""
    header.symlink_to(sentinel / "secret")
    time.sleep(MARGIN_NS / 1e9 + 0.1)
    for _ in range(2):
        with pytest.raises(ConfigError, match=r"^ssh/authorized_keys\.header: not a regular file"):
            sshfiles.authorized_header(site)
