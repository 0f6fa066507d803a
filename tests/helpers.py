"""Shared test helpers (constants and functions, no fixtures): tests import them with
`from helpers import ...`; conftest.py holds the fixtures and imports from here too.

Sections:
- running qlimage: the repository, the `qlimage` command line, a free TCP port;
- the build site: a small real site (`write_site`) that `qlimage build` builds with the demo's
  core module (Debian packages from the cached archive) and that the boot tests boot;
- the bundle site: a site with many hosts and every node option (`make_site`), whose per-node
  configuration bundles are rendered (`render`) but never built into an image.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from qlimage.bundle import render as qb
from qlimage.bundle.render import Bundle
from qlimage.layout import DOIT_STATE
from qlimage.site import Site

# --- running qlimage -----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
QLIMAGE = [sys.executable, "-m", "qlimage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def qlimage(
    *args: str, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [*QLIMAGE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"qlimage {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


# --- the build site (built with `qlimage build`, booted by test_boot.py) -------------------------

BUILD_SITE_TOML = """\
[site]
name = "test"
source_date_epoch = 1700000000

[head]
address = "10.0.2.2"
http_port = {port}

[networks.boot]
cidr = "10.0.2.0/24"
gateway = "10.0.2.2"
boot = true

[boot]
default = "fallback"

[bootconfigs.compute]
image = "demo"
append = "debug"

[bootconfigs.fallback]
image = "demo"
"""

BUILD_IMAGE_TOML = """\
name = "demo"
flavor = "bookworm"
version = "11"
modules = ["core"]
"""

ADMIN_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk7Jc4LkQ1wY8+3x2lqj4mGQ0bqGv6mZ7W3aQbqK0Yd admin@head"
)

BUILD_NODES_TOML = """\
[optionsets.compute]
rootfs = ["tweaks"]
authorized_keys = ["{key}"]

[groups.rack1]
optionsets = ["compute"]

[[hosts]]
name = "beo-01"
mac = "52:54:00:12:34:56"
bootconfig = "compute"
groups = ["rack1"]
networks.boot = {{ address = "10.0.2.15", aliases = ["node1"] }}

[[hosts]]
name = "beo-02"
mac = "52:54:00:12:34:57"
image = "demo"
networks.boot = "10.0.2.16"
"""


def write_site(root: Path, *, port: int | None = None) -> Path:
    """A test site using the demo's core recipe (Debian packages from the cached archive)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "site.toml").write_text(BUILD_SITE_TOML.format(port=port or free_port()))
    (root / "images.d").mkdir(exist_ok=True)
    (root / "images.d/demo.toml").write_text(BUILD_IMAGE_TOML)
    (root / "nodes.d").mkdir(exist_ok=True)
    (root / "nodes.d/cluster.toml").write_text(BUILD_NODES_TOML.format(key=ADMIN_KEY))
    shutil.copytree(REPO / "modules/core", root / "modules/core", dirs_exist_ok=True)
    write_rootfs_config(root / "rootfs/tweaks")
    return root


# Root FS Customization scripts write to the console so a boot test can see them run, in order.
SCRIPT = """#!/bin/sh
echo "qlustar-test: {name} ran" > /dev/console
{extra}
"""


def write_rootfs_config(top: Path) -> None:
    """Two init.d scripts and a file owned by daemon (uid 1 in the core module) with mode 0640."""
    initd = top / "lib/qlustar/init.d"
    initd.mkdir(parents=True, exist_ok=True)
    for name, extra in (
        ("10-first", ""),
        (
            "20-second",
            "echo \"qlustar-test: secret $(stat -c '%U:%G %a' /etc/qlustar/secret)\""
            " > /dev/console\n"
            "[ -e /opt/chroot-marker ] &&"
            ' echo "qlustar-test: chroot says $(cat /opt/chroot-marker)" > /dev/console; true',
        ),
    ):
        path = initd / name
        path.write_text(SCRIPT.format(name=name, extra=extra))
        os.chmod(path, 0o755)
    secret = top / "etc/qlustar/secret"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("only for daemon\n")
    os.chown(secret, 1, 1)
    os.chmod(secret, 0o640)
    for d in (top, *[p for p in top.rglob("*") if p.is_dir()]):
        os.chmod(d, 0o755)


