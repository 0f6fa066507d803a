"""pxelinux: HOSTIDs, rendered configs (golden files), HOSTID links and the TFTP tree.

Golden files live in tests/golden/pxelinux/ (the conftest test site, http port 8470) and
tests/golden/pxelinux-unregistered/ (the same site without boot.default). After an intended
change to the templates or the kernel command line, regenerate them with

    QLIMAGE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_pxe.py

and review the diff (`git diff tests/golden`) before committing it.
"""

from __future__ import annotations

import ipaddress
import os
import random
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from qlimage.boot import pxelinux as pxe
from qlimage.errors import ConfigError, ToolMissing
from qlimage.site import BootConfig, Site, load_site
from qlimage.site.model import HostAddress

from helpers import check_golden

SiteFactory = Callable[..., Path]
GOLDEN = Path(__file__).resolve().parent / "golden"
PORT = 8470


@pytest.fixture
def site(site_factory: SiteFactory) -> Site:
    return load_site(site_factory(port=PORT))


# --- HOSTID ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address", ["10.0.2.15", "192.168.1.1", "172.16.0.255", "0.0.0.1", "255.255.255.255"]
)
def test_hostid_matches_gethostip(address: str) -> None:
    out = subprocess.run(
        ["gethostip", "-x", address], capture_output=True, text=True, check=True
    ).stdout
    assert pxe.hostid(address) == out.strip()


def test_hostid_known_values() -> None:
    assert pxe.hostid("10.0.2.15") == "0A00020F"
    assert pxe.hostid("0.0.0.1") == "00000001"


# --- rendered configs -----------------------------------------------------------------------


def test_configs_match_golden_files(site: Site) -> None:
    rendered = pxe.configs(site)
    assert sorted(rendered) == ["compute", "default", "demo", "fallback"]
    check_golden(GOLDEN / "pxelinux", rendered)


def test_unregistered_default_matches_golden_file(site_factory: SiteFactory) -> None:
    root = site_factory(port=PORT)
    text = (root / "site.toml").read_text()
    (root / "site.toml").write_text(text.replace('default = "fallback"\n', ""))
    site = load_site(root)
    assert site.default_bootconfig is None
    rendered = pxe.configs(site)
    assert "LOCALBOOT 0" in rendered["default"]
    assert "qlustar." not in rendered["default"]
    check_golden(GOLDEN / "pxelinux-unregistered", {"default": rendered["default"]})


def test_default_renders_the_default_bootconfig(site: Site) -> None:
    rendered = pxe.configs(site)
    # `default` is the fallback config, but says which pxelinux.cfg file booted the node.
    assert rendered["default"] == rendered["fallback"].replace(
        "qlustar.pxecfg=fallback", "qlustar.pxecfg=default"
    ).replace("pxelinux config fallback", "pxelinux config default")


def test_serial_is_the_first_directive(site: Site) -> None:
    for name, text in pxe.configs(site).items():
        assert text.startswith("SERIAL 0 115200\n"), name


def test_kernel_command_line(site: Site) -> None:
    words = pxe.kernel_command_line(site, site.bootconfigs["compute"], "0A00020F").split()
    assert words == [
        "console=ttyS0,115200",
        "qlustar.http=http://10.0.2.2:8470/qlustar",
        "qlustar.image=demo",
        "qlustar.path=images/demo",
        "qlustar.sum=demo.img.sha256",
        "qlustar.bootcfg=compute",
        "qlustar.pxecfg=0A00020F",
        "qlustar.mcast=10.0.2.2:5000",
        "debug",
    ]


def test_kernel_command_line_appends_every_word(site: Site) -> None:
    bc = BootConfig("gpu", "demo", "  quiet   nvidia.modeset=0 ", "")
    line = pxe.kernel_command_line(site, bc, "gpu")
    assert line.endswith(" qlustar.pxecfg=gpu qlustar.mcast=10.0.2.2:5000 quiet nvidia.modeset=0")
    assert "  " not in line


def test_write_configs(site: Site, tmp_path: Path) -> None:
    pxe.write_configs(site, tmp_path / "cfg")
    assert {p.name: p.read_text() for p in (tmp_path / "cfg").iterdir()} == pxe.configs(site)
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (tmp_path / "cfg").iterdir())


# --- HOSTID links ---------------------------------------------------------------------------


def links_in(directory: Path) -> dict[str, str]:
    return {p.name: os.readlink(p) for p in directory.iterdir() if p.is_symlink()}


