"""Head service configs: dnsmasq and nginx rendered from the site, golden files, the daemons'
own config tests, the build task, `qlimage serve --print-config/--check` and bad settings.

Golden files live in tests/golden/head/ (the conftest test site, http port 8470, its root path
written as /SITE). After an intended change to the templates, regenerate them with

    QLIMAGE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_serve_configs.py

and review the diff (`git diff tests/golden`) before committing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qlimage.errors import QlimageError
from qlimage.layout import Layout
from qlimage.serve import dnsmasq, head, mcastd, nginx, unit
from qlimage.site import Site, load_site

from helpers import (
    HEAD,
    REPO,
    assert_refused,
    check_golden,
    edit,
    make_edge_site,
    qlimage,
    sh,
    write_site,
)

SiteFactory = Callable[..., Path]
GOLDEN = Path(__file__).resolve().parent / "golden" / "head"
PORT = 8470

# Extra [head] settings and a boot network without gateway but with an MTU: the other branches.
OPTIONS = (
    'shadow = "/etc/shadow"\n'
    'admin_networks = ["192.168.7.0/24", "10.9.0.7/32"]\n'
    'dns = ["10.0.2.53", "10.0.2.54"]\n'
    "serve_dns = true\n"
)


@contextlib.contextmanager
def namespace(*addresses: str) -> Iterator[str]:
    """A network namespace of our own with loopback up and `addresses` on it; always removed."""
    name = f"qlt-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        for a in addresses:
            sh("ip", "-n", name, "addr", "add", a, "dev", "lo")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def golden_text(site: Site, text: str) -> str:
    return text.replace(str(site.paths.root), "/SITE").replace(sys.executable, "/PYTHON")


def rendered(site: Site) -> dict[str, str]:
    return {p.name: golden_text(site, t) for p, t in head.configs(site).items()}


def directives(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


@pytest.fixture
def site(site_factory: SiteFactory) -> Site:
    return load_site(site_factory(port=PORT))


@pytest.fixture
def options_site(site_factory: SiteFactory) -> Site:
    root = site_factory("options", port=PORT)
    edit(root / "site.toml", f"http_port = {PORT}\n", f"http_port = {PORT}\n{OPTIONS}")
    edit(root / "site.toml", 'gateway = "10.0.2.2"\n', "mtu = 9000\n")
    return load_site(root)


def write_configs(site: Site) -> Layout:
    layout = Layout(site)
    head.write_configs(head.configs(site))
    layout.tftpboot.mkdir(parents=True, exist_ok=True)
    layout.head_run.mkdir(parents=True, exist_ok=True)
    return layout


# --- rendered configs ---------------------------------------------------------------------------


def test_configs_match_golden_files(site: Site) -> None:
    check_golden(GOLDEN, rendered(site))


def test_dnsmasq_answers_registered_macs_only(site: Site) -> None:
    lines = directives(dnsmasq.render(site))
    hosts = [line for line in lines if line.startswith("dhcp-host=")]
    assert hosts == [
        "dhcp-host=52:54:00:12:34:56,10.0.2.15,beo-01",
        "dhcp-host=52:54:00:12:34:57,10.0.2.16,beo-02",
    ]
    assert "dhcp-ignore=tag:!known" in lines
    assert "dhcp-range=set:boot,10.0.2.0,static,255.255.255.0,12h" in lines
    assert "port=0" in lines  # DNS off by default
    assert f"listen-address={HEAD}" in lines


def test_dnsmasq_boot_file_by_client_architecture(site: Site) -> None:
    lines = directives(dnsmasq.render(site))
    assert "dhcp-match=set:bios,option:client-arch,0" in lines
    assert "dhcp-match=set:efi-x86_64,option:client-arch,7" in lines
    assert "dhcp-match=set:efi-x86_64,option:client-arch,9" in lines
    boots = [line for line in lines if line.startswith("dhcp-boot=")]
    assert boots == ["dhcp-boot=tag:bios,pxelinux.0", "dhcp-boot=tag:efi-x86_64,bootx64.efi"]


def test_dnsmasq_tftp_rooted_at_the_tftp_tree(site: Site) -> None:
    lines = directives(dnsmasq.render(site))
    assert "enable-tftp" in lines
    assert f"tftp-root={Layout(site).tftpboot}" in lines
    assert "tftp-secure" not in lines  # dnsmasq runs as nobody: it would refuse root's files


def test_dnsmasq_router_and_dns_from_the_site(site: Site, options_site: Site) -> None:
    lines = directives(dnsmasq.render(site))
    assert "dhcp-option=tag:boot,option:router,10.0.2.2" in lines
    assert "dhcp-option=tag:boot,option:dns-server,10.0.2.2" in lines
    other = directives(dnsmasq.render(options_site))
    assert "dhcp-option=tag:boot,option:router" in other  # no gateway: no router at all
    assert "dhcp-option=tag:boot,option:dns-server,10.0.2.53,10.0.2.54" in other
    assert "dhcp-option=tag:boot,option:mtu,9000" in other
    assert "port=0" not in other  # serve_dns = true


def test_nginx_serves_only_nodes_admins_and_loopback(site: Site, options_site: Site) -> None:
    def allowed(s: Site) -> list[str]:
        text = nginx.render(s)
        block = text[text.index("geo $qlimage_allowed") : text.index("}", text.index("geo "))]
        return re.findall(r"^\s+(\S+) 1;", block, re.M)

    assert allowed(site) == ["127.0.0.0/8", "10.0.2.15/32", "10.0.2.16/32"]
    assert allowed(options_site) == [
        "127.0.0.0/8",
        "192.168.7.0/24",
        "10.9.0.7/32",
        "10.0.2.15/32",
        "10.0.2.16/32",
    ]
    lines = directives(nginx.render(site))
    for wanted in ("default 0;", "return 403;", "autoindex off;", "sendfile on;"):
        assert wanted in lines
    assert "tcp_nopush on;" in lines
    assert f"listen {HEAD}:{PORT};" in lines
    assert "location /qlustar/ {" in lines


def test_access_log_line_parses() -> None:
    line = (
        '{"time":1700000000.123,"addr":"10.0.2.15","uri":"/qlustar/a\\"b","status":200,"bytes":7}'
    )
    entry = nginx.parse_access(line)
    assert entry == nginx.Access(1700000000.123, "10.0.2.15", '/qlustar/a"b', 200, 7)
    with pytest.raises(QlimageError, match="not a qlimage access log line"):
        nginx.parse_access("10.0.2.15 - - [..] GET /")


# --- the daemons accept them -------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["default", "options"])
def test_dnsmasq_test_accepts_config(site: Site, options_site: Site, variant: str) -> None:
    layout = write_configs(site if variant == "default" else options_site)
    proc = sh("dnsmasq", "--test", "-C", str(layout.dnsmasq_conf), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "syntax check OK" in proc.stderr


@pytest.mark.parametrize("variant", ["default", "options"])
def test_nginx_t_accepts_config(site: Site, options_site: Site, variant: str) -> None:
    layout = write_configs(site if variant == "default" else options_site)
    with namespace(f"{HEAD}/32") as ns:  # nginx -t binds the listen address
        proc = sh(
            "ip", "netns", "exec", ns,
            *head.nginx_args(layout), "-t",
            check=False,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "test is successful" in proc.stderr


def build_head(root: Path) -> Layout:
    """Only the head configs and the TFTP tree: what `serve --check` needs, in seconds."""
    qlimage("-C", str(root), "build", "headconfig", "tftpboot")
    return Layout(root / "bootfiles")


def test_serve_check_runs_both_tests(tmp_path: Path) -> None:
    root = write_site(tmp_path / "site", port=PORT)
    build_head(root)
    with namespace(f"{HEAD}/24") as ns:
        proc = sh(
            "ip", "netns", "exec", ns, "env", f"PYTHONPATH={REPO}",
            str(REPO / ".venv/bin/python"), "-m", "qlimage", "-C", str(root),
            "serve", "--check",
            check=False,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "qlimage serve: dnsmasq --test: ok",
        "qlimage serve: nginx -t: ok",
    ]


def test_print_config_shows_both(site_factory: SiteFactory) -> None:
    root = site_factory(port=PORT)
    out = qlimage("-C", str(root), "serve", "--print-config").stdout
    assert out.startswith("==> bootfiles/head/dnsmasq.conf <==\n")
    assert "\n==> bootfiles/head/nginx.conf <==\n" in out
    assert out == head.describe(load_site(root))


# --- the build graph -----------------------------------------------------------------------------


def test_build_writes_configs_and_rewrites_them_only_on_change(tmp_path: Path) -> None:
    root = write_site(tmp_path / "site", port=PORT)
    layout = build_head(root)
    site = load_site(root)
    assert layout.dnsmasq_conf.read_text() == dnsmasq.render(site)
    assert layout.nginx_conf.read_text() == nginx.render(site)
    before = {p: p.stat().st_mtime_ns for p in (layout.dnsmasq_conf, layout.nginx_conf)}
    out = qlimage("-C", str(root), "build", "headconfig").stdout
    assert "-- headconfig" in out  # up to date: skipped
    assert {p: p.stat().st_mtime_ns for p in before} == before

    edit(root / "site.toml", "http_port =", 'admin_networks = ["10.1.0.0/16"]\nhttp_port =')
    out = qlimage("-C", str(root), "build", "headconfig").stdout
    assert ".  headconfig" in out
    assert "10.1.0.0/16 1;  # admin network" in layout.nginx_conf.read_text()
    assert layout.nginx_conf.read_text() == nginx.render(load_site(root))


# --- bad settings (corpus) -----------------------------------------------------------------------

BAD_HEAD = {
    "admin-network-prefix-too-long": 'admin_networks = ["10.0.0.0/33"]',
    "admin-network-octet-too-big": 'admin_networks = ["10.0.0.300/24"]',
    "admin-network-without-prefix": 'admin_networks = ["10.0.0.0"]',
    "admin-network-injects-directive": 'admin_networks = ["10.0.0.0/24 1;\\n0.0.0.0/0"]',
    "admin-network-all": 'admin_networks = ["all"]',
    "admin-networks-not-a-list": 'admin_networks = "10.0.0.0/24"',
    "dns-injects-option": 'dns = ["10.0.2.3,8.8.8.8\\ndhcp-range=0.0.0.0"]',
    "dns-not-an-address": 'dns = ["resolver.example"]',
    "dns-octet-too-big": 'dns = ["10.0.2.256"]',
    "serve-dns-not-a-boolean": 'serve_dns = "yes"',
}


@pytest.mark.parametrize("setting", list(BAD_HEAD.values()), ids=list(BAD_HEAD))
def test_bad_head_setting_is_refused(tmp_path: Path, setting: str) -> None:
    root = write_site(tmp_path / "site")
    edit(root / "site.toml", "http_port =", f"{setting}\nhttp_port =")
    assert_refused(root, names="site.toml")


BAD_BOOTFILES = {
    "bootfiles-with-space": "boot files",
    "bootfiles-with-semicolon": "boot;files",
    "bootfiles-with-dollar": "boot$files",
    "bootfiles-with-comma": "boot,files",
    "bootfiles-with-brace": "boot{files}",
}


@pytest.mark.parametrize("path", list(BAD_BOOTFILES.values()), ids=list(BAD_BOOTFILES))
def test_bootfiles_path_configs_cannot_carry_is_refused(tmp_path: Path, path: str) -> None:
    root = write_site(tmp_path / "site")
    edit(root / "site.toml", "[networks.boot]", f'[paths]\nbootfiles = "{path}"\n\n[networks.boot]')
    proc = assert_refused(root, names="site.toml")
    assert ".paths.bootfiles" in proc.stderr


def test_systemd_unit_runs_serve_for_this_site(site: Site) -> None:
    text = unit.render(site)
    assert f"ExecStart={sys.executable} -m qlimage -C {site.paths.root} serve\n" in text
    assert f"# Install once: systemctl link {Layout(site).serve_unit}\n" in text


@pytest.mark.parametrize("name", ["100% demo", "a\\", "x;y $HOME"])
def test_systemd_verify_accepts_the_unit(
    site_factory: SiteFactory, tmp_path: Path, name: str
) -> None:
    root = site_factory(port=PORT)
    edit(root / "site.toml", 'name = "test"', f"name = {json.dumps(name)}")
    site = load_site(root)
    path = tmp_path / "qlimage-serve.service"
    path.write_text(unit.render(site))
    proc = sh("systemd-analyze", "verify", str(path), check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc
    assert (
        f'Description=qlimage boot services of site "{name.replace("%", "%%")}":'
        in path.read_text()
    )


def test_unit_refuses_an_interpreter_path_systemd_would_split(site: Site) -> None:
    with pytest.raises(QlimageError, match="cannot appear"):
        unit.render(site, python="/opt/my venv/bin/python")


def test_serve_without_built_configs_is_refused(tmp_path: Path) -> None:
    root = write_site(tmp_path / "site")
    proc = assert_refused(root, "serve", names="dnsmasq.conf")
    assert "run qlimage build first" in proc.stderr


def test_serve_check_without_built_configs_is_refused(tmp_path: Path) -> None:
    root = write_site(tmp_path / "site")
    assert_refused(root, "serve", "--check", names="run qlimage build first")


# --- the edge site: per-host lines at their edges (issue 13: built in Python, not Jinja loops) --

EDGE_GOLDEN = Path(__file__).resolve().parent / "golden" / "head-edge"


@pytest.fixture
def edge_site(tmp_path: Path) -> Site:
    return load_site(make_edge_site(tmp_path / "edge"))


def test_edge_site_configs_match_golden_files(edge_site: Site) -> None:
    """Written by the Jinja loops before issue 13: the Python-built lines must not differ."""
    check_golden(EDGE_GOLDEN, rendered(edge_site))


def test_per_host_lines_agree_with_dhcp_hosts_and_clients(edge_site: Site) -> None:
    """The public per-host views (dhcp_hosts, clients) say what the configs say."""
    conf = dnsmasq.render(edge_site)
    wanted = [
        f"dhcp-host={h.mac},{'set:ipxe-host,' if h.ipxe else ''}{h.address},{h.hostname}"
        for h in dnsmasq.dhcp_hosts(edge_site)
    ]
    assert [line for line in conf.splitlines() if line.startswith("dhcp-host=")] == wanted
    assert sum(h.ipxe for h in dnsmasq.dhcp_hosts(edge_site)) == 2
    clients = nginx.clients(edge_site)
    geo = nginx.render(edge_site).split("default 0;\n", 1)[1].split("    }\n", 1)[0]
    assert geo == "".join(f"        {c.cidr} 1;  # {c.why}\n" for c in clients)
    config = json.loads(head.configs(edge_site)[mcastd.config_path(edge_site)])
    assert config["clients"] == [c.cidr for c in clients]


def with_host(site: Site, host: str, /, **changes: object) -> Site:
    """The site with `host` changed past the loader (which would refuse these values)."""
    hosts = [dataclasses.replace(h, **changes) if h.name == host else h for h in site.hosts]  # type: ignore[arg-type]
    return dataclasses.replace(site, hosts=tuple(hosts))


def with_boot_address(site: Site, name: str, **changes: object) -> Site:
    host = site.host(name)
    boot = dataclasses.replace(host.addresses[0], **changes)  # type: ignore[arg-type]
    return with_host(site, name, addresses=(boot, *host.addresses[1:]))


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        (lambda s: with_host(s, "beo-09", mac="52:54:00:12:35:09,set:evil"), "not a MAC address"),
        (lambda s: with_host(s, "beo-09", name="beo-09\nport=53"), "not a host name"),
        (lambda s: with_boot_address(s, "beo-09", hostname="node9,evil"), "not a host name"),
        (lambda s: with_boot_address(s, "beo-09", address="10.0.2.9,10.0.2.10"), "not an IPv4"),
        (lambda s: with_boot_address(s, "beo-09", address="10.0.2.09"), "not an IPv4"),
    ],
)
def test_head_configs_refuse_what_would_split_a_line_or_a_field(
    edge_site: Site, change: Callable[[Site], Site], refused: str
) -> None:
    """Past the loader a value that would end a line or a field is refused, never written."""
    with pytest.raises(QlimageError, match=refused):
        head.configs(change(edge_site))