# --- the bundle site (rendered per-node bundles; test_bundle*.py, test_noderunner.py) ------------

UID = 54321  # a numeric owner unknown to the head's passwd/group
BINARY = bytes(range(256))

KEY_ED25519 = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICE5jlDcQmQdHlCOOMEZUv+Kk30+tY0Rme2VrlVtB0mS admin@head"
)
KEY_ECDSA = (
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBBKPodcT7cFHgVbH"
    "/PS+jmXLJl7pSJOxvnlO0EEEvn+2i1/HgJLwr++QgZLC0X+YdTn5q/W9JEIVtv5+5XBiSEg= ops@head"
)

BUNDLE_SITE_TOML = """\
[site]
name = "bundle-test"

[head]
address = "10.0.2.2"
http_port = 8470

[networks.boot]
cidr = "10.0.2.0/24"
gateway = "10.0.2.2"
boot = true

[networks.ib]
cidr = "10.10.0.0/16"
mtu = 2044

[networks.ipmi]
cidr = "10.1.0.0/16"
gateway = "10.1.0.1"

[networks.data]
cidr = "192.168.0.0/24"
mtu = 9000

[bootconfigs.compute]
image = "demo"

[bootconfigs.rhel]
image = "rhel"
"""

BUNDLE_IMAGES = {
    "demo.toml": 'name = "demo"\nflavor = "bookworm"\nversion = "11"\nmodules = ["core"]\n',
    "rhel.toml": 'name = "rhel"\nflavor = "el9"\nversion = "11"\nmodules = ["core"]\n',
    "odd.toml": 'name = "odd"\nflavor = "haiku"\nversion = "11"\nmodules = ["core"]\n',
}

BUNDLE_OPTIONSETS_TOML = f"""\
[optionsets.compute]
mounts = [
  {{ what = "head:/srv/data", where = "/srv/data", options = "vers=4,ro" }},
  {{ what = "head:/home", where = "/home/", type = "nfs4", automount = true, idle_timeout = 600 }},
  {{ what = "tmpfs", where = "/scratch/tmp", type = "tmpfs", options = "size=10%,mode=1777" }},
]
authorized_keys = ["{KEY_ED25519}", "{KEY_ECDSA}"]
mail = {{ relayhost = "[head]" }}
opensm = false

[optionsets.ib]
opensm = true
network = {{ interfaces = [
  {{ device = "eth0", network = "boot" }},
  {{ device = "ib0", network = "ib", mtu = 65520 }},
] }}

[optionsets.scratch]
disk = {{ device = "/dev/sda", label = "gpt", wipe = "if-unformatted", partitions = [
  {{ size = "16GiB", fs = "swap" }},
  {{ size = "rest", fs = "xfs", mount = "/scratch", label = "scratch", options = "noatime" }},
] }}

[optionsets.gpu]
rootfs = ["base", "gpu"]
pam_slurm = true

[optionsets.mailer]
mail = {{ relayhost = "smtp1.example.org" }}

[[optionsets.bonded.network.interfaces]]
device = "eth0"
network = "boot"
gateway = false

[[optionsets.bonded.network.interfaces]]
device = "bond0"
network = "data"
bond = {{ slaves = ["eth1", "eth2"], mode = "802.3ad" }}

[[optionsets.bonded.network.interfaces]]
device = "ib0"
dhcp = true
mtu = 2044

[groups.rack1]
optionsets = ["compute", "ib"]
"""

