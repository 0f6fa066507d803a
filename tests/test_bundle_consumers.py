"""Bundles as their real consumers read them: systemd-analyze verify (mount/automount units and
their wants links), ifquery (ifupdown), ssh-keygen (authorized_keys), systemd-escape (unit
names), a POSIX shell (options.d files, disk-config) and the node runner's bundle parser.

The bundle's files are written into a fake node root in tmp_path, as the runner would.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlimage.bundle import render as qb
from qlimage.bundle.render import Bundle
from qlimage.node.runner import bundle as node_bundle
from qlimage.site import Site, load_site

from helpers import make_site, render

SYSTEM_UNITS = Path("/lib/systemd/system")

TRICKY_MOUNTS = """
[[hosts]]
name = "beo-09"
mac = "52:54:00:12:34:60"
image = "demo"
networks.boot = "10.0.2.30"
options.mounts = [
  { what = "head:/srv/a b", where = "/srv/my-data 100%/ü", options = "vers=4,x-opt=a%b" },
  { what = "head:/x", where = "/.hidden/dir.with.dots/", automount = true, idle_timeout = 0 },
  { what = "//fs/share", where = "/mnt/win", type = "cifs", automount = true },
  { what = "/dev/disk/by-label/scratch", where = "/local/-scratch-", type = "xfs" },
]
"""


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)


def write_tree(b: Bundle, root: Path) -> None:
    """Apply the bundle's files below `root` (parents 0755 root:root, as the runner does)."""
    for f in b.files:
        path = root / f.path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if f.type == "dir":
            path.mkdir(exist_ok=True)
        elif f.type == "file":
            path.write_bytes(f.content)
        else:
            os.symlink(f.target, path)
        os.chown(path, f.uid, f.gid, follow_symlinks=False)
        if f.type != "symlink":
            os.chmod(path, f.mode)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return load_site(make_site(tmp_path / "site", extra_hosts=TRICKY_MOUNTS))


# --- systemd --------------------------------------------------------------------------------


