"""GRUB netboot (UEFI): rendered configs (golden files), GRUB quoting, the per-host file names
GRUB looks up, the signed loaders in the TFTP tree and the signed kernel.

Golden files live in tests/golden/grub/ (the conftest test site, http port 8470). After an
intended change to the templates or the kernel command line, regenerate them with

    QLIMAGE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_grub.py

and review the diff (`git diff tests/golden`) before committing it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from qlimage.boot import grub, ipxe, loaders
from qlimage.layout import Layout
from qlimage.pool.mirror import fetch_package
from qlimage.site import BootConfig, Site, load_site
from qlimage.templates import UnsafeValue

from helpers import assert_refused, check_golden, edit, qlimage, write_site

SiteFactory = Callable[..., Path]
GOLDEN = Path(__file__).resolve().parent / "golden" / "grub"
PORT = 8470


@pytest.fixture
def site(site_factory: SiteFactory) -> Site:
    return load_site(site_factory(port=PORT))


def script_check(text: str, tmp_path: Path) -> None:
    """GRUB's own parser accepts the file (grub-common's grub-script-check)."""
    path = tmp_path / "check.cfg"
    path.write_text(text)
    subprocess.run(["grub-script-check", str(path)], check=True, capture_output=True)


# --- rendered configs -----------------------------------------------------------------------


def test_configs_match_golden_files(site: Site, tmp_path: Path) -> None:
    rendered = grub.configs(site)
    # The names GRUB's network boot tries first: grub.cfg-01-<mac with dashes>, else grub.cfg.
    assert sorted(rendered) == [
        "grub.cfg",
        "grub.cfg-01-52-54-00-12-34-56",
        "grub.cfg-01-52-54-00-12-34-57",
    ]
    for text in rendered.values():
        script_check(text, tmp_path)
    check_golden(GOLDEN, rendered)


def test_host_config_carries_its_mac_and_boot_config(site: Site) -> None:
    text = grub.configs(site)["grub.cfg-01-52-54-00-12-34-56"]
    assert "'BOOTIF=01-52-54-00-12-34-56'" in text  # the initrd finds its NIC by it
    assert "'qlustar.bootcfg=compute'" in text
    assert "'qlustar.pxecfg=grub.cfg-01-52-54-00-12-34-56'" in text
    assert "echo 'qlustar: grub config grub.cfg-01-52-54-00-12-34-56 " in text
    assert "linux '(tftp)/qlustar/boot/current/vmlinuz' " in text
    assert "initrd '(tftp)/qlustar/boot/current/initrd.img'" in text


def test_default_config_has_no_bootif(site: Site) -> None:
    text = grub.configs(site)["grub.cfg"]
    assert "'qlustar.bootcfg=fallback'" in text
    assert "BOOTIF" not in text  # unknown MAC: the initrd takes the first ethernet NIC


def test_unregistered_default_returns_to_the_firmware(
    site_factory: SiteFactory, tmp_path: Path
) -> None:
    root = site_factory(port=PORT)
    text = (root / "site.toml").read_text()
    (root / "site.toml").write_text(text.replace('default = "fallback"\n', ""))
    default = grub.configs(load_site(root))["grub.cfg"]
    assert default.rstrip().endswith("\nexit")
    assert "linux" not in default and "qlustar." not in default
    script_check(default, tmp_path)


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("plain", "'plain'"),
        ("it's", "'it'\\''s'"),
        ("$(reboot); exit # x", "'$(reboot); exit # x'"),
        ("two words", "'two words'"),
        ("", "''"),
    ],
)
def test_quote_keeps_every_character_literal(value: str, quoted: str, tmp_path: Path) -> None:
    assert grub.quote(value) == quoted
    script_check(f"echo {quoted}\n", tmp_path)


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\x00b", "a\x1bb", "a\x7fb"])
def test_quote_refuses_control_characters(value: str) -> None:
    with pytest.raises(UnsafeValue):
        grub.quote(value)


def test_hostile_append_stays_one_literal_argument_each(site: Site, tmp_path: Path) -> None:
    bc = BootConfig("evil", "demo", "a'b $x;reboot {c}", "")
    text = grub.render_config(site, bc, "grub.cfg-01-x")
    assert "'a'\\''b' '$x;reboot' '{c}'" in text
    script_check(text, tmp_path)


# --- GRUB over HTTP (grub_fetch = "http") -----------------------------------------------------

COMPUTE = '[bootconfigs.compute]\nimage = "demo"\n'


def http_site(root: Path, server: str | None = "10.0.2.100") -> Path:
    """The test site with the compute boot config (beo-01's) fetching over HTTP."""
    extra = 'grub_fetch = "http"\n' + (f'grub_http_server = "{server}"\n' if server else "")
    edit(root / "site.toml", COMPUTE, COMPUTE + extra)
    return root


def test_http_configs_match_golden_files(site_factory: SiteFactory, tmp_path: Path) -> None:
    rendered = grub.configs(load_site(http_site(site_factory(port=PORT))))
    for text in rendered.values():
        script_check(text, tmp_path)
    check_golden(GOLDEN.parent / "grub-http", rendered)
    # Only beo-01's boot config fetches over HTTP; the default and beo-02's stay TFTP-only.
    assert "insmod http" in rendered["grub.cfg-01-52-54-00-12-34-56"]
    for name in ("grub.cfg-01-52-54-00-12-34-57", "grub.cfg"):
        assert "insmod" not in rendered[name] and "(http," not in rendered[name]


def test_http_host_config_tries_http_then_tftp(site_factory: SiteFactory) -> None:
    site = load_site(http_site(site_factory(port=PORT)))
    text = grub.configs(site)["grub.cfg-01-52-54-00-12-34-56"]
    assert "\ninsmod http\nfor qlustar_from in '(http,10.0.2.100)' '(tftp)'; do\n" in text
    assert "  if linux \"$qlustar_from\"'/qlustar/boot/current/vmlinuz' 'console=" in text
    assert "    if initrd \"$qlustar_from\"'/qlustar/boot/current/initrd.img'; then\n" in text
    # One kernel command line, still with the node's BOOTIF and its own config's name.
    assert text.count("'BOOTIF=01-52-54-00-12-34-56'") == 1
    assert "'qlustar.pxecfg=grub.cfg-01-52-54-00-12-34-56'" in text
    assert "'qlustar.http=http://10.0.2.2:8470/qlustar'" in text  # the initrd's HTTP: any port


def test_http_on_port_80_fetches_from_the_head(site_factory: SiteFactory, tmp_path: Path) -> None:
    site = load_site(http_site(site_factory(port=80), server=None))
    text = grub.configs(site)["grub.cfg-01-52-54-00-12-34-56"]
    assert "for qlustar_from in '(http,10.0.2.2)' '(tftp)'; do" in text
    script_check(text, tmp_path)


def test_http_without_port_80_is_refused(tmp_path: Path) -> None:
    """GRUB 2.06 cannot name a port: a head on another port needs an address whose port 80
    serves it, else no node could fetch anything over HTTP."""
    root = http_site(write_site(tmp_path / "site"), server=None)
    proc = assert_refused(root, names="site.toml: .bootconfigs.compute.grub_fetch")
    assert "grub_http_server" in proc.stderr and "port 80" in proc.stderr


@pytest.mark.parametrize(
    ("key", "lines"),
    [
        # GRUB 2.06 would look up a host named "10.0.2.100:8080" and find none.
        ("grub_http_server", 'grub_fetch = "http"\ngrub_http_server = "10.0.2.100:8080"\n'),
        ("grub_http_server", 'grub_fetch = "http"\ngrub_http_server = "10.0.2.100)/evil"\n'),
        ("grub_http_server", 'grub_fetch = "http"\ngrub_http_server = "head.example.org"\n'),
        ("grub_fetch", 'grub_fetch = "ftp"\n'),
    ],
)
def test_bad_grub_http_setting_is_refused(key: str, lines: str, tmp_path: Path) -> None:
    root = write_site(tmp_path / "site")
    edit(root / "site.toml", COMPUTE, COMPUTE + lines)
    assert_refused(root, names=f"site.toml: .bootconfigs.compute.{key}")


def test_http_module_comes_from_the_signed_grubs_build(built_copy: Path) -> None:
    out = qlimage("-C", str(http_site(built_copy)), "build").stdout
    assert ".  grub:http-module" in out, out
    layout = Layout(built_copy / "bootfiles")
    module = layout.grub_modules / "http.mod"
    # Byte for byte the module of Debian's verified grub-efi-amd64-bin, of the very build the
    # signed image names in its SBAT section.
    deb = fetch_package(load_site(built_copy), grub.MODULE_PACKAGE)
    unpacked = built_copy.parent / "grub-bin"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    assert module.read_bytes() == (unpacked / "usr/lib/grub/x86_64-efi/http.mod").read_bytes()
    version = grub.signed_grub_version(layout.tftpboot / "grubx64.efi")
    assert deb.name == f"grub-efi-amd64-bin_{version}_amd64.deb"
    assert "-- grub:http-module" in qlimage("-C", str(built_copy), "build").stdout


def test_http_module_of_another_grub_build_is_refused(built_copy: Path) -> None:
    """A signed GRUB from another grub2 build than the archive's module (a mirror caught
    between two uploads): the build stops instead of serving a module GRUB may not load."""
    layout = Layout(built_copy / "bootfiles")
    image = layout.tftpboot / "grubx64.efi"
    data = image.read_bytes()
    version = grub.signed_grub_version(image).encode()
    other = version[:-1] + (b"0" if version[-1:] != b"0" else b"1")  # same length
    image.write_bytes(data.replace(b",grub2," + version + b",", b",grub2," + other + b","))
    proc = qlimage("-C", str(http_site(built_copy)), "build", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"does not match the signed GRUB's build {other.decode()}" in proc.stderr
    assert not (layout.grub_modules / "http.mod").exists()


# --- hostile inputs (the corpus: one refused site each) ---------------------------------------


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("append-with-escape-char", ('append = "debug"', 'append = "debug\\u001bx"')),
        ("append-with-newline", ('append = "debug"', 'append = "debug\\nlinux /evil"')),
    ],
)
def test_bad_bootconfig_append_is_refused(name: str, edit: tuple[str, str], tmp_path: Path) -> None:
    root = write_site(tmp_path / "site")
    text = (root / "site.toml").read_text()
    assert edit[0] in text
    (root / "site.toml").write_text(text.replace(edit[0], edit[1]))
    assert_refused(root, names="append")


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(["--secure-boot"], id="secure-boot-without-uefi"),
        pytest.param(["--ipxe", "--uefi"], id="ipxe-with-uefi"),
    ],
)
def test_vm_refuses_contradictory_firmware_flags(flags: list[str], tmp_path: Path) -> None:
    root = write_site(tmp_path / "site")
    assert_refused(root, "vm", "beo-01", *flags, names="--uefi")


