"""GRUB netboot (UEFI): rendered configs (golden files), GRUB quoting, the per-host file names
GRUB looks up, the signed loaders in the TFTP tree and the signed kernel.

Golden files live in tests/golden/grub/ (the conftest test site, http port 8470). After an
intended change to the templates or the kernel command line, regenerate them with

    QLIMAGE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_grub.py

and review the diff (`git diff tests/golden`) before committing it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from qlimage import atomic, templates
from qlimage.boot import grub, ipxe, loaders, perhost
from qlimage.layout import Layout
from qlimage.pool.mirror import fetch_package
from qlimage.site import BootConfig, Host, Site, load_site
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


# --- 10,000 hosts: one render per boot config, only changed files written --------------------


def with_hosts(site: Site, hosts: list[Host], **bootconfigs: BootConfig) -> Site:
    return replace(
        site, bootconfigs={**site.bootconfigs, **bootconfigs}, hosts=(*site.hosts, *hosts)
    )


def spread_hosts(site: Site, count: int, bootconfigs: list[str]) -> list[Host]:
    """`count` hosts like beo-01, round robin over `bootconfigs`."""
    return [
        replace(
            site.hosts[0],
            name=f"n{i:04d}",
            mac=f"52:54:01:00:{i >> 8:02x}:{i & 255:02x}",
            bootconfig=bootconfigs[i % len(bootconfigs)],
        )
        for i in range(count)
    ]


def hostile_site(site: Site) -> Site:
    """Boot configs whose words need GRUB's quoting (and iPXE cannot carry), one over HTTP, one
    naming another host's BOOTIF and config, two carrying the slot tokens themselves; hosts
    spread over all of them, and one whose MAC is not in the model's form."""
    bootconfigs = {
        "quotes": BootConfig("quotes", "demo", 'a\'b "c" $x;reboot {c} #d ${net0/ip}', ""),
        "http": BootConfig(
            "http", "demo", "quiet", "", grub_fetch="http", grub_http_server="10.0.2.100"
        ),
        "bootif": BootConfig(
            "bootif", "demo", "BOOTIF=01-52-54-01-00-00-00 qlustar.pxecfg=52-54-01-00-00-00", ""
        ),
        "slot": BootConfig("slot", "demo", f"x={perhost.SLOT}", ""),
        "other-slot": BootConfig("other-slot", "demo", f"x={perhost.OTHER_SLOT}", ""),
    }
    hosts = spread_hosts(site, 40, [*sorted(bootconfigs), *sorted(site.bootconfigs)])
    hosts.append(replace(site.hosts[0], name="upper", mac="52:54:01:AB:CD:EF", bootconfig="http"))
    return with_hosts(site, hosts, **bootconfigs)


def full_grub_configs(site: Site) -> dict[str, str]:
    """grub.configs as one full render per host: what the shortcut must equal."""
    default = site.bootconfigs.get(site.default_bootconfig or "")
    out = {grub.CONFIG: grub.render_config(site, default, grub.CONFIG)}
    for host in site.hosts:
        name = grub.host_config_name(host)
        out[name] = grub.render_config(site, site.bootconfigs[host.bootconfig], name, host)
    return out


def full_ipxe_scripts(site: Site) -> tuple[dict[str, str], list[str]]:
    """ipxe.scripts as one full render per host, and the warning each refused host gets."""
    out, warnings = {}, []
    for host in site.hosts:
        try:
            text = ipxe.render_host(site, site.bootconfigs[host.bootconfig], host)
        except UnsafeValue as e:
            warnings.append(
                f"qlimage: warning: site.toml: .bootconfigs.{host.bootconfig}.append: {e}; "
                f"no iPXE script for {host.name}"
            )
        else:
            out[ipxe.host_script_name(host)] = text
    return out, warnings