def node_root(tmp_path: Path, b: Bundle) -> Path:
    """A node root holding the bundle plus the system's own units (for the targets)."""
    root = tmp_path / f"root-{b.node}"
    write_tree(b, root)
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    return root


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of units by name, loaded from `root` only. It exits 0 for some
    broken settings (e.g. a relative Where=, an unknown key) and only warns, so callers also
    require silence."""
    return run("systemd-analyze", "verify", f"--root={root}", "--man=no", *units)


def mount_units(b: Bundle) -> list[str]:
    return [
        os.path.basename(f.path)
        for f in b.files
        if f.path.startswith("/etc/systemd/system/") and f.path.endswith((".mount", ".automount"))
        and f.type == "file"
    ]  # fmt: skip


@pytest.mark.parametrize("node", ["beo-01", "beo-09"])
def test_systemd_analyze_verifies_units(tmp_path: Path, site: Site, node: str) -> None:
    b = render(site, node)
    units = mount_units(b)
    assert len(units) >= 4
    root = node_root(tmp_path, b)
    proc = verify(root, *units)
    assert (proc.returncode, proc.stderr, proc.stdout) == (0, "", "")


@pytest.mark.parametrize("node", ["beo-01", "beo-09"])
def test_wants_links_enable_the_units(tmp_path: Path, site: Site, node: str) -> None:
    """Each wants link names an existing unit file of its own name (what `systemctl enable`
    creates), the targets pull them in cleanly, and every unit is enabled exactly once:
    the .automount when there is one, else the .mount."""
    b = render(site, node)
    root = node_root(tmp_path, b)
    enabled = []
    for f in b.files:
        if f.type == "symlink" and ".target.wants/" in f.path:
            assert os.path.basename(f.target) == os.path.basename(f.path)
            assert (root / f.target.lstrip("/")).is_file() or f.target.startswith("/lib/")
            enabled.append(os.path.basename(f.path))
    units = mount_units(b)
    automounted = {u.removesuffix(".automount") for u in units if u.endswith(".automount")}
    expected = [u for u in units if u.endswith(".automount") or u.removesuffix(".mount")
                not in automounted]  # fmt: skip
    assert sorted(u for u in enabled if u != "opensm.service") == sorted(expected)
    proc = verify(root, "remote-fs.target", "local-fs.target")
    assert (proc.returncode, proc.stderr) == (0, "")


def test_systemd_unit_names_use_the_real_escaping(site: Site) -> None:
    b = render(site, "beo-09")
    for unit in mount_units(b):
        path = f"/etc/systemd/system/{unit}"
        text = next(f for f in b.files if f.path == path).content.decode()
        where = next(line for line in text.splitlines() if line.startswith("Where="))
        where = where.removeprefix("Where=").replace("%%", "%")
        real = run("systemd-escape", "--path", f"--suffix={unit.rsplit('.', 1)[1]}", where)
        assert real.stdout.strip() == unit


@pytest.mark.parametrize(
    ("broken", "what"),
    [
        ("Where=/srv/data\n", "Where=/srv/other\n"),  # name does not match Where=
        ("Where=/srv/data\n", "Where=srv/data\n"),  # relative: only a warning, exit 0
        ("Type=nfs\n", "Type=nfs\nBogus=1\n"),  # unknown key: only a warning, exit 0
        ("[Mount]\n", "[Mount\n"),  # broken section header
    ],
)
def test_verify_catches_a_broken_unit(tmp_path: Path, site: Site, broken: str, what: str) -> None:
    b = render(site, "beo-01")
    root = node_root(tmp_path, b)
    unit = root / "etc/systemd/system/srv-data.mount"
    text = unit.read_text()
    assert broken in text
    unit.write_text(text.replace(broken, what, 1))
    proc = verify(root, "srv-data.mount")
    assert proc.returncode != 0 or proc.stderr != "", proc


# --- systemd-escape -------------------------------------------------------------------------

ESCAPE_CASES = [
    "/", "//", "///", "/./", "/.", "", "/srv/data", "/srv/data/", "//srv//data//", "/a/./b",
    "/a b", "/a  b", "/-", "/-x-", "/a-b/c-d", "/.hidden", "/a/.b", "/..b", "/...", "/a/..b",
    "/ü", "/日本語/データ", "/a\\b", "/a\\", "/\\x2d", "/x:y_z", "/%u", "/a\tb", "/a\nb",
    "/a~b", "/a+b=c,d@e", "/$HOME", "/a'b\"c", "/emoji😀", "foo/bar", "./x", "x/.", "a//b",
    "/" + "a" * 255, "/" + "/".join(["c" * 200] * 20), "/UPPER/Case", "/0/1/2", "/a.", "/.a.",
]  # fmt: skip
ESCAPE_FAILURES = [".", "./", "..", "/..", "/a/..", "/a/../b", "a/..", "/" + "a" * 256,
                   "/" + "/".join(["b" * 200] * 21)]  # fmt: skip


def real_escape(path: str) -> subprocess.CompletedProcess[str]:
    return run("systemd-escape", "--path", "--", path)


@pytest.mark.parametrize("path", ESCAPE_CASES)
def test_systemd_escape_path_matches_systemd_escape(path: str) -> None:
    real = real_escape(path)
    assert real.returncode == 0, real.stderr
    assert qb.systemd_escape_path(path) == real.stdout.removesuffix("\n")


@pytest.mark.parametrize("path", ESCAPE_FAILURES)
def test_systemd_escape_path_fails_where_systemd_escape_fails(path: str) -> None:
    assert real_escape(path).returncode != 0
    with pytest.raises(ValueError):
        qb.systemd_escape_path(path)


def random_paths(n: int) -> Iterator[str]:
    rng = random.Random(1234)
    alphabet = ["/", "/", "/", ".", ".", "-", "_", ":", " ", "\\", "a", "Z", "0", "ü", "%", "\t",
                "x", "~", "€", "..", "./", "//"]  # fmt: skip
    for _ in range(n):
        yield "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def test_systemd_escape_path_fuzz_against_systemd_escape() -> None:
    paths = list(dict.fromkeys(random_paths(400)))
    for path in paths:
        real = real_escape(path)
        if real.returncode == 0:
            assert qb.systemd_escape_path(path) == real.stdout.removesuffix("\n"), repr(path)
        else:
            with pytest.raises(ValueError):
                qb.systemd_escape_path(path)


# --- ifupdown -------------------------------------------------------------------------------


def interfaces_root(tmp_path: Path, b: Bundle) -> Path:
    """/etc/network/interfaces as Debian ships it, sourcing interfaces.d (relative to its
    directory, so ifquery reads our file from tmp_path)."""
    root = tmp_path / f"root-{b.node}"
    write_tree(b, root)
    (root / "etc/network/interfaces").write_text(
        "auto lo\niface lo inet loopback\n\nsource interfaces.d/*\n"
    )
    return root / "etc/network/interfaces"


def ifquery(main: Path, *args: str) -> str:
    proc = run("ifquery", "-i", str(main), "--state-dir", str(main.parent / "run"), *args)
    assert (proc.returncode, proc.stderr) == (0, ""), proc
    return proc.stdout


def test_ifquery_reads_interfaces(tmp_path: Path, site: Site) -> None:
    main = interfaces_root(tmp_path, render(site, "beo-01"))
    assert ifquery(main, "--list", "-a").split() == ["lo", "eth0", "ib0"]
    assert ifquery(main, "eth0").splitlines() == [
        "address: 10.0.2.15",
        "netmask: 255.255.255.0",
        "gateway: 10.0.2.2",
        "broadcast: 10.0.2.255",
    ]
    assert ifquery(main, "ib0").splitlines() == [
        "address: 10.10.0.15",
        "netmask: 255.255.0.0",
        "mtu: 65520",
        "broadcast: 10.10.255.255",
    ]
    # Our file alone is a valid interfaces file too.
    ours = main.parent / "interfaces.d/qluman"
    assert ifquery(ours, "--list", "-a").split() == ["lo", "eth0", "ib0"]  # lo: always known


def test_ifquery_reads_bonds_and_dhcp(tmp_path: Path, site: Site) -> None:
    main = interfaces_root(tmp_path, render(site, "beo-05"))
    assert ifquery(main, "--list", "-a").split() == ["lo", "eth0", "bond0", "eth1", "eth2", "ib0"]
    assert ifquery(main, "bond0").splitlines() == [
        "address: 192.168.0.19",
        "netmask: 255.255.255.0",
        "mtu: 9000",
        "bond-slaves: eth1 eth2",
        "bond-mode: 802.3ad",
        "bond-miimon: 100",
        "broadcast: 192.168.0.255",
    ]
    assert ifquery(main, "eth1").splitlines() == ["bond-master: bond0"]
    assert ifquery(main, "ib0").splitlines() == ["pre-up: ip link set dev ib0 mtu 2044"]
    assert "gateway" not in ifquery(main, "eth0")


def test_ifquery_rejects_a_broken_file(tmp_path: Path) -> None:
    bad = tmp_path / "interfaces"
    bad.write_text("auto eth0\niface eth0 inet static\n    address\n")
    proc = run("ifquery", "-i", str(bad), "--state-dir", str(tmp_path), "eth0")
    assert proc.returncode != 0


# --- ssh-keygen -----------------------------------------------------------------------------


def fingerprint(path: Path) -> list[str]:
    proc = run("ssh-keygen", "-l", "-f", str(path))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_ssh_keygen_reads_authorized_keys(tmp_path: Path) -> None:
    keys = []
    for kind, extra in (("ed25519", []), ("ecdsa", ["-b", "256"]), ("rsa", ["-b", "2048"])):
        key = tmp_path / f"id_{kind}"
        cmd = ["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", f"{kind}@head", "-f"]
        subprocess.run([*cmd, str(key)], check=True, timeout=60)
        keys.append(key)
    pubs = tuple(Path(f"{k}.pub").read_text().strip() for k in keys)
    site = load_site(make_site(tmp_path / "site", keys=pubs))
    root = tmp_path / "root"
    write_tree(render(site, "beo-01"), root)
    ssh = root / "root/.ssh"
    assert oct(ssh.stat().st_mode & 0o7777) == "0o700"
    authorized = ssh / "authorized_keys"
    assert oct(authorized.stat().st_mode & 0o7777) == "0o600"
    expected = [line for k in keys for line in fingerprint(Path(f"{k}.pub"))]
    assert fingerprint(authorized) == expected


# --- the shell ------------------------------------------------------------------------------


def sh(script: str, cwd: Path) -> str:
    proc = run("sh", "-euc", script, cwd=cwd)
    assert (proc.returncode, proc.stderr) == (0, ""), proc
    return proc.stdout


def test_option_files_are_shell_sourceable(tmp_path: Path, site: Site) -> None:
    root = tmp_path / "root"
    write_tree(render(site, "beo-01"), root)
    out = sh(
        'for f in etc/qlustar/options.d/*; do [ "${f##*/}" = disk-config ] || . "./$f"; done\n'
        'printf "%s|" "$NAME" "$MAC" "$NETWORKS" "$ADDRESS_IB" "$OPENSM" "$IPMI_GATEWAY"'
        ' "$CHROOT" "$RELAYHOST" "$PAM_SLURM"',
        root,
    )
    assert out.split("|") == [
        "beo-01", "52:54:00:12:34:56", "boot ib ipmi", "10.10.0.15", "yes", "10.1.0.1", "hpc",
        "[smtp2.example.org]:587", "yes", "",
    ]  # fmt: skip


DISK_READER = r"""
while read -r kw n size fs mount label options; do
  case $kw in
    '#'*|'') ;;
    device=*) printf 'device [%b]\n' "${kw#device=}" ;;
    label=*|wipe=*) printf '%s\n' "$kw" ;;
    part) printf 'part %s %s %s [%b] [%b] [%b]\n' "$n" "$size" "$fs" "$mount" "$label" "$options" ;;
    *) echo "unknown $kw" >&2; exit 1 ;;
  esac