# --- the built site: loaders and configs in the TFTP tree -------------------------------------


def signatures(path: Path) -> str:
    """What `sbverify --list` says of a PE image's signatures."""
    return subprocess.run(
        ["sbverify", "--list", str(path)], capture_output=True, text=True, check=True
    ).stdout


def test_tftp_tree_holds_the_signed_loaders(built_site: Path) -> None:
    layout = Layout(built_site / "bootfiles")
    for name in loaders.loader_names():
        data = (layout.tftpboot / name).read_bytes()
        assert data[:2] == b"MZ", name  # a PE/COFF image
    assert "Debian Secure Boot" in signatures(layout.tftpboot / "grubx64.efi")
    assert "Microsoft" in signatures(layout.tftpboot / "bootx64.efi")


def test_kernel_is_debian_signed(built_site: Path) -> None:
    """Secure Boot needs the Debian-signed kernel: the kernel package is built from
    linux-signed-amd64, and the initrd's modules come from the same package."""
    assert "Debian Secure Boot Signer" in signatures(Layout(built_site / "bootfiles").vmlinuz)


def test_built_configs_are_the_rendered_ones(built_site: Path) -> None:
    site = load_site(built_site)
    grub_dir = Layout(site).grub_dir
    rendered = grub.configs(site)
    assert sorted(p.name for p in grub_dir.iterdir()) == sorted(rendered)
    for name, text in rendered.items():
        assert (grub_dir / name).read_text() == text