def test_grub_configs_equal_the_full_render_per_host(site: Site, tmp_path: Path) -> None:
    hostile = hostile_site(site)
    rendered = grub.configs(hostile)
    assert rendered == full_grub_configs(hostile)
    assert len(rendered) == len(hostile.hosts) + 1
    # The shortcut is taken where it is sound, and only there.
    for name in ("compute", "fallback", "quotes", "http", "bootif"):
        assert grub.host_shape(hostile, hostile.bootconfigs[name]) is not None, name
    for name in ("slot", "other-slot"):
        assert grub.host_shape(hostile, hostile.bootconfigs[name]) is None, name
    upper = grub.host_config_name(hostile.host("upper"))  # its MAC is not in the plain form
    assert upper in rendered.whole and upper not in rendered.shaped
    assert "'BOOTIF=01-52-54-01-ab-cd-ef'" in rendered["grub.cfg-01-52-54-01-ab-cd-ef"]
    script_check(rendered[grub.host_config_name(hostile.host("n0000"))], tmp_path)


def test_ipxe_scripts_equal_the_full_render_per_host(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = hostile_site(site)
    rendered = ipxe.scripts(hostile)
    err = capsys.readouterr().err.splitlines()
    expected, warnings = full_ipxe_scripts(hostile)
    assert rendered == expected
    # The hosts of `quotes` get no script and the same warning each, in the hosts' order.
    assert err == warnings
    quotes = [h.name for h in hostile.hosts if h.bootconfig == "quotes"]
    assert len(warnings) == len(quotes) > 1 and all(
        h in w for h, w in zip(quotes, warnings, strict=True)
    )
    for name in ("compute", "http", "bootif"):
        assert ipxe.host_shape(hostile, hostile.bootconfigs[name]) is not None, name
    for name in ("quotes", "slot", "other-slot"):
        assert ipxe.host_shape(hostile, hostile.bootconfigs[name]) is None, name


def test_one_render_per_boot_config_whatever_the_host_count(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    render = templates.render

    def counted(name: str, **context: object) -> str:
        calls.append(name)
        return render(name, **context)

    monkeypatch.setattr(templates, "render", counted)
    big = with_hosts(site, spread_hosts(site, 500, sorted(site.bootconfigs)))
    grub.configs(big)
    # The default config, then two renders (the slot proof) per boot config.
    assert len(calls) == 1 + 2 * len(site.bootconfigs)
    calls.clear()
    ipxe.scripts(big)
    assert len(calls) == 2 * len(site.bootconfigs)


def stats(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in directory.iterdir()}


OLD = 1_000_000_000  # an mtime no write of this test gives a file


def test_writers_rewrite_only_changed_files(site: Site, tmp_path: Path) -> None:
    """A host joins: its file is written, every other one keeps its inode and mtime."""
    grown = with_hosts(site, spread_hosts(site, 1, ["compute"]))
    new = grown.hosts[-1]
    grub_dir, ipxe_dir = tmp_path / "grub", tmp_path / ipxe.DIRECTORY
    grub.write_configs(grub.configs(site), grub_dir)
    ipxe.write_scripts(ipxe.scripts(site), ipxe.dispatch(), tmp_path)
    for p in [*grub_dir.iterdir(), *ipxe_dir.iterdir()]:
        os.utime(p, (OLD, OLD))
    before = {**stats(grub_dir), **stats(ipxe_dir)}

    grub.write_configs(grub.configs(grown), grub_dir)
    ipxe.write_scripts(ipxe.scripts(grown), ipxe.dispatch(), tmp_path)
    after = {**stats(grub_dir), **stats(ipxe_dir)}
    assert sorted(after) == sorted(
        [*before, grub.host_config_name(new), ipxe.host_script_name(new)]
    )
    assert {name: after[name] for name in before} == before
    assert {p.name: p.read_text() for p in grub_dir.iterdir()} == grub.configs(grown)
    assert {p.name: p.read_text() for p in ipxe_dir.iterdir()} == ipxe.scripts(grown)

    # A host leaves: only its files go.
    grub.write_configs(grub.configs(site), grub_dir)
    ipxe.write_scripts(ipxe.scripts(site), ipxe.dispatch(), tmp_path)
    assert {**stats(grub_dir), **stats(ipxe_dir)} == before


def test_writers_replace_what_is_not_their_regular_file(site: Site, tmp_path: Path) -> None:
    """At a name: a link to a file with the right bytes is replaced, its target untouched; a
    FIFO is replaced without blocking; a wrong mode or wrong bytes of the right size are
    rewritten. Stale names go (links not followed), other files stay."""
    rendered = grub.configs(with_hosts(site, spread_hosts(site, 1, ["compute"])))
    directory = tmp_path / "grub"
    directory.mkdir()
    linked, fifo, mode, bytes_ = sorted(rendered)
    assert "compute" in rendered[bytes_]
    outside = tmp_path / "outside.cfg"
    outside.write_text(rendered[linked])
    os.symlink(outside, directory / linked)
    os.mkfifo(directory / fifo)
    (directory / mode).write_text(rendered[mode])
    os.chmod(directory / mode, 0o600)
    (directory / bytes_).write_text(rendered[bytes_].replace("compute", "cOmpute"))
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    os.symlink(victim, directory / "grub.cfg-01-de-ad-be-ef-00-01")  # a host that left
    (directory / "grub.cfg-01-de-ad-be-ef-00-02").write_text("stale\n")
    (directory / "README").write_text("not ours\n")

    grub.write_configs(rendered, directory)
    assert sorted(os.listdir(directory)) == sorted([*rendered, "README"])
    for name, text in rendered.items():
        path = directory / name
        assert not path.is_symlink() and path.is_file(), name
        assert path.read_text() == text and path.stat().st_mode & 0o777 == 0o644, name
    assert outside.read_text() == rendered[linked] and victim.read_text() == "keep me\n"


def test_writers_clamp_an_unchanged_file_touched_since(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(atomic, "_served", None)  # restored after the test
    atomic.clamp_outputs_below([tmp_path], OLD)
    rendered = grub.configs(site)
    grub.write_configs(rendered, tmp_path / "grub")
    path = tmp_path / "grub" / grub.CONFIG
    assert path.stat().st_mtime == OLD
    os.utime(path)  # now
    inode = path.stat().st_ino
    grub.write_configs(rendered, tmp_path / "grub")
    assert (path.stat().st_ino, path.stat().st_mtime) == (inode, OLD)


def test_files_digest_changes_exactly_with_the_files(site: Site) -> None:
    """The digest (the tasks' up-to-date check) follows every name and byte: a shaped host's
    boot config or MAC, a fully rendered host's text, a host joining or leaving; and not the
    order of the hosts in the inventory."""
    base = hostile_site(site)

    def append(name: str, text: str) -> Site:
        bootconfig = replace(base.bootconfigs[name], append=text)
        return replace(base, bootconfigs={**base.bootconfigs, name: bootconfig})

    n1 = base.host("n0001")
    variants = {
        "same": base,
        "reordered": replace(base, hosts=tuple(reversed(base.hosts))),
        "shaped append": append("bootif", "quiet splash"),
        "whole append": append("slot", f"y={perhost.SLOT}"),
        "mac": replace(
            base,
            hosts=tuple(replace(h, mac="52:54:01:00:ff:01") if h == n1 else h for h in base.hosts),
        ),
        "joined": with_hosts(base, [replace(n1, name="joined", mac="52:54:01:00:ff:02")]),
        "left": replace(base, hosts=tuple(h for h in base.hosts if h != n1)),
        "moved": replace(
            base,
            hosts=tuple(replace(h, bootconfig="compute") if h == n1 else h for h in base.hosts),
        ),
    }
    for render in (grub.configs, ipxe.scripts):
        before = render(base)
        for label, variant in variants.items():
            after = render(variant)
            assert (after.digest == before.digest) == (after == before), (render, label)
            assert (after == before) == (label in ("same", "reordered")), (render, label)