BUNDLE_HOSTS_TOML = """\
[[hosts]]
name = "beo-01"
mac = "52:54:00:12:34:56"
bootconfig = "compute"
groups = ["rack1"]
optionsets = ["scratch", "gpu", "mailer"]
networks.boot = "10.0.2.15"
networks.ib = "10.10.0.15"
networks.ipmi = "10.1.0.15"
[hosts.options]
ipmi = { network = "ipmi" }
chroot = "hpc"
mail = { relayhost = "[smtp2.example.org]:587" }

[[hosts]]
name = "beo-02"
mac = "52:54:00:12:34:57"
bootconfig = "rhel"
optionsets = ["bonded"]
networks.boot = "10.0.2.16"
networks.data = "192.168.0.16"
[hosts.options]
ipmi = { network = "boot", channel = 2 }
pam_slurm = false

[[hosts]]
name = "beo-03"
mac = "52:54:00:12:34:58"
image = "demo"
groups = ["rack1"]
networks.boot = "10.0.2.17"
networks.ib = "10.10.0.17"

[[hosts]]
name = "beo-04"
mac = "52:54:00:12:34:59"
image = "demo"
groups = ["rack1"]
optionsets = ["mailer"]
networks.boot = "10.0.2.18"
networks.ib = "10.10.0.18"

[[hosts]]
name = "beo-05"
mac = "52:54:00:12:34:5a"
image = "demo"
optionsets = ["bonded"]
networks.boot = "10.0.2.19"
networks.data = "192.168.0.19"

[[hosts]]
name = "beo-06"
mac = "52:54:00:12:34:5b"
image = "odd"
networks.boot = "10.0.2.20"
"""


def write(
    path: Path, data: str | bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    os.chown(path, *owner)
    os.chmod(path, mode)  # after chown, which clears setuid bits


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not exactly once in {path}"
    path.write_text(text.replace(old, new))


def make_dir(path: Path, mode: int = 0o755, owner: tuple[int, int] = (0, 0)) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, *owner)
    os.chmod(path, mode)


def make_rootfs(rootfs: Path) -> None:
    """Two Root FS Customization configs; `gpu` overrides parts of `base`."""
    base, gpu = rootfs / "base", rootfs / "gpu"
    for d in (base, gpu):
        make_dir(d, 0o700)  # the config's own directory is not a node path
    make_dir(base / "etc")
    write(base / "etc/motd", "Welcome to the cluster\n")
    write(base / "etc/security/limits.d/90-hpc.conf", "* soft memlock unlimited\n")
    write(base / "opt/tool", BINARY, 0o4755, (UID, UID))
    make_dir(base / "var/spool/jobs", 0o1777, (1, 1))  # daemon:daemon
    write(base / "root/secret", "s3cret\n", 0o600)
    make_dir(base / "opt/cfg")
    write(base / "opt/cfg/a.conf", "a = 1\n")
    make_dir(gpu / "etc")
    write(gpu / "etc/motd", "GPU node\n", 0o640, (0, 1))
    write(gpu / "lib/qlustar/init.d/50-nvidia", "#!/bin/sh\nnvidia-smi -pm 1\n", 0o755)
    (gpu / "usr/local/bin").mkdir(parents=True)
    os.symlink("/opt/nvidia/bin/nv", gpu / "usr/local/bin/nv")
    os.lchown(gpu / "usr/local/bin/nv", UID, UID)
    make_dir(gpu / "opt")
    os.symlink("/etc/nvidia", gpu / "opt/cfg")  # replaces base's directory and its contents


def make_site(root: Path, *, extra_hosts: str = "", keys: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "site.toml").write_text(BUNDLE_SITE_TOML)
    for name, text in BUNDLE_IMAGES.items():
        write(root / "images.d" / name, text)
    optionsets = BUNDLE_OPTIONSETS_TOML
    if keys:
        listed = ", ".join(json.dumps(k) for k in keys)
        optionsets = optionsets.replace(f'["{KEY_ED25519}", "{KEY_ECDSA}"]', f"[{listed}]")
    write(root / "nodes.d/options.toml", optionsets)
    write(root / "nodes.d/hosts.toml", BUNDLE_HOSTS_TOML + extra_hosts)
    (root / "chroots/hpc").mkdir(parents=True)
    (root / "chroots/hpc/chroot.toml").write_text('export = "/srv/chroots/hpc"\n')
    make_rootfs(root / "rootfs")
    return root