def test_host_links(site: Site) -> None:
    assert pxe.host_links(site) == {"0A00020F": "compute", "0A000210": "demo"}


def test_write_links_creates_retargets_and_removes(tmp_path: Path) -> None:
    cfg = tmp_path / "pxelinux.cfg"
    cfg.mkdir()
    (cfg / "default").write_text("default config\n")
    (cfg / "compute").write_text("compute config\n")
    os.symlink("compute", cfg / "0A0002FE")  # made by hand, not in the index: left alone

    pxe.write_links({"0A00020F": "compute", "0A000210": "demo"}, cfg)
    assert links_in(cfg) == {"0A00020F": "compute", "0A000210": "demo", "0A0002FE": "compute"}
    assert (cfg / ".hosts").read_text() == "0A00020F compute\n0A000210 demo\n"

    inode = (cfg / "0A00020F").lstat().st_ino
    pxe.write_links({"0A00020F": "compute", "0A000210": "fallback"}, cfg)
    assert links_in(cfg) == {"0A00020F": "compute", "0A000210": "fallback", "0A0002FE": "compute"}
    assert (cfg / "0A00020F").lstat().st_ino == inode  # unchanged links are not rewritten
    assert (cfg / ".hosts").read_text() == "0A00020F compute\n0A000210 fallback\n"

    pxe.write_links({"0A000210": "fallback"}, cfg)
    assert links_in(cfg) == {"0A000210": "fallback", "0A0002FE": "compute"}
    assert (cfg / ".hosts").read_text() == "0A000210 fallback\n"

    pxe.write_links({}, cfg)
    assert links_in(cfg) == {"0A0002FE": "compute"}
    assert (cfg / ".hosts").read_text() == ""
    assert (cfg / "default").read_text() == "default config\n"
    assert (cfg / "compute").read_text() == "compute config\n"
    assert sorted(os.listdir(cfg)) == [".hosts", "0A0002FE", "compute", "default"]