done < etc/qlustar/options.d/disk-config
"""


def test_disk_config_parses_in_a_posix_shell(tmp_path: Path) -> None:
    extra = r"""
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
image = "demo"
networks.boot = "10.0.2.22"
options.disk = { device = "/dev/disk/by-id/my disk", label = "dos", wipe = "always", partitions = [
  { size = "512MiB", fs = "swap" },
  { size = "10GiB", fs = "ext4", mount = "/my scratch\\1 2", label = "-", options = "-" },
  { size = "rest", fs = "xfs", mount = "/data", label = "data_1", options = "noatime,nodiratime" },
] }
"""
    site = load_site(make_site(tmp_path / "site", extra_hosts=extra))
    root = tmp_path / "root"
    write_tree(render(site, "beo-08"), root)
    for shell in ("sh", "bash", "dash"):
        if shutil.which(shell) is None:
            continue
        proc = run(shell, "-euc", DISK_READER, cwd=root)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [
            "device [/dev/disk/by-id/my disk]",
            "label=dos",
            "wipe=always",
            "part 1 512MiB swap [-] [-] [-]",
            "part 2 10GiB ext4 [/my scratch\\1 2] [-] [-]",
            "part 3 rest xfs [/data] [data_1] [noatime,nodiratime]",
        ], shell


# --- the node runner ------------------------------------------------------------------------

RUNNER_ACTIONS = {"hostname", "ipmi", "command"}


@pytest.mark.parametrize("node", ["beo-01", "beo-02", "beo-05", "beo-09"])
def test_node_runner_accepts_the_files(site: Site, node: str) -> None:
    b = render(site, node)
    doc = json.loads(qb.bundle_json(b))
    doc["actions"] = [a for a in doc["actions"] if a["kind"] in RUNNER_ACTIONS]
    parsed = node_bundle.parse_bundle(json.dumps(doc).encode(), "0" * 64)
    assert parsed.node == node
    assert [e.path for e in parsed.files] == [f.path for f in b.files]
    for entry, f in zip(parsed.files, b.files, strict=True):
        assert (entry.type, entry.uid, entry.gid, entry.owner, entry.group) == (
            f.type, f.uid, f.gid, f.owner, f.group
        )  # fmt: skip
        if f.type == "file":
            assert (entry.data, entry.mode) == (f.content, f.mode)
        elif f.type == "dir":
            assert entry.mode == f.mode
        else:
            assert entry.target == f.target


def test_node_runner_accepts_every_action(site: Site) -> None:
    b = render(site, "beo-01")
    assert {a["kind"] for a in b.actions} - RUNNER_ACTIONS == {"ensure-line"}
    parsed = node_bundle.parse_bundle(qb.bundle_json(b), "0" * 64)
    assert len(parsed.actions) == len(b.actions)


def test_node_runner_accepts_ipmi_without_gateway(tmp_path: Path) -> None:
    extra = """
[[hosts]]
name = "beo-08"
mac = "52:54:00:12:34:5d"
image = "demo"
networks.boot = "10.0.2.22"
networks.ib = "10.10.3.4"
options.ipmi = { network = "ib" }
"""
    site = load_site(make_site(tmp_path / "site", extra_hosts=extra))
    b = render(site, "beo-08")
    assert b.actions[1]["gateway"] == ""
    parsed = node_bundle.parse_bundle(qb.bundle_json(b), "0" * 64)
    assert len(parsed.actions) == 2