def render(site: Site, name: str) -> Bundle:
    return qb.render_bundle(site, site.host(name))


# --- hostile and broken inputs (the bad-input corpus: tests/test_hostile_*.py) ----------------
#
# Every case of the corpus asserts the same four things (issue 8): exit status 2, exactly one
# line on standard error naming the file, no traceback, and the served tree (tftpboot/,
# pxelinux.cfg/, qlustar/) byte-identical before and after. A sentinel tree outside the site
# proves that nothing outside the site and its build directory is read into an output or changed.

SERVED = ("tftpboot", "pxelinux.cfg", "qlustar")
# Written in place by a build that fails part-way: never served, so not compared.
UNSERVED_TOP = {"kernel", "stage", "manifests", "cache"}


def tree_listing(root: Path) -> dict[str, str]:
    """path -> mode, and content digest or link target, for every entry below `root`."""
    import hashlib
    import stat as st

    out: dict[str, str] = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        s = path.lstat()
        rel = path.relative_to(root).as_posix()
        if st.S_ISLNK(s.st_mode):
            out[rel] = f"link {os.readlink(path)}"
        elif st.S_ISREG(s.st_mode):
            out[rel] = f"{s.st_mode:o} {hashlib.sha256(path.read_bytes()).hexdigest()}"
        else:
            out[rel] = f"{s.st_mode:o}"
    return out


def served_listing(site_root: Path) -> dict[str, str]:
    bootfiles = site_root / "bootfiles"
    return {f"{top}/{k}": v for top in SERVED for k, v in tree_listing(bootfiles / top).items()}


def clone_built_site(template: Path, dest: Path) -> Path:
    """A private copy of a built site, quick: the large trees that builds only replace by rename
    (kernel, module cache, published generations) are hard links to the template's files,
    everything written in place (doit state, manifests, site files) is a real copy."""

    def copy(src: str, dst: str) -> None:
        rel = Path(src).relative_to(template).parts
        linkable = rel[:2] in {
            ("bootfiles", "kernel"),
            ("bootfiles", "cache"),
            ("bootfiles", "qlustar"),
        }
        if linkable:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(template, dest, symlinks=True, copy_function=copy)
    # doit's state names every file by its absolute path: moved to the copy's, the copy's first
    # build checks its inputs instead of rebuilding everything (minutes per test otherwise).
    state = dest / "bootfiles" / DOIT_STATE
    if state.exists():
        text = state.read_text()
        state.write_text(
            text.replace(json.dumps(f"{template}/")[1:-1], json.dumps(f"{dest}/")[1:-1])
        )
    return dest


def make_sentinel(root: Path) -> Path:
    """A tree outside the site that hostile inputs point at: a secret, a directory, a link."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "secret").write_text("SENTINEL-SECRET-d41d8cd9\n")
    (root / "dir").mkdir(exist_ok=True)
    (root / "dir/file").write_text("SENTINEL-FILE\n")
    (root / "link").symlink_to("secret")
    return root


SENTINEL_MARK = b"SENTINEL-"


def assert_refused(
    site_root: Path, *args: str, names: str, sentinel: Path | None = None, lines: int = 1
) -> subprocess.CompletedProcess[str]:
    """Run `qlimage -C site_root ARGS` (default `build`) on a bad input and check the four
    promises: status 2, one stderr line naming `names` (the file), no traceback, nothing served
    changed; with `sentinel`, the sentinel tree is unchanged and no served file holds its text.
    `lines` > 1 is for inputs with several independent defects (every one is reported)."""
    before = served_listing(site_root)
    outside = tree_listing(sentinel) if sentinel else None
    proc = qlimage("-C", str(site_root), *(args or ("build",)), check=False)
    found = [line for line in proc.stderr.splitlines() if line.strip()]
    detail = f"status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr + proc.stdout, detail
    assert len(found) == lines, detail
    assert all(names in line for line in found), detail
    assert served_listing(site_root) == before, "the served tree changed"
    if sentinel is not None:
        assert tree_listing(sentinel) == outside, "the sentinel tree outside the site changed"
        assert_no_sentinel_text(site_root / "bootfiles")
    return proc


def assert_no_sentinel_text(bootfiles: Path) -> None:
    """No output holds the sentinel's text (squashfs images are checked by the caller)."""
    for path in bootfiles.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20:
            assert SENTINEL_MARK not in path.read_bytes(), path