def test_write_links_with_trusted_outputs_reads_only_the_changed_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the outputs as the stamped build left them (tasks/stamp.py), the index says what
    each link is: only a link whose entry changed is read and made, and a stale one (only a
    HOSTID, whatever the index says) removed."""
    from qlimage.tasks import stamp

    cfg = tmp_path / "pxelinux.cfg"
    pxe.write_links({"0A00020F": "compute", "0A000210": "demo", "0A000211": "demo"}, cfg)
    with (cfg / ".hosts").open("a") as index:
        index.write("../outside demo\n")  # never a name to remove
    (tmp_path / "outside").write_text("not a link of ours\n")
    read: list[str] = []
    readlink = os.readlink

    def counted(path: str | os.PathLike[str]) -> str:
        read.append(os.path.basename(path))
        return readlink(path)

    monkeypatch.setattr(pxe.os, "readlink", counted)
    monkeypatch.setattr(stamp, "outputs_trusted", lambda: True)
    pxe.write_links({"0A00020F": "compute", "0A000210": "fallback"}, cfg)
    assert read == ["0A000210"]
    assert links_in(cfg) == {"0A00020F": "compute", "0A000210": "fallback"}
    assert (tmp_path / "outside").exists()


def test_write_links_creates_the_directory(tmp_path: Path) -> None:
    cfg = tmp_path / "new" / "pxelinux.cfg"
    pxe.write_links({"0A00020F": "compute"}, cfg)
    assert links_in(cfg) == {"0A00020F": "compute"}
    assert sorted(os.listdir(cfg)) == [".hosts", "0A00020F"]


def test_write_links_for_the_site(site: Site, tmp_path: Path) -> None:
    cfg = tmp_path / "pxelinux.cfg"
    pxe.write_configs(site, cfg)
    pxe.write_links(pxe.host_links(site), cfg)
    # Every link resolves to a rendered config that names the host's boot config.
    for host in site.hosts:
        link = cfg / pxe.hostid(site.boot_address(host))
        assert f"qlustar.bootcfg={host.bootconfig} " in link.read_text() + " "


# --- TFTP tree ------------------------------------------------------------------------------


def test_install_tftp_tree(tmp_path: Path) -> None:
    tftpboot = tmp_path / "tftpboot"
    pxe.install_tftp_tree(tftpboot)
    assert sorted(os.listdir(tftpboot)) == ["ldlinux.c32", "pxelinux.0", "pxelinux.cfg", "qlustar"]
    for name, src in (
        ("pxelinux.0", Path("/usr/lib/PXELINUX/pxelinux.0")),
        ("ldlinux.c32", Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")),
    ):
        path = tftpboot / name
        assert not path.is_symlink()
        assert path.read_bytes() == src.read_bytes()
        assert path.stat().st_mode & 0o777 == 0o644
    assert os.readlink(tftpboot / "pxelinux.cfg") == "../pxelinux.cfg"
    assert os.readlink(tftpboot / "qlustar") == "../qlustar"
    # Installing again replaces everything in place.
    pxe.install_tftp_tree(tftpboot)
    assert sorted(os.listdir(tftpboot)) == ["ldlinux.c32", "pxelinux.0", "pxelinux.cfg", "qlustar"]


def test_install_tftp_tree_without_pxelinux(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pxe, "PXELINUX", tmp_path / "missing/pxelinux.0")
    with pytest.raises(ToolMissing) as excinfo:
        pxe.install_tftp_tree(tmp_path / "tftpboot")
    assert "apt-get install pxelinux" in str(excinfo.value)
    assert not (tmp_path / "tftpboot/pxelinux.0").exists()


def test_bootconfig_named_default_is_rejected(site_factory: SiteFactory) -> None:
    root = site_factory(port=PORT)
    text = (root / "site.toml").read_text()
    (root / "site.toml").write_text(
        text.replace(
            "[bootconfigs.compute]",
            '[bootconfigs.default]\nimage = "demo"\nappend = "rescue"\n\n[bootconfigs.compute]',
        )
    )
    nodes = root / "nodes.d/cluster.toml"
    nodes.write_text(nodes.read_text().replace('bootconfig = "compute"', 'bootconfig = "default"'))
    # Today the site loads, beo-01 links to `default`, and that file boots `fallback` without
    # the `rescue` parameter of the boot config the host asked for.
    with pytest.raises(ConfigError) as excinfo:
        load_site(root)
    assert any("default" in p for p in excinfo.value.problems)


# --- HOSTIDs at 10,000 hosts: canonical dotted quads without ipaddress ------------------------


def ipaddress_hostid(address: str) -> str:
    return f"{int(ipaddress.IPv4Address(address)):08X}"


def canonical_addresses() -> list[str]:
    rng = random.Random(13)
    edges = ["0.0.0.0", "255.255.255.255", "9.10.99.100", "199.200.249.250", "251.0.1.255"]
    return edges + [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(2000)]


def test_hostid_of_canonical_addresses_needs_no_ipaddress(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = {a: ipaddress_hostid(a) for a in canonical_addresses()}
    monkeypatch.setattr(pxe, "ipaddress", None)  # the fast path must not reach it
    assert {a: pxe.hostid(a) for a in expected} == expected


@pytest.mark.parametrize(
    "address",
    [
        "010.0.2.15",  # leading zero: inet_aton reads it as octal, ipaddress refuses it
        "10.0.2.015",
        "0x0a.0.2.15",
        "10.2.15",  # inet_aton: 10.2.0.15
        "167772687",
        "256.0.0.1",
        "10.0.2.15.1",
        "10..2.15",
        " 10.0.2.15",
        "10.0.2.15\n",
        "\u0661\u0660.0.2.15",  # Arabic-Indic digits: str.isdigit() but not an address
        "",
    ],
)
def test_hostid_of_any_other_form_is_ipaddresss_answer(address: str) -> None:
    with pytest.raises(ValueError):
        ipaddress_hostid(address)
    with pytest.raises(ValueError):
        pxe.hostid(address)


def test_host_links_take_each_hosts_boot_address(site: Site) -> None:
    """Among several addresses, the one on the boot network, as site.boot_address says."""
    hosts = [
        replace(
            site.hosts[0],
            name=f"n{i}",
            mac=f"52:54:01:00:00:{i:02x}",
            addresses=(
                HostAddress("ib", f"192.168.0.{i}", f"n{i}-ib", ()),
                HostAddress("boot", f"10.0.{i}.{255 - i}", f"n{i}", ()),
            ),
            bootconfig=sorted(site.bootconfigs)[i % len(site.bootconfigs)],
        )
        for i in range(50)
    ]
    big = replace(site, hosts=(*site.hosts, *hosts))
    links = pxe.host_links(big)
    assert links == {ipaddress_hostid(big.boot_address(h)): h.bootconfig for h in big.hosts}
    assert links["0A0001FE"] == hosts[1].bootconfig and len(links) == 52
