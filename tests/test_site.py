"""The site model: the demo site, schema errors one line each, cross-file checks, CLI exits."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from qlimage.errors import ConfigError, QlimageError
from qlimage.site import BootConfig, load_site

from helpers import QLIMAGE, REPO, qlimage

SiteFactory = Callable[..., Path]


def problems_of(root: Path) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        load_site(root)
    return excinfo.value.problems


def only_problem(root: Path) -> str:
    problems = problems_of(root)
    assert len(problems) == 1, problems
    return problems[0]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def host_toml(name: str, mac: str, address: str, *, extra: str = 'image = "demo"') -> str:
    return f'[[hosts]]\nname = "{name}"\nmac = "{mac}"\n{extra}\nnetworks.boot = "{address}"\n'


def snapshot(root: Path) -> dict[str, str]:
    """Every path below root with its kind and content (or link target)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_bytes().hex()
    return out


# --- the demo site --------------------------------------------------------------------------


def test_demo_site_loads() -> None:
    site = load_site(REPO)
    assert site.name == "demo"
    assert site.source_date_epoch == 1700000000
    assert site.head_address == "10.0.2.2"
    assert site.http_port == 8470
    assert site.http_base == "http://10.0.2.2:8470"
    assert site.paths.root == REPO
    assert site.paths.bootfiles == REPO / "bootfiles"
    assert site.paths.pool == REPO / "modules/pool"
    assert site.squashfs_compressor == "zstd"
    assert site.serial == "0 115200"
    assert site.console == "ttyS0,115200"

    boot = site.boot_network
    assert boot.name == "boot"
    assert boot.cidr == ipaddress.IPv4Network("10.0.2.0/24")
    assert boot.gateway == "10.0.2.2"
    assert list(site.networks) == ["boot"]

    assert list(site.images) == ["demo"]
    image = site.images["demo"]
    assert (image.flavor, image.version, image.modules) == ("bookworm", "11", ("core",))
    assert image.chroot is None
    assert image.source == REPO / "images.d/demo.toml"

    assert dict(site.bootconfigs) == {
        "demo": BootConfig("demo", "demo", "", "boot the demo image"),
    }
    assert site.default_bootconfig == "demo"

    assert [h.name for h in site.hosts] == ["beo-01"]
    host = site.hosts[0]
    assert host.mac == "52:54:00:12:34:56"
    assert host.bootconfig == "demo"
    assert host.source == "nodes.d/demo.toml"
    assert site.boot_address(host) == "10.0.2.15"
    addr = host.address_on("boot")
    assert addr is not None
    assert (addr.hostname, addr.aliases) == ("beo-01", ("node1",))
    assert host.address_on("ipmi") is None
    assert site.host("beo-01") is host

    assert "qlustar-module-core-bookworm" in [r.package for r in site.recipes]


def test_unknown_node_is_a_config_error() -> None:
    site = load_site(REPO)
    with pytest.raises(ConfigError) as excinfo:
        site.host("beo-99")
    assert excinfo.value.problems == ["unknown node 'beo-99' (nodes in nodes.d: beo-01)"]


def test_host_naming_only_an_image_gets_an_implicit_boot_config(
    site_factory: SiteFactory,
) -> None:
    site = load_site(site_factory(port=8470))
    assert site.http_base == "http://10.0.2.2:8470"
    hosts = {h.name: h for h in site.hosts}
    assert hosts["beo-01"].bootconfig == "compute"
    assert hosts["beo-02"].bootconfig == "demo"
    assert site.boot_address(hosts["beo-02"]) == "10.0.2.16"
    assert dict(site.bootconfigs) == {
        "compute": BootConfig("compute", "demo", "debug", ""),
        "fallback": BootConfig("fallback", "demo", "", ""),
        "demo": BootConfig("demo", "demo", "", ""),  # implicit: named after the image
    }
    assert site.default_bootconfig == "fallback"