# --- golden files ---------------------------------------------------------------------------

UPDATE_GOLDEN = os.environ.get("QLIMAGE_UPDATE_GOLDEN") == "1"


def check_golden(directory: Path, rendered: dict[str, str]) -> None:
    """Compare every rendered file with directory/<name> (names may hold `/`); with
    QLIMAGE_UPDATE_GOLDEN=1, rewrite the directory from `rendered` first."""
    if UPDATE_GOLDEN:
        shutil.rmtree(directory, ignore_errors=True)
        for name, content in rendered.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(content)
    assert directory.is_dir(), f"no golden files in {directory}; run with QLIMAGE_UPDATE_GOLDEN=1"
    present = sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()
    )
    assert present == sorted(rendered)
    for name, content in rendered.items():
        assert content == (directory / name).read_text(), f"{name} differs from {directory / name}"


BUNDLE_GOLDEN = Path(__file__).resolve().parent / "golden" / "bundle"


def golden_outputs(b: Bundle) -> dict[str, str]:
    """{golden file name: text}: each generated (non-rootfs) file under files/<node path>,
    the symlinks and actions in links.txt and actions.json, and describe()."""
    out: dict[str, str] = {}
    links = []
    for f in b.files:
        if f.origin.startswith("rootfs "):
            continue
        if f.type == "file":
            out["files" + f.path] = f.content.decode()
        elif f.type == "symlink":
            links.append(f"{f.path} -> {f.target}\n")
    out["links.txt"] = "".join(links)
    out["actions.json"] = json.dumps([dict(a) for a in b.actions], indent=2) + "\n"
    out["describe.txt"] = qb.describe(b)
    if not any(f.origin.startswith("rootfs ") for f in b.files):
        # Indented for reviewable diffs; the canonical bytes are its compact form.
        doc = json.loads(qb.bundle_json(b))
        compact = json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n"
        assert compact.encode() == qb.bundle_json(b)
        out["bundle.json"] = json.dumps(doc, sort_keys=True, indent=2) + "\n"
    return out


# --- commands of the network tests --------------------------------------------------------

HEAD = "10.0.2.2"  # the head address of the test sites (and of QEMU's user network)
SH_TIMEOUT = 20.0  # seconds: the longest any `sh` command may take


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=SH_TIMEOUT, check=check)


# Hosts with the time, sssd and nis options (goldens in golden/bundle/beo-09 .. beo-11).
OPTIONS_HOSTS_TOML = """\
[[hosts]]
name = "beo-09"
mac = "52:54:00:12:34:5e"
image = "demo"
networks.boot = "10.0.2.23"
[hosts.options]
time = { servers = ["ntp1.example.org", "10.0.2.3"] }
nis = { domain = "hpc", servers = ["nis1", "10.0.2.4"] }
[hosts.options.sssd]
domain = "example.org"
uris = ["ldaps://ldap1.example.org", "ldaps://ldap2.example.org:636"]
search_base = "dc=example,dc=org"
tls_cacert = "/etc/ssl/certs/site-ca.pem"
access_filter = "(memberOf=cn=hpc,ou=groups,dc=example,dc=org)"
mkhomedir = true

[[hosts]]
name = "beo-10"
mac = "52:54:00:12:34:5f"
image = "demo"
networks.boot = "10.0.2.24"
[hosts.options]
time = { enabled = false }
nis = { domain = "hpc", servers = ["10.0.2.4"] }

[[hosts]]
name = "beo-11"
mac = "52:54:00:12:34:60"
image = "demo"
networks.boot = "10.0.2.25"
[hosts.options]
time = { sync_at_boot = false }
[hosts.options.sssd]
provider = "ad"
domain = "ad.example.org"
uris = ["ldap://dc1.ad.example.org"]
search_base = "dc=ad,dc=example,dc=org"
"""


