"""The apt hook: real apt-get and dpkg install module packages from a local file repository, and
the hook feeds the pool and rebuilds exactly the images that use the new version.

apt runs with APT_CONFIG pointing at a private configuration (Dir::Etc, Dir::State, Dir::Cache
and Dir::Log in tmp_path): `-o Dir::Etc::parts=...` on the command line comes too late, apt has
read the host's apt.conf.d by then. dpkg itself is the host's: the test package (payload under
/usr/share/qlimage-apttest/ only) is really installed and purged again at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlimage.commands import apt_hook
from qlimage.errors import QlimageError
from qlimage.layout import Layout
from qlimage.pool import apthook
from qlimage.pool.debpack import build_deb
from qlimage.site import load_site
from qlimage.trees import manifest

from helpers import QLIMAGE, REPO, qlimage

pytestmark = pytest.mark.tools

EPOCH = 1_700_000_000
CORE = "qlustar-module-core-bookworm"
APTTEST = "qlustar-module-apttest-bookworm"
ROOT_HASH = "$6$apthook$Vn3lmhRLPnRAYFVkfyWp4.z7tZRzTnFW4kMMyYV5Cq3Q0Ekle1rAzVp6D/xc2F/wXVx1"

SITE_TOML = """\
[site]
name = "apthook"
source_date_epoch = 1700000000

[head]
address = "10.0.2.2"
shadow = "{shadow}"

[paths]
cache = "cache"

[squashfs]
compressor = "gzip"

