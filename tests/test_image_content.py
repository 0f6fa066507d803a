"""What ends up inside an image: changelogs across a module bump, the root password rules,
overlays with owners and whiteouts, and the node runner."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
from pathlib import Path

import pytest

from qlimage.pool.debpack import build_deb

from helpers import qlimage, write_site

pytestmark = [pytest.mark.tools]

HEAD_HASH = (  # `openssl passwd -6 -salt headsalt secret`
    "$6$headsalt$FjGaICgO2A1ZVXQm4eoYBgH.nBgK1O1jVj8GoBIS6eqL3vQbK/GQ6XfkDTGwzIwjL98yjPuL9NlE3GzNbAsd./"
)
IMAGE_HASH = "$y$j9T$imagesalt$IMAGEHASHimagehashIMAGEHASHimagehashIMAGEHA"


def module(pool: Path, name: str, version: str, files: dict[str, str], packages: str) -> None:
    tree = pool.parent / f"tree-{name}-{version}"
    files = {**files, f"usr/share/qlustar/modules/{name}.packages": packages}
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    if name == "core":
        doc = tree / "usr/share/doc/qlustar-module-core-bookworm/changelog.Debian.gz"
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_bytes(
            gzip.compress(
                f"qlustar-module-core-bookworm ({version}) bookworm; urgency=medium\n\n"
                f"  * Core {version} for the test.\n\n"
                " -- T <t@example.org>  Tue, 14 Nov 2023 22:13:20 +0000\n".encode()
            )
        )
    package = f"qlustar-module-{name}-bookworm"
    build_deb(
        tree,
        {
            "Package": package,
            "Version": version,
            "Architecture": "amd64",
            "Maintainer": "t <t@example.org>",
            "Description": f"test module {name}",
        },
        pool / f"{package}_{version}_amd64.deb",
        source_date_epoch=1700000000,
    )


def unpack(site: Path, image: str, dest: Path) -> Path:
    img = site / f"bootfiles/qlustar/images/{image}/current/{image}.img"
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(dest), str(img)], check=True)
    return dest


def doc(root: Path, name: str) -> str:
    return gzip.decompress((root / "usr/share/doc/qlustar-image" / name).read_bytes()).decode()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = write_site(tmp_path / "site")
    shutil_rm(root / "modules/core")  # local modules only: no network
    (root / "images.d/demo.toml").write_text(
        'name = "demo"\nflavor = "bookworm"\nversion = "11"\nmodules = ["core", "extra"]\n'
    )
    shadow = root / "head-shadow"
    shadow.write_text(f"root:{HEAD_HASH}:19000:0:99999:7:::\ndaemon:*:19000::::::\n")
    os.chmod(shadow, 0o600)
    with (root / "site.toml").open("a") as f:
        f.write("")
    text = (root / "site.toml").read_text().replace("[head]\n", '[head]\nshadow = "head-shadow"\n')
    (root / "site.toml").write_text(text)
    pool = root / "modules/pool"
    pool.mkdir(parents=True)
    module(
        pool,
        "core",
        "11.0.0",
        {
            "sbin/init.qlustar": "#!/bin/sh\n",
            "etc/group": "root:x:0:\nshadow:x:42:\ndaemon:x:1:\n",
            "etc/shadow": "root:*:19000:0:99999:7:::\ndaemon:*:19000::::::\n",
            "usr/share/unwanted": "the site removes this\n",
        },
        "busybox-static 1:1.35.0-4\n",
    )
    module(
        pool,
        "extra",
        "11.0.0",
        {"usr/share/extra/a": "a1\n", "usr/share/extra/b": "b\n"},
        "liba 1.0\nlibb 2.0\nlibd 3.0\n",
    )
    return root


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def build_images(site: Path) -> str:
    return qlimage("-C", str(site), "build", "squashfs").stdout


def test_changelogs_after_a_module_bump(site: Path, tmp_path: Path) -> None:
    build_images(site)
    first = unpack(site, "demo", tmp_path / "first")
    assert "first build of this image" in doc(first, "extra.contents.changelog.gz")
    assert "first build of this image" in doc(first, "extra.packages.changelog.gz")
    assert doc(first, "extra.packages.version.gz") == "liba 1.0\nlibb 2.0\nlibd 3.0\n"
    assert "Core 11.0.0 for the test." in doc(first, "core.changelog.gz")
    # gzip headers carry no time or name: the same text always gives the same bytes
    raw = (first / "usr/share/doc/qlustar-image/extra.contents.changelog.gz").read_bytes()
    assert raw[4:8] == b"\0\0\0\0" and not raw[3] & 0x08

    module(
        site / "modules/pool",
        "extra",
        "11.0.1",
        {"usr/share/extra/a": "a2\n", "usr/share/extra/c": "c\n"},
        "liba 1.1\nlibc 1.0\nlibd 2.9\n",
    )
    build_images(site)
    second = unpack(site, "demo", tmp_path / "second")
    contents = doc(second, "extra.contents.changelog.gz")
    assert "extra module 11.0.1: contents compared with 11.0.0" in contents
    assert "added    /usr/share/extra/c" in contents
    assert "removed  /usr/share/extra/b" in contents
    assert "changed  /usr/share/extra/a" in contents
    assert "usr/share/extra/version" not in contents
    packages = doc(second, "extra.packages.changelog.gz")
    assert "upgraded    liba 1.0 -> 1.1" in packages
    assert "removed     libb 2.0" in packages
    assert "added       libc 1.0" in packages
    assert "downgraded  libd 3.0 -> 2.9" in packages
    core = doc(second, "core.contents.changelog.gz").splitlines()  # unchanged: nothing else
    assert core[0].endswith(": contents compared with " + core[0].split()[2].rstrip(":"))
    assert core[1:] == ["no files added, removed or changed"]
    history = (site / "bootfiles/qlustar/images/demo/history").read_text().split()
    assert len(history) == 2

    # An admin who does not like the new image goes back to the previous generation.
    out = qlimage("-C", str(site), "rollback", "demo").stdout
    assert f"generation {history[0]} is current again" in out
    current = site / "bootfiles/qlustar/images/demo/current"
    assert current.readlink().as_posix() == history[0]
    proc = qlimage("-C", str(site), "rollback", "demo", check=False)
    assert proc.returncode == 2 and "no previous generation" in proc.stderr


def test_preview_lists_files_and_diffs(site: Path, tmp_path: Path) -> None:
    out = qlimage("-C", str(site), "preview", "beo-01").stdout
    assert "0600 root:root /root/.ssh/authorized_keys" in out
    assert "0640 daemon:daemon /etc/qlustar/secret" in out
    assert "/lib/qlustar/init.d/10-first" in out
    qlimage("-C", str(site), "build", "bundle")
    published = site / "bootfiles/qlustar/nodes/52-54-00-12-34-56/bundle.json"
    old = tmp_path / "old.json"
    old.write_bytes(published.read_bytes())
    (site / "rootfs/tweaks/etc/qlustar/secret").write_text("rotated\n")
    diff = qlimage("-C", str(site), "preview", "beo-01", "--previous", str(old)).stdout
    assert "/etc/qlustar/secret" in diff and "+rotated" in diff
    qlimage("-C", str(site), "build", "bundle")
    same = qlimage("-C", str(site), "preview", "beo-01", "--previous", str(published)).stdout
    assert same.strip() == "no change"  # preview and the published bundle are one render


def test_root_password_rules(site: Path, tmp_path: Path) -> None:
    build_images(site)
    root = unpack(site, "demo", tmp_path / "img")
    st = (root / "etc/shadow").lstat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (0, 42)
    assert (root / "etc/shadow").read_text().splitlines()[0].startswith(f"root:{HEAD_HASH}:")
    # The hash appears in no other output, state file, manifest or log; the staged tree (the
    # image before packing) holds it only in its 0640 /etc/shadow.
    staged = site / "bootfiles/stage/demo/etc/shadow"
    assert stat.S_IMODE(staged.stat().st_mode) == 0o640
    for path in (site / "bootfiles").rglob("*"):
        if path.is_file() and not path.name.endswith(".img") and path != staged:
            assert HEAD_HASH.encode() not in path.read_bytes(), path

    own = site / "images.d/demo.rootpw"
    own.write_text(IMAGE_HASH + "\n")
    os.chmod(own, 0o644)
    proc = qlimage("-C", str(site), "build", "squashfs", check=False)
    assert proc.returncode == 2
    assert "demo.rootpw: mode 0644 exposes the root password hash; expected 0600" in proc.stderr
    assert "Traceback" not in proc.stderr
    os.chmod(own, 0o600)
    out = build_images(site)
    assert ".  stage:demo" in out  # a new hash rebuilds the image
    root = unpack(site, "demo", tmp_path / "img2")
    assert (root / "etc/shadow").read_text().splitlines()[0].startswith(f"root:{IMAGE_HASH}:")


def test_overlays_owners_links_and_whiteouts(site: Path, tmp_path: Path) -> None:
    common = site / "overlays/common/copy"
    (common / "etc/ssh").mkdir(parents=True)
    (common / "etc/ssh/ssh_config").write_text("common\n")
    (common / "etc/motd").write_text("common motd\n")
    secret = common / "etc/daemon.conf"
    secret.write_text("for daemon\n")
    os.chown(secret, 1, 1)
    os.chmod(secret, 0o640)
    tool = common / "usr/local/bin/tool"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    os.chmod(tool, 0o4755)
    os.symlink("/etc/motd", common / "etc/issue")
    (site / "overlays/common/remove").write_text(
        "# drop what a module ships\n/usr/share/unwanted\n"
    )
    (site / "overlays/demo/copy/etc").mkdir(parents=True)
    (site / "overlays/demo/copy/etc/motd").write_text("demo motd\n")  # image beats common
    build_images(site)
    root = unpack(site, "demo", tmp_path / "img")
    assert (root / "etc/motd").read_text() == "demo motd\n"
    assert (root / "etc/ssh/ssh_config").read_text() == "common\n"
    st = (root / "etc/daemon.conf").lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1, 1, 0o640)
    assert stat.S_IMODE((root / "usr/local/bin/tool").lstat().st_mode) == 0o4755
    assert os.readlink(root / "etc/issue") == "/etc/motd"
    assert not (root / "usr/share/unwanted").exists()
    runner = root / "usr/lib/qlustar/qlustar-runner"
    assert (
        runner.read_bytes()
        == (Path(__file__).parent.parent / "qlimage/node/qlustar-runner").read_bytes()
    )
    assert stat.S_IMODE(runner.stat().st_mode) == 0o755