# --- an NFS chroot for boot tests (test_boot.py, test_chroot_cmd.py) --------------------------
# Appended as a section: helpers.py grows at its end, so these imports stay here.

import contextlib  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402

GANESHA_CONF = """
NFS_CORE_PARAM {{ Protocols = 4; NFS_Port = {port}; Bind_addr = 127.0.0.1;
                 Enable_NLM = false; Enable_RQUOTA = false; }}
NFSV4 {{ Graceless = true; Only_Numeric_Owners = true; }}
EXPORT {{ Export_Id = 101; Path = {path}; Pseudo = /chroot; Access_Type = RO;
          Squash = No_Root_Squash; SecType = sys; Protocols = 4; Transports = TCP;
          FSAL {{ Name = VFS; }} }}
"""


@contextlib.contextmanager
def nfs_server(tree: Path, work: Path, port: int | None = None) -> Iterator[int]:
    """A real NFSv4 server (nfs-ganesha, user space) exporting `tree` as /chroot on loopback:
    QEMU's user network hands the guest's connections to the head address to it. `port`: one
    the caller picked (free_port) and already wrote into a chroot definition."""
    port = port or free_port()
    conf = work / "ganesha.conf"
    conf.write_text(GANESHA_CONF.format(port=port, path=tree))
    log = work / "ganesha.log"
    cmd = ["ganesha.nfsd", "-F", "-f", str(conf), "-L", str(log), "-p", str(work / "pid")]

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    with daemon([*cmd, "-N", "NIV_EVENT"], log, listening, seconds=20):
        yield port


@contextlib.contextmanager
def daemon(
    argv: list[str], log: Path, ready: Callable[[], bool], seconds: float, *, output: bool = False
) -> Iterator[None]:
    """Run the server `argv` for the length of the block, once `ready()` says it serves (within
    `seconds`, or the test fails with its `log`); stopped and reaped afterwards. `output`: its
    standard output and error go to `log` (a server that writes no log file of its own)."""
    with log.open("ab") if output else contextlib.nullcontext() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + seconds
        while not ready():
            text = log.read_text(errors="replace") if log.exists() else ""
            assert proc.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def chroot_node(root: Path, port: int, chroot: str = "base") -> Iterator[None]:
    """A node whose own chroot option names an NFS chroot, for the length of one test. Without
    a definition of `chroot`, one for the server on `port` is written (and removed after);
    an existing one (`qlimage chroot create`) is used as it is."""
    definition = root / f"chroots/{chroot}/chroot.toml"
    written = not definition.exists()
    made_dir = not definition.parent.exists()  # removed after, or it would stay the chroot's name
    if written:
        definition.parent.mkdir(parents=True, exist_ok=True)
        definition.write_text(f'export = "/chroot"\nport = {port}\ndescription = "test chroot"\n')
    nodes = root / "nodes.d/cluster.toml"
    saved = nodes.read_text()
    try:
        nodes.write_text(saved + CHROOT_HOST.replace('"base"', json.dumps(chroot)))
        qlimage("-C", str(root), "build")
        yield
    finally:
        nodes.write_text(saved)
        if written:
            definition.unlink()
        if made_dir:
            definition.parent.rmdir()
        qlimage("-C", str(root), "build")


CHROOT_HOST = (
    '\n[[hosts]]\nname = "chroot-01"\nmac = "52:54:00:aa:00:02"\nimage = "demo"\n'
    'networks.boot = "10.0.2.41"\noptions = { chroot = "base", rootfs = ["tweaks"] }\n'
)