def test_host_that_leaves_loses_its_config(built_copy: Path) -> None:
    nodes = built_copy / "nodes.d/cluster.toml"
    text = nodes.read_text()
    start = text.index('[[hosts]]\nname = "beo-02"')
    nodes.write_text(text[:start])
    out = qlimage("-C", str(built_copy), "build").stdout
    assert "grub:configs" in out
    grub_dir = Layout(built_copy / "bootfiles").grub_dir
    assert sorted(p.name for p in grub_dir.iterdir()) == [
        "grub.cfg",
        "grub.cfg-01-52-54-00-12-34-56",
    ]


def test_loaders_do_not_rebuild_without_a_change(built_copy: Path) -> None:
    out = qlimage("-C", str(built_copy), "build").stdout
    assert "-- grub:loaders" in out and "-- grub:configs" in out


def test_ipxe_is_in_the_tftp_tree_only_for_a_site_that_chain_loads_it(built_copy: Path) -> None:
    tftpboot = Layout(built_copy / "bootfiles").tftpboot
    names = loaders.loader_names(loaders.IPXE_LOADERS)
    assert not any((tftpboot / n).exists() for n in names)
    with (built_copy / "site.toml").open("a") as f:
        f.write('\n[bootconfigs.chain]\nimage = "demo"\nloader = "ipxe"\n')
    edit(built_copy / "nodes.d/cluster.toml", 'bootconfig = "compute"', 'bootconfig = "chain"')
    out = qlimage("-C", str(built_copy), "build").stdout
    assert ".  ipxeloaders" in out, out
    # Byte for byte the files of Debian's verified ipxe package (from the archive cache).
    deb = fetch_package(load_site(built_copy), "ipxe")
    unpacked = built_copy.parent / "ipxe-deb"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    for loader in loaders.IPXE_LOADERS:
        assert (tftpboot / loader.name).read_bytes() == (unpacked / loader.member).read_bytes()
    assert (tftpboot / "snponly.efi").read_bytes()[:2] == b"MZ"  # a PE/COFF image
    dnsmasq = (built_copy / "bootfiles/head/dnsmasq.conf").read_text()
    assert "dhcp-boot=tag:ipxe-host,tag:bios,tag:!ipxe,undionly.kpxe" in dnsmasq