def test_http_base_leaves_out_port_80(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(root / "site.toml", "http_port = 8470\n", "")
    site = load_site(root)
    assert site.http_port == 80
    assert site.http_base == "http://10.0.2.2"


def test_missing_site_file(tmp_path: Path) -> None:
    problem = only_problem(tmp_path)
    assert problem.startswith(f"{tmp_path / 'site.toml'}: no site settings file")


# --- schema errors: one line per problem ------------------------------------------------------

BAD_IMAGE = """\
name = "demo"
flavor = "bookworm"
version = "eleven"
modules = "core"
colour = "blue"
"""

BAD_IMAGE_LINES = [
    "images.d/demo.toml: .: unknown field(s) are not allowed ('colour' was unexpected)",
    "images.d/demo.toml: .modules: 'core' is not of type 'array'",
    "images.d/demo.toml: .version: 'eleven' does not match ",
]


def assert_bad_image_lines(lines: list[str], prefix: str = "") -> None:
    image_lines = [line for line in lines if line.startswith(prefix + "images.d/")]
    assert len(image_lines) == 3, lines
    for line, expected in zip(image_lines, BAD_IMAGE_LINES, strict=True):
        assert line.startswith(prefix + expected), line


def test_malformed_image_gives_one_line_per_problem(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    (root / "images.d/demo.toml").write_text(BAD_IMAGE)
    problems = problems_of(root)
    assert_bad_image_lines(problems)
    assert all("\n" not in p for p in problems)


def test_cli_validate_reports_malformed_image(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    (root / "images.d/demo.toml").write_text(BAD_IMAGE)
    proc = qlimage("-C", str(root), "validate", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("qlimage: ") for line in lines), lines
    assert_bad_image_lines(lines, prefix="qlimage: ")
    assert lines[0].startswith("qlimage: images.d/demo.toml: ")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == ""


def test_cli_build_of_malformed_site_writes_nothing(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    (root / "images.d/demo.toml").write_text(BAD_IMAGE)
    before = snapshot(root)
    proc = qlimage("-C", str(root), "build", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_bad_image_lines(proc.stderr.splitlines(), prefix="qlimage: ")
    assert "Traceback" not in proc.stdout + proc.stderr
    # The site is rejected before doit starts: not even bootfiles/ (or its .doit.db) appears.
    assert snapshot(root) == before
    assert not (root / "bootfiles").exists()


@pytest.mark.parametrize(
    "name, text",
    [
        ("images.d/demo.toml", 'name = "demo"\nflavor = \n'),
        ("nodes.d/cluster.toml", "[[hosts]\n"),
        ("site.toml", "[head\n"),
    ],
)
def test_toml_syntax_error(site_factory: SiteFactory, name: str, text: str) -> None:
    root = site_factory(port=8470)
    (root / name).write_text(text)
    problems = problems_of(root)
    assert any(p.startswith(f"{name}: ") and "line" in p for p in problems), problems
    proc = qlimage("-C", str(root), "validate", check=False)
    assert proc.returncode == 2
    assert f"qlimage: {name}: " in proc.stderr
    assert "Traceback" not in proc.stderr


# --- cross-file checks ----------------------------------------------------------------------


def test_duplicate_host_name_across_files(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    (root / "nodes.d/more.toml").write_text(host_toml("beo-01", "52:54:00:00:00:01", "10.0.2.99"))
    assert only_problem(root) == (
        "nodes.d/more.toml: .hosts[0].name: name 'beo-01' is already used by "
        "nodes.d/cluster.toml: .hosts[0].name"
    )


def test_duplicate_mac_across_files_ignores_case(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    (root / "nodes.d/more.toml").write_text(host_toml("beo-03", "52:54:00:12:34:5F", "10.0.2.99"))
    edit(root / "nodes.d/cluster.toml", "52:54:00:12:34:57", "52:54:00:12:34:5f")
    assert only_problem(root) == (
        "nodes.d/more.toml: .hosts[0].mac: MAC '52:54:00:12:34:5f' is already used by "
        "nodes.d/cluster.toml: .hosts[1].mac"
    )


def test_duplicate_address_across_files(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    (root / "nodes.d/more.toml").write_text(host_toml("beo-03", "52:54:00:00:00:01", "10.0.2.16"))
    assert only_problem(root) == (
        "nodes.d/more.toml: .hosts[0].networks.boot: address '10.0.2.16' is already used by "
        "nodes.d/cluster.toml: .hosts[1].networks.boot"
    )


def test_address_outside_the_network(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(root / "nodes.d/cluster.toml", '"10.0.2.16"', '"10.0.3.16"')
    assert only_problem(root) == (
        "nodes.d/cluster.toml: .hosts[1].networks.boot: 10.0.3.16 is outside 10.0.2.0/24"
    )


def test_unknown_network(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(
        root / "nodes.d/cluster.toml",
        'networks.boot = "10.0.2.16"',
        'networks.boot = "10.0.2.16"\nnetworks.ib = "10.1.0.16"',
    )
    assert only_problem(root) == (
        "nodes.d/cluster.toml: .hosts[1].networks.ib: unknown network (site.toml defines: boot)"
    )


def test_host_without_boot_network_address(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(root / "site.toml", "[boot]", '[networks.ib]\ncidr = "10.1.0.0/16"\n\n[boot]')
    edit(root / "nodes.d/cluster.toml", 'networks.boot = "10.0.2.16"', 'networks.ib = "10.1.0.16"')
    assert only_problem(root) == (
        "nodes.d/cluster.toml: .hosts[1].networks: no address on the boot network 'boot'"
    )


def test_unknown_image_of_host(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(root / "nodes.d/cluster.toml", 'image = "demo"', 'image = "hpc"')
    assert only_problem(root) == (
        "nodes.d/cluster.toml: .hosts[1].image: unknown image 'hpc' (images.d has: demo)"
    )


def test_unknown_bootconfig_of_host(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(root / "nodes.d/cluster.toml", 'bootconfig = "compute"', 'bootconfig = "gpu"')
    assert only_problem(root) == (
        "nodes.d/cluster.toml: .hosts[0].bootconfig: unknown boot config 'gpu' "
        "(site.toml defines: compute, fallback)"
    )


def test_host_needs_image_or_bootconfig(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(root / "nodes.d/cluster.toml", 'image = "demo"\n', "")
    assert only_problem(root) == "nodes.d/cluster.toml: .hosts[1]: needs an image or a bootconfig"


def test_host_image_conflicts_with_its_bootconfig(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    (root / "images.d/other.toml").write_text(
        'name = "other"\nflavor = "bookworm"\nversion = "11"\nmodules = ["core"]\n'
    )
    edit(
        root / "nodes.d/cluster.toml",
        'bootconfig = "compute"',
        'bootconfig = "compute"\nimage = "other"',
    )
    assert only_problem(root) == (
        "nodes.d/cluster.toml: .hosts[0].image: 'other' differs from the image 'demo' "
        "of boot config 'compute'"
    )


def test_host_image_agreeing_with_its_bootconfig_is_fine(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(
        root / "nodes.d/cluster.toml",
        'bootconfig = "compute"',
        'bootconfig = "compute"\nimage = "demo"',
    )
    site = load_site(root)
    assert site.host("beo-01").bootconfig == "compute"


def test_host_image_shadowed_by_bootconfig_of_another_image(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    (root / "images.d/other.toml").write_text(
        'name = "other"\nflavor = "bookworm"\nversion = "11"\nmodules = ["core"]\n'
    )
    edit(
        root / "site.toml",
        "[bootconfigs.fallback]",
        '[bootconfigs.demo]\nimage = "other"\n\n[bootconfigs.fallback]',
    )
    assert only_problem(root) == (
        "nodes.d/cluster.toml: .hosts[1].image: boot config 'demo' exists and boots another "
        "image; name the bootconfig explicitly"
    )


def test_bootconfig_names_unknown_image(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(
        root / "site.toml",
        '[bootconfigs.fallback]\nimage = "demo"',
        '[bootconfigs.fallback]\nimage = "rescue"',
    )
    assert only_problem(root) == (
        "site.toml: .bootconfigs.fallback.image: unknown image 'rescue' (images.d has: demo)"
    )


def test_unknown_boot_default(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(root / "site.toml", 'default = "fallback"', 'default = "rescue"')
    assert only_problem(root) == "site.toml: .boot.default: unknown boot config 'rescue'"


def test_no_boot_network(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(root / "site.toml", "boot = true", "boot = false")
    assert only_problem(root) == (
        "site.toml: .networks: exactly one network needs boot = true (found 0: none)"
    )


def test_two_boot_networks(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(
        root / "site.toml", "[boot]", '[networks.ipmi]\ncidr = "10.3.0.0/16"\nboot = true\n\n[boot]'
    )
    assert only_problem(root) == (
        "site.toml: .networks: exactly one network needs boot = true (found 2: boot, ipmi)"
    )


def test_image_chroot_must_exist(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    with (root / "images.d/demo.toml").open("a") as f:
        f.write('chroot = "hpc"\n')
    assert only_problem(root) == (
        "images.d/demo.toml: .chroot: no chroot 'hpc' (no hpc/chroot.toml under "
        f"{root.resolve() / 'chroots'})"
    )
    (root / "chroots/hpc").mkdir(parents=True)
    (root / "chroots/hpc/chroot.toml").write_text('export = "/srv/hpc"\nport = 20049\n')
    site = load_site(root)
    assert site.images["demo"].chroot == "hpc"
    assert site.chroots["hpc"].source == "10.0.2.2 20049 /srv/hpc"  # server: the head
    (root / "chroots/hpc/chroot.toml").write_text('export = "srv/hpc"\n')
    assert only_problem(root).startswith("chroots/hpc/chroot.toml: .export: 'srv/hpc': expected")


def test_duplicate_image_name(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    (root / "images.d/zz.toml").write_text((root / "images.d/demo.toml").read_text())
    assert only_problem(root) == (
        "images.d/zz.toml: .name: image 'demo' is already defined in images.d/demo.toml"
    )


def test_problems_of_several_files_are_reported_together(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(root / "site.toml", 'default = "fallback"', 'default = "rescue"')
    edit(root / "nodes.d/cluster.toml", '"10.0.2.16"', '"10.0.3.16"')
    problems = problems_of(root)
    assert len(problems) == 2, problems
    assert problems[0].startswith("site.toml: .boot.default: ")
    assert problems[1].startswith("nodes.d/cluster.toml: .hosts[1].networks.boot: ")


# --- module resolution and the CLI ------------------------------------------------------------


def add_slurm(root: Path) -> None:
    edit(root / "images.d/demo.toml", 'modules = ["core"]', 'modules = ["core", "slurm"]')


def test_unknown_module_fails_validate(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    add_slurm(root)
    assert load_site(root).images["demo"].modules == ("core", "slurm")
    proc = qlimage("-C", str(root), "validate", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "qlimage: images.d/demo.toml: .modules[1]: module slurm 11 (bookworm): not in the pool;"
        " modules for bookworm: core"
    ]
    assert proc.stdout == ""


def test_unknown_module_fails_build_before_anything_is_built(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    add_slurm(root)
    proc = qlimage("-C", str(root), "build", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "qlimage: images.d/demo.toml: .modules[1]: module slurm 11 (bookworm): not in" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stdout + proc.stderr
    bootfiles = root / "bootfiles"
    assert not bootfiles.exists() or list(bootfiles.iterdir()) == []


def test_validate_ok(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    proc = qlimage("-C", str(root), "validate")
    assert proc.stdout == "test: 1 image(s), 2 node(s), 3 boot config(s): ok\n"
    assert proc.stderr == ""
    assert not (root / "bootfiles").exists()


def test_debug_shows_traceback_for_user_error(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    add_slurm(root)
    plain = qlimage("-C", str(root), "validate", check=False)
    debug = qlimage("--debug", "-C", str(root), "validate", check=False)
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError" in debug.stderr  # the image's resolution problems, all in one
    # The one-line report still comes last.
    assert debug.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1]


def test_debug_shows_traceback_for_config_error(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(root / "site.toml", 'default = "fallback"', 'default = "rescue"')
    plain = qlimage("-C", str(root), "validate", check=False)
    debug = qlimage("--debug", "-C", str(root), "validate", check=False)
    assert plain.returncode == debug.returncode == 2
    assert plain.stderr == "qlimage: site.toml: .boot.default: unknown boot config 'rescue'\n"
    assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_config_error_is_a_qlimage_error() -> None:
    error = ConfigError(["a: .x: bad", "b: .y: worse"])
    assert isinstance(error, QlimageError)
    assert error.exit_status == 2
    assert str(error) == "a: .x: bad\nb: .y: worse"


def test_source_date_epoch_from_the_environment(
    site_factory: SiteFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = site_factory(port=8470)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1600000000")
    assert load_site(root).source_date_epoch == 1700000000  # site.toml wins
    edit(root / "site.toml", "source_date_epoch = 1700000000\n", "")
    assert load_site(root).source_date_epoch == 1600000000
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert load_site(root).source_date_epoch == 1700000000  # the default


def test_bad_source_date_epoch_is_a_user_error(site_factory: SiteFactory) -> None:
    root = site_factory(port=8470)
    edit(root / "site.toml", "source_date_epoch = 1700000000\n", "")
    proc = subprocess.run(
        [*QLIMAGE, "-C", str(root), "validate"],
        env=dict(os.environ, PYTHONPATH=str(REPO), SOURCE_DATE_EPOCH="yesterday"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "SOURCE_DATE_EPOCH" in proc.stderr