# --- a command run as a user runs it ---------------------------------------------------


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def refused(proc: subprocess.CompletedProcess[str], *names: str) -> str:
    """Status 2, exactly one line on stderr naming `names`, no traceback; returns the line."""
    detail = f"status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr + proc.stdout, detail
    assert len(lines) == 1, detail
    assert all(n in lines[0] for n in names), detail
    return lines[0]


# --- an NTP server for nodes (chronyd on loopback) --------------------------------------------

NTP_SERVER_CONF = """\
bindaddress 127.0.0.1
port 123
allow 127.0.0.1
local stratum 8
cmdport 0
pidfile {work}/chronyd.pid
driftfile {work}/chronyd.drift
"""


def udp_bound(address: str, port: int) -> bool:
    """Whether a UDP socket is bound to `address:port` (IPv4), from /proc/net/udp (which
    prints the address as the host-order, here little-endian, 32-bit number)."""
    want = f"{int.from_bytes(socket.inet_aton(address), 'little'):08X}:{port:04X}"
    lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    return any(line.split()[1] == want for line in lines)


@contextlib.contextmanager
def ntp_server(work: Path) -> Iterator[Path]:
    """A real NTP server on 127.0.0.1:123 (chronyd serving its own clock, `-x`: it never
    touches this machine's clock), where QEMU's user network sends a guest's NTP requests to
    the head address 10.0.2.2. Yields chronyd's log."""
    assert not udp_bound("127.0.0.1", 123), "port 123 on 127.0.0.1 is taken: stop that NTP server"
    conf, log = work / "chronyd.conf", work / "chronyd.log"
    conf.write_text(NTP_SERVER_CONF.format(work=work))
    argv = ["chronyd", "-x", "-d", "-u", "root", "-f", str(conf)]
    with daemon(argv, log, lambda: udp_bound("127.0.0.1", 123), seconds=10, output=True):
        yield log


# --- network namespaces of the serve and multicast tests ----------------------------------

import signal  # noqa: E402


def remove_netns(*names: str) -> None:
    """Kill whatever still runs in each namespace, then delete it (its devices go with it)."""
    for ns in names:
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", ns, check=False)