[networks.boot]
cidr = "10.0.2.0/24"
gateway = "10.0.2.2"
boot = true
"""

IMAGES = {
    "tracking": ("11", ["core", "apttest"]),
    "pinned": ("11.0.0", ["core", "apttest"]),
    "other": ("11", ["core"]),
}


def make_module(directory: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    tree = directory.parent / f"{directory.name}.trees" / f"{package}_{version}"
    tree.mkdir(parents=True)
    for rel, content in files.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(0o755 if rel.startswith("sbin/") else 0o644)
    control = {
        "Package": package,
        "Version": version,
        "Architecture": "amd64",
        "Maintainer": "Qlustar Team <admin@example.org>",
        "Description": f"{package} (qlimage apt hook test)",
    }
    name = apthook.pool_file_name(package, version, "amd64")
    return build_deb(tree, control, directory / name, source_date_epoch=EPOCH)


def apttest_deb(directory: Path, version: str) -> Path:
    """Harmless when dpkg installs it on the host: two files under /usr/share only."""
    return make_module(
        directory,
        APTTEST,
        version,
        {
            "usr/share/qlimage-apttest/VERSION": f"{version}\n".encode(),
            "usr/share/qlimage-apttest/README": b"qlimage apt hook test package\n",
        },
    )


@dataclass
class HookSite:
    root: Path
    debs: Path  # apttest .debs, not yet anywhere apt or the pool sees them

    @property
    def pool(self) -> Path:
        return self.root / "modules/pool"

    @property
    def bootfiles(self) -> Path:
        return self.root / "bootfiles"

    @property
    def marker(self) -> Path:
        return Layout(self.bootfiles).apt_hook_marker

    def image_root(self, image: str) -> Path:
        return self.bootfiles / "qlustar/images" / image

    def current(self, image: str) -> str | None:
        link = self.image_root(image) / "current"
        return os.readlink(link) if link.is_symlink() else None

    def history(self, image: str) -> list[str]:
        path = self.image_root(image) / "history"
        return path.read_text().split() if path.exists() else []

    def versions(self, image: str) -> dict[str, str]:
        data = json.loads((self.image_root(image) / "current/modules.json").read_text())
        return {m["module"]: m["version"] for m in data["modules"]}


@pytest.fixture
def site(tmp_path: Path) -> HookSite:
    root = tmp_path / "site"
    (root / "images.d").mkdir(parents=True)
    shadow = tmp_path / "shadow"
    shadow.write_text(f"root:{ROOT_HASH}:19000:0:99999:7:::\n")
    shadow.chmod(0o600)
    (root / "site.toml").write_text(SITE_TOML.format(shadow=shadow))
    for name, (version, modules) in IMAGES.items():
        (root / f"images.d/{name}.toml").write_text(
            f'name = "{name}"\nflavor = "bookworm"\nversion = "{version}"\n'
            f"modules = {json.dumps(modules)}\n"
        )
    pool = root / "modules/pool"
    pool.mkdir(parents=True)
    make_module(
        pool,
        CORE,
        "11.0.0",
        {
            "sbin/init.qlustar": b"#!/bin/sh\nexec /sbin/init\n",
            "etc/qlustar/core-version": b"11.0.0\n",
            "etc/group": b"root:x:0:\nshadow:x:42:\n",
        },
    )
    debs = tmp_path / "debs"
    debs.mkdir()
    for version in ("11.0.0", "11.0.1"):
        apttest_deb(debs, version)
    return HookSite(root, debs)


# --- in-process: the hook's pieces, through the command's own parser ---------------------------


def local_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlimage")
    p.add_argument("-C", "--site", default=".")
    sub = p.add_subparsers(dest="command", required=True)
    apt_hook.register(sub)
    return p


def hook(
    site: HookSite,
    *argv: str,
    stdin: str = "",
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[int, str, str]:
    args = local_parser().parse_args(["-C", str(site.root), "apt-hook", *argv])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    status = args.func(load_site(args.site), args)
    out, err = capsys.readouterr()
    return status, out, err


def pool_listing(site: HookSite) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(site.pool.iterdir())}


def test_hook_input_formats() -> None:
    assert apthook.hook_input_paths(["/a/x.deb\n", "\n", "/b/y z.deb\n"]) == [
        Path("/a/x.deb"),
        Path("/b/y z.deb"),
    ]
    v2 = [
        "VERSION 2",
        "APT::Architecture=amd64",
        "DPkg::Tools::Options::hook::Version=2",
        "",
        f"{APTTEST} - < 11.0.0 /var/cache/apt/archives/{APTTEST}_11.0.0_amd64.deb",
        "hello 1.0 = 1.0 **CONFIGURE**",
        "gone 1.0 > - **REMOVE**",
    ]
    assert apthook.hook_input_paths(v2) == [
        Path(f"/var/cache/apt/archives/{APTTEST}_11.0.0_amd64.deb")
    ]
    v3 = [
        "VERSION 3",
        "APT::Architecture=amd64",
        "",
        f"{APTTEST} 11.0.0 amd64 none < 11.0.1 amd64 none /r/{APTTEST}_11.0.1_amd64.deb",
        "hello 1.0 amd64 same = 1.0 amd64 same **CONFIGURE**",
    ]
    assert apthook.hook_input_paths(v3) == [Path(f"/r/{APTTEST}_11.0.1_amd64.deb")]
    assert apthook.hook_input_paths([]) == []


def test_collect_ignores_non_module_packages(
    site: HookSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    tree = tmp_path / "hello-tree"
    (tree / "usr/share/hello").mkdir(parents=True)
    (tree / "usr/share/hello/x").write_text("x\n")
    control = {
        "Package": "hello-apthook",
        "Version": "1.0",
        "Architecture": "all",
        "Maintainer": "T <t@example.org>",
        "Description": "not a module",
    }
    hello = build_deb(tree, control, other / "hello-apthook_1.0_all.deb", source_date_epoch=EPOCH)
    junk = other / "junk_1.0_all.deb"
    junk.write_bytes(b"not a deb at all")  # not a module's name: never even opened
    before = pool_listing(site)
    status, out, err = hook(
        site, "collect", stdin=f"{hello}\n{junk}\n", monkeypatch=monkeypatch, capsys=capsys
    )
    assert (status, out, err) == (0, "", "")
    assert pool_listing(site) == before
    assert not site.marker.exists()
    # ... also in apt's version 3 format, where removals and configures have no file.
    v3 = f"VERSION 3\nAPT::Architecture=amd64\n\nhello-apthook - - none < 1.0 all none {hello}\n"
    v3 += "gone 1.0 amd64 none > - - none **REMOVE**\n"
    assert hook(site, "collect", stdin=v3, monkeypatch=monkeypatch, capsys=capsys) == (0, "", "")
    assert pool_listing(site) == before


def test_collect_copies_modules_and_survives_broken_files(
    site: HookSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    broken = tmp_path / "incoming" / f"{APTTEST}_9.9_amd64.deb"
    broken.parent.mkdir()
    broken.write_bytes(b"!<arch>\ntruncated")
    missing = tmp_path / "incoming" / f"{APTTEST}_9.8_amd64.deb"
    good = site.debs / f"{APTTEST}_11.0.0_amd64.deb"
    stdin = f"VERSION 2\nX=1\n\n{APTTEST} - < 9.9 {broken}\n{APTTEST} - < 9.8 {missing}\n"
    stdin += f"{APTTEST} - < 11.0.0 {good}\n"
    status, out, err = hook(site, "collect", stdin=stdin, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0 and out == ""
    lines = err.splitlines()
    assert len(lines) == 3, err
    assert str(broken) in lines[0] and "not a readable .deb" in lines[0]
    assert str(missing) in lines[1] and "No such file" in lines[1]
    assert lines[2] == (
        f"qlimage apt-hook: pool {site.pool}: added apttest 11.0.0 (bookworm); "
        "2 package(s) skipped; images are rebuilt after dpkg"
    )
    copied = site.pool / good.name
    assert copied.read_bytes() == good.read_bytes()
    assert copied.stat().st_mode & 0o777 == 0o644
    assert APTTEST in site.marker.read_text()
    assert not [p for p in site.pool.iterdir() if p.name.startswith(".")]  # no temporaries

    # The same file again: nothing changes, not even the marker.
    site.marker.unlink()
    mtime = copied.stat().st_mtime_ns
    status, _, err = hook(site, "collect", str(good), monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0
    assert err == f"qlimage apt-hook: pool {site.pool}: already there: apttest 11.0.0 (bookworm)\n"
    assert copied.stat().st_mtime_ns == mtime and not site.marker.exists()

    # A rebuilt package under the same version replaces the pool's copy (one rename)...
    rebuilt_dir = tmp_path / "rebuilt"
    rebuilt_dir.mkdir()
    rebuilt = make_module(rebuilt_dir, APTTEST, "11.0.0", {"usr/share/qlimage-apttest/X": b"2"})
    inode = copied.stat().st_ino
    status, _, err = hook(site, "collect", str(rebuilt), monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0 and "added apttest 11.0.0" in err
    assert copied.read_bytes() == rebuilt.read_bytes() and copied.stat().st_ino != inode
    assert site.marker.exists()

    # ... but a second file for one version under another name is refused, not doubled.
    site.marker.unlink()
    (site.pool / f"{APTTEST}_11.0.0_amd64.deb").rename(site.pool / "apttest-local.deb")
    status, _, err = hook(site, "collect", str(good), monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0
    assert "already has qlustar-module-apttest-bookworm 11.0.0 as apttest-local.deb" in err
    assert not (site.pool / good.name).exists() and not site.marker.exists()


def test_collect_never_fails_when_the_pool_is_unusable(
    site: HookSite, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    shutil.rmtree(site.pool)
    site.pool.write_text("a file where the pool directory should be")
    good = site.debs / f"{APTTEST}_11.0.0_amd64.deb"
    status, out, err = hook(
        site, "collect", stdin=f"{good}\n", monkeypatch=monkeypatch, capsys=capsys
    )
    assert status == 0 and out == ""
    assert "cannot use the pool" in err
    assert not site.marker.exists()


def apt_config_dump(conf_dir: Path, tmp_path: Path) -> str:
    """What apt makes of a parts directory holding only our snippet."""
    cfg = tmp_path / "apt-config-only.conf"
    cfg.write_text(f'Dir::Etc::parts "{conf_dir}";\nDir::Etc::main "/dev/null";\n')
    proc = subprocess.run(
        ["apt-config", "dump"],
        env=dict(os.environ, APT_CONFIG=str(cfg)),
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


def test_install_and_uninstall_the_snippet(
    site: HookSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    conf = tmp_path / "apt.conf.d"
    conf.mkdir()
    snippet = conf / apthook.SNIPPET
    snippet.write_text("// an older snippet\n")
    old_inode = snippet.stat().st_ino
    status, out, _ = hook(
        site, "install", "--apt-conf-dir", str(conf), monkeypatch=monkeypatch, capsys=capsys
    )
    assert status == 0 and str(snippet) in out
    assert sorted(p.name for p in conf.iterdir()) == [apthook.SNIPPET]  # no temporaries left
    assert snippet.stat().st_ino != old_inode  # renamed into place, never written in place
    assert snippet.stat().st_mode & 0o777 == 0o644
    text = snippet.read_text()
    assert text.startswith(apthook.HEADER + "\n")
    dump = apt_config_dump(conf, tmp_path)
    hooks = dict(re.findall(r'^(DPkg::(?:Pre-Install-Pkgs|Post-Invoke)):: "(.*)";$', dump, re.M))
    root = str(site.root.resolve())
    python = re.escape(sys.executable)
    assert re.fullmatch(
        rf"(/usr/bin/env PYTHONPATH=\S+ )?{python} -P -m qlimage -C {re.escape(root)} "
        r"apt-hook collect \|\| true",
        hooks["DPkg::Pre-Install-Pkgs"],
    ), hooks
    assert hooks["DPkg::Post-Invoke"] == hooks["DPkg::Pre-Install-Pkgs"].replace(
        "collect", "rebuild"
    )

    status, out, _ = hook(
        site, "uninstall", "--apt-conf-dir", str(conf), monkeypatch=monkeypatch, capsys=capsys
    )
    assert status == 0 and f"removed {snippet}" in out and list(conf.iterdir()) == []
    status, out, _ = hook(
        site, "uninstall", "--apt-conf-dir", str(conf), monkeypatch=monkeypatch, capsys=capsys
    )
    assert status == 0 and "nothing to remove" in out

    snippet.write_text("// someone else's\n")
    with pytest.raises(QlimageError, match="not written by qlimage"):
        hook(site, "uninstall", "--apt-conf-dir", str(conf), monkeypatch=monkeypatch, capsys=capsys)
    assert snippet.exists()
    with pytest.raises(QlimageError, match="no such directory"):
        hook(
            site,
            "install",
            "--apt-conf-dir",
            str(tmp_path / "missing"),
            monkeypatch=monkeypatch,
            capsys=capsys,
        )
    assert not (tmp_path / "missing").exists()


def test_rebuild_without_marker_does_nothing(
    site: HookSite, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert hook(site, "rebuild", monkeypatch=monkeypatch, capsys=capsys) == (0, "", "")
    assert not site.bootfiles.exists()  # no lock taken, no doit database, nothing built


def test_rebuild_that_fails_keeps_the_change_pending(
    site: HookSite, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    site.bootfiles.mkdir()
    site.marker.write_text("pending\n")  # but apttest, which two images need, is not in the pool
    with pytest.raises(
        QlimageError,
        match=r"apt-hook rebuild: images.d/\S+: \.modules\[1\]: "
        r"module apttest 11\S* \(bookworm\): not in the pool",
    ):
        hook(site, "rebuild", monkeypatch=monkeypatch, capsys=capsys)
    assert site.marker.read_text() == "pending\n"


# --- end to end: real apt-get, real dpkg, the real `qlimage` command -------------------------


def needs_root_apt() -> str | None:
    if os.geteuid() != 0:
        return "installs a package with dpkg: needs root"
    for tool in ("apt-get", "dpkg", "dpkg-scanpackages", "mksquashfs"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@dataclass
class Apt:
    """apt-get with a private configuration, state, cache and log; the host's dpkg."""

    root: Path
    repo: Path
    parts: Path  # Dir::Etc::parts: holds our 80qlimage only
    env: dict[str, str]

    def publish(self, *debs: Path) -> None:
        for deb in debs:
            shutil.copy(deb, self.repo / deb.name)
        with (self.repo / "Packages").open("w") as out:
            subprocess.run(
                ["dpkg-scanpackages", "--multiversion", ".", "/dev/null"],
                cwd=self.repo,
                stdout=out,
                stderr=subprocess.DEVNULL,
                check=True,
            )

    def get(self, *args: str) -> str:
        proc = subprocess.run(
            ["apt-get", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, f"apt-get {' '.join(args)} failed:\n{proc.stdout}"
        return proc.stdout


@pytest.fixture
def apt(tmp_path: Path) -> Apt:
    root = tmp_path / "apt"
    etc = root / "etc"
    for d in ("apt.conf.d", "sources.list.d", "preferences.d", "trusted.gpg.d"):
        (etc / d).mkdir(parents=True)
    for d in ("state", "cache", "log"):
        (root / d).mkdir()
    repo = tmp_path / "repo"
    repo.mkdir()
    (etc / "sources.list").write_text(f"deb [trusted=yes] file:{repo} ./\n")
    config = root / "apt.conf"
    config.write_text(
        f'Dir::Etc "{etc}";\n'
        'Dir::Etc::main "/dev/null";\n'  # the host's apt.conf (the parts are ours via Dir::Etc)
        f'Dir::State "{root}/state";\n'  # lists and extended_states; dpkg's status stays absolute
        f'Dir::Cache "{root}/cache";\n'
        f'Dir::Log "{root}/log";\n'
        'APT::Get::List-Cleanup "0";\n'
        'APT::Sandbox::User "root";\n'  # the _apt user cannot read pytest's 0700 tmp_path
        'APT::Install-Recommends "0";\n'
        'Acquire::Languages "none";\n'
        'DPkg::Lock::Timeout "300";\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the hook finds qlimage
    env.update(APT_CONFIG=str(config), DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    return Apt(root, repo, etc / "apt.conf.d", env)


def purge_apttest() -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dpkg", "--purge", APTTEST], capture_output=True, text=True)


@pytest.fixture
def apttest_purged() -> Iterator[None]:
    """The test package is gone afterwards, however the test ended; /etc/apt is untouched."""
    etc_apt = manifest(Path("/etc/apt"))
    purge_apttest()
    yield
    proc = purge_apttest()
    assert proc.returncode == 0, proc.stderr
    assert not Path("/usr/share/qlimage-apttest").exists()
    assert installed_version(APTTEST) == ""
    assert manifest(Path("/etc/apt")) == etc_apt


def installed_version(package: str) -> str:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status} ${Version}", package], capture_output=True, text=True
    )
    return proc.stdout


def rebuilt_images(output: str) -> tuple[list[str], list[str]]:
    """The one `images rebuilt` line of an apt run (Post-Invoke may run more than once)."""
    lines = re.findall(r"^qlimage apt-hook: images rebuilt: (.*); unchanged: (.*)$", output, re.M)
    assert len(lines) == 1, output
    rebuilt, unchanged = lines[0]
    return (
        [] if rebuilt == "none" else rebuilt.split(", "),
        [] if unchanged == "none" else unchanged.split(", "),
    )


def test_apt_installs_feed_the_pool_and_rebuild_the_images(
    site: HookSite, apt: Apt, apttest_purged: None
) -> None:
    missing = needs_root_apt()
    assert missing is None, f"{missing} (the test command installs it: scripts/setup.sh)"
    out = qlimage("-C", str(site.root), "apt-hook", "install", "--apt-conf-dir", str(apt.parts))
    assert str(apt.parts / apthook.SNIPPET) in out.stdout
    assert sorted(p.name for p in apt.parts.iterdir()) == [apthook.SNIPPET]
    assert QLIMAGE[0] in (apt.parts / apthook.SNIPPET).read_text()

    # 1. apt installs apttest 11.0.0: the hook puts it in the pool and builds all three images.
    v0, v1 = (site.debs / apthook.pool_file_name(APTTEST, v, "amd64") for v in ("11.0.0", "11.0.1"))
    apt.publish(v0)
    apt.get("update")
    output = apt.get("install", "-y", APTTEST)
    assert installed_version(APTTEST) == "install ok installed 11.0.0"
    assert f"qlimage apt-hook: pool {site.pool}: added apttest 11.0.0 (bookworm)" in output
    assert (site.pool / v0.name).read_bytes() == v0.read_bytes()
    assert rebuilt_images(output) == (["other", "pinned", "tracking"], [])
    assert not site.marker.exists()
    first = {image: site.current(image) for image in IMAGES}
    for image in IMAGES:
        assert first[image] is not None and site.history(image) == [first[image]]
        assert (site.image_root(image) / f"current/{image}.img").is_file()
    assert site.versions("tracking") == {"core": "11.0.0", "apttest": "11.0.0"}
    assert site.versions("pinned") == {"core": "11.0.0", "apttest": "11.0.0"}
    assert site.versions("other") == {"core": "11.0.0"}

    # 2. apt upgrades to 11.0.1: only the image tracking "11" gets a new generation.
    apt.publish(v1)
    apt.get("update")
    output = apt.get("install", "-y", "--only-upgrade", APTTEST)
    assert installed_version(APTTEST) == "install ok installed 11.0.1"
    assert f"qlimage apt-hook: pool {site.pool}: added apttest 11.0.1 (bookworm)" in output
    assert (site.pool / v1.name).read_bytes() == v1.read_bytes()
    assert rebuilt_images(output) == (["tracking"], ["other", "pinned"])
    assert not site.marker.exists()
    assert site.current("tracking") not in (None, first["tracking"])
    assert site.history("tracking") == [first["tracking"], site.current("tracking")]
    for image in ("pinned", "other"):
        assert site.current(image) == first[image]
        assert site.history(image) == [first[image]]
    assert site.versions("tracking") == {"core": "11.0.0", "apttest": "11.0.1"}
    assert site.versions("pinned") == {"core": "11.0.0", "apttest": "11.0.0"}

    # The real command: no marker, no work; a broken .deb is reported but never fails apt.
    proc = qlimage("-C", str(site.root), "apt-hook", "rebuild")
    assert (proc.stdout, proc.stderr) == ("", "")
    broken = site.root / f"{APTTEST}_12.0.0_amd64.deb"
    broken.write_bytes(b"garbage")
    proc = subprocess.run(
        [*QLIMAGE, "-C", str(site.root), "apt-hook", "collect"],
        input=f"{broken}\n",
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"qlimage apt-hook collect: {broken}: not a readable .deb package" in proc.stderr
    assert not site.marker.exists()

    out = qlimage("-C", str(site.root), "apt-hook", "uninstall", "--apt-conf-dir", str(apt.parts))
    assert list(apt.parts.iterdir()) == []