# --- iPXE: the dispatch script and per-host scripts ------------------------------------------


def test_ipxe_scripts_match_golden_files(site: Site) -> None:
    rendered = ipxe.scripts(site)
    assert sorted(rendered) == ["52-54-00-12-34-56.ipxe", "52-54-00-12-34-57.ipxe"]
    check_golden(GOLDEN.parent / "ipxe", {**rendered, ipxe.DISPATCH: ipxe.dispatch()})


def test_ipxe_host_script_fetches_over_http_with_bootif(site: Site) -> None:
    text = ipxe.scripts(site)["52-54-00-12-34-56.ipxe"]
    assert text.startswith("#!ipxe\n")
    assert "\nkernel http://10.0.2.2:8470/qlustar/boot/current/vmlinuz " in text
    assert "\ninitrd http://10.0.2.2:8470/qlustar/boot/current/initrd.img\n" in text
    assert " qlustar.bootcfg=compute " in text and text.count("BOOTIF=01-52-54-00-12-34-56") == 1
    # The dispatch script names the per-host file the way iPXE expands the MAC.
    assert "chain ipxe/${mac:hexhyp}.ipxe" in ipxe.dispatch()


@pytest.mark.parametrize(
    "append",
    ["${root-path}", "a#b", "x||y", "it's", '"q"', ":label", "a&&b", "semi;colon"],
)
def test_ipxe_refuses_what_it_cannot_quote(site: Site, append: str) -> None:
    bc = BootConfig("evil", "demo", append, "")
    with pytest.raises(UnsafeValue):
        ipxe.render_host(site, bc, site.hosts[0])


def test_ipxe_skips_a_host_it_cannot_boot_with_a_warning(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = BootConfig("compute", "demo", "rd.x=${net0/ip}", "")
    odd = replace(site, bootconfigs={**site.bootconfigs, "compute": evil})
    rendered = ipxe.scripts(odd)
    assert sorted(rendered) == ["52-54-00-12-34-57.ipxe"]  # beo-01 (compute) has none
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and ".bootconfigs.compute.append" in err[0] and "beo-01" in err[0]