def wait_for_http(netns: str, url: str, server: subprocess.Popen[bytes], seconds: float) -> None:
    """Until `url` answers (any status) from inside `netns`; fails at once if `server` exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited early ({server.returncode})"
        probe = subprocess.run(
            ["ip", "netns", "exec", netns, "curl", "-s", "-o", "/dev/null", "-m", "2", url],
            capture_output=True, timeout=10,
        )  # fmt: skip
        if probe.returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {seconds:.0f} s")


def mcastd_sessions(log: str) -> list[dict[str, str]]:
    """The session lines ql-mcastd logged (`ql-mcastd: session 1 image demo ...`) as dicts."""
    out = []
    for line in log.splitlines():
        if line.startswith("ql-mcastd: session "):
            words = line.split()[1:]
            out.append(dict(zip(words[::2], words[1::2], strict=False)))
    return out


# --- GRUB over HTTP in QEMU (test_boot_uefi.py, bench/bench_boot.py) ---------------------------

import functools  # noqa: E402
import http.server  # noqa: E402
import threading  # noqa: E402
from typing import Any  # noqa: E402

# Debian's signed GRUB 2.06 fetches over HTTP from port 80 only. This private address of QEMU's
# user network gets a guest forward of its port 80 to a server on a free loopback port, so no
# test binds (or needs) the host's port 80.
GRUB_HTTP_SERVER = "10.0.2.100"


class AccessLogHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory like the head's nginx does the qlustar tree, and appends one record
    per GET to the server's `access` list: uri, status, bytes sent, client's User-Agent."""

    def do_GET(self) -> None:
        self.sent = 0
        self.status = 0
        super().do_GET()
        server: Any = self.server
        server.access.append(
            {
                "uri": self.path,
                "status": self.status,
                "bytes": self.sent,
                "agent": self.headers.get("User-Agent", ""),
                "time": time.monotonic(),
            }
        )

    def send_response(self, code: int, message: str | None = None) -> None:
        self.status = code
        super().send_response(code, message)

    def copyfile(self, source: Any, outputfile: Any) -> None:
        while chunk := source.read(1 << 16):
            outputfile.write(chunk)
            self.sent += len(chunk)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def access_logged_http(root: Path) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """An HTTP server for `root` on a free loopback port: yields (port, access records)."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(AccessLogHandler, directory=str(root))
    )
    server.access = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], server.access  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def port80_guestfwd(port: int) -> str:
    """QEMU's guest forward of GRUB_HTTP_SERVER:80 to 127.0.0.1:`port`: QEMU runs socat for
    each connection the guest opens (no comma: QEMU's option syntax would split there)."""
    return f"tcp:{GRUB_HTTP_SERVER}:80-cmd:socat - TCP:127.0.0.1:{port}"


# --- the edge site: every per-host branch of the head configs and the SSH host files ---------
#
# The bundle site plus hosts at the edges (issue 13 builds their lines in Python, not in
# Jinja loops): an iPXE boot config, hostname overrides and aliases on several networks, a
# network with a domain suffix, hosts without an address on some networks, repeated names,
# boundary addresses, upper-case MACs, names sorting before and after the others, admin networks
# and DNS servers. Golden files: tests/golden/head-edge/ and tests/golden/ssh-edge/.

EDGE_HOSTS_TOML = f"""
[[hosts]]
name = "a0"
mac = "52:54:00:AB:CD:EF"
bootconfig = "netboot"
networks.boot = {{ address = "10.0.2.1", hostname = "a0-boot", aliases = ["front", "f-1"] }}
networks.ib = {{ address = "10.10.255.254", aliases = ["a0"] }}
ssh_host_keys = ["{KEY_ED25519.rsplit(" ", 1)[0]}", "{KEY_ECDSA.rsplit(" ", 1)[0]}"]

[[hosts]]
name = "beo-100"
mac = "52:54:00:12:35:00"
bootconfig = "netboot"
networks.boot = "10.0.2.254"
networks.data = {{ address = "192.168.0.1", hostname = "store-100" }}
networks.ipmi = {{ address = "10.1.0.100", hostname = "beo-100" }}

[[hosts]]
name = "beo-09"
mac = "52:54:00:12:35:09"
image = "demo"
networks.boot = {{ address = "10.0.2.9", hostname = "node9" }}
networks.ib = {{ address = "10.10.0.9", hostname = "node9", aliases = ["beo-09"] }}
ssh_host_keys = ["{KEY_ECDSA.rsplit(" ", 1)[0]}"]

[[hosts]]
name = "zz-last"
mac = "52:54:00:12:35:99"
image = "rhel"
networks.boot = {{ address = "10.0.2.199", aliases = ["z"] }}
"""

EDGE_SITE_SETTINGS = (
    'admin_networks = ["192.168.7.0/24", "10.9.0.7/32", "0.0.0.0/0"]\n'
    'dns = ["10.0.2.53", "8.8.8.8"]\n'
)


def make_edge_site(root: Path) -> Path:
    """The bundle site with EDGE_HOSTS_TOML, an iPXE boot config, the ib network's domain
    suffix `ib.cluster.` and EDGE_SITE_SETTINGS."""
    make_site(root, extra_hosts=EDGE_HOSTS_TOML)
    edit(root / "site.toml", "mtu = 2044\n", 'mtu = 2044\nsuffix = "ib.cluster."\n')
    edit(root / "site.toml", "http_port = 8470\n", f"http_port = 8470\n{EDGE_SITE_SETTINGS}")
    ipxe = '[bootconfigs.netboot]\nimage = "demo"\nloader = "ipxe"\n\n'
    edit(root / "site.toml", "[bootconfigs.rhel]", f"{ipxe}[bootconfigs.rhel]")
    return root
