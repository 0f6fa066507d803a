"""The time, sssd and nis option kinds: rendering, goldens, their real consumers (sssctl,
systemd-analyze, chronyd, glibc's getent) and the runner's clock step.

Goldens of OPTIONS_HOSTS live in tests/golden/bundle/<host>/ (regenerate as test_bundle.py
says: QLIMAGE_UPDATE_GOLDEN=1)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlimage.bundle import render as qb
from qlimage.bundle.render import Bundle, NodeFile
from qlimage.node.runner import bundle as node_bundle
from qlimage.node.runner import clock
from qlimage.node.runner import paths as node_paths
from qlimage.node.runner.commands import run_command
from qlimage.node.runner.main import EXIT_OK
from qlimage.node.runner.report import Reporter
from qlimage.site import Site, load_site

from fake_node import (
    Commands,
    Head,
    as_root,
    console_lines,
    fake_node,
    node_mode,
    node_owner,
    node_read,
    run_node,
)
from helpers import (
    BUNDLE_GOLDEN,
    OPTIONS_HOSTS_TOML,
    check_golden,
    golden_outputs,
    make_site,
    ntp_server,
    render,
)

pytestmark = pytest.mark.usefixtures("node_env")

OPTIONS_HOSTS = ("beo-09", "beo-10", "beo-11")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("options") / "site"
    return load_site(make_site(root, extra_hosts=OPTIONS_HOSTS_TOML))


def files_of(b: Bundle) -> dict[str, NodeFile]:
    return {f.path: f for f in b.files}


def text(b: Bundle, path: str) -> str:
    return files_of(b)[path].content.decode()


# --- rendering ------------------------------------------------------------------------------


def test_time_is_on_by_default_with_the_head_as_server(site: Site) -> None:
    b = render(site, "beo-05")
    files = files_of(b)
    for path in (qb.CHRONY_CONF, qb.TIMESYNCD_CONF, "/etc/qlustar/options.d/time"):
        f = files[path]
        assert (f.mode, f.owner, f.group, f.origin) == (0o644, "root", "root", "time (default)")
    assert text(b, qb.CHRONY_CONF).endswith("\nserver 10.0.2.2 iburst\n")
    assert text(b, qb.TIMESYNCD_CONF).endswith("\n[Time]\nNTP=10.0.2.2\n")
    assert "\nTIME_SERVERS=10.0.2.2\nTIME_SYNC_AT_BOOT=yes\n" in text(
        b, "/etc/qlustar/options.d/time"
    )


def test_time_servers_override_and_off(site: Site) -> None:
    b = render(site, "beo-09")
    assert "server ntp1.example.org iburst\nserver 10.0.2.3 iburst\n" in text(b, qb.CHRONY_CONF)
    assert text(b, qb.TIMESYNCD_CONF).endswith("NTP=ntp1.example.org 10.0.2.3\n")
    assert not any("time" in f.origin for f in render(site, "beo-10").files)
    assert "TIME_SYNC_AT_BOOT=no\n" in text(render(site, "beo-11"), "/etc/qlustar/options.d/time")


def test_head_address_is_a_bundle_input(site: Site) -> None:
    host = site.host("beo-05")
    before = qb.bundle_inputs(site, host)
    moved = type(site)(**{**vars(site), "head_address": "10.0.2.3"})
    assert qb.bundle_inputs(moved, host) != before


def test_sssd_files_modes_and_pam_actions(site: Site) -> None:
    b = render(site, "beo-09")
    conf = files_of(b)[qb.SSSD_CONF]
    assert (conf.mode, conf.owner, conf.group, conf.uid, conf.gid) == (0o600, "root", "root", 0, 0)
    lines = conf.content.decode().splitlines()
    assert "ldap_uri = ldaps://ldap1.example.org, ldaps://ldap2.example.org:636" in lines
    assert "ldap_id_use_start_tls = false" in lines  # all ldaps://
    assert "ldap_access_filter = (memberOf=cn=hpc,ou=groups,dc=example,dc=org)" in lines
    link = files_of(b)["/etc/systemd/system/multi-user.target.wants/sssd.service"]
    assert link.target == "/lib/systemd/system/sssd.service"
    assert [a["argv"] for a in b.actions if a["kind"] == "command"] == [
        ["/usr/sbin/pam-auth-update", "--enable", "sss"],
        ["/usr/sbin/pam-auth-update", "--enable", "mkhomedir"],
    ]
    ad = text(render(site, "beo-11"), qb.SSSD_CONF).splitlines()
    assert {"id_provider = ad", "ad_domain = ad.example.org", "access_provider = ad",
            "ldap_id_use_start_tls = true"} <= set(ad)  # fmt: skip


def test_nsswitch_order_is_files_sss_nis(site: Site) -> None:
    both = text(render(site, "beo-09"), qb.NSSWITCH_CONF).splitlines()
    assert "passwd:         files sss nis" in both
    assert "shadow:         files sss nis" in both
    assert files_of(render(site, "beo-09"))[qb.NSSWITCH_CONF].origin == (
        "sssd (host options) + nis (host options)"
    )
    assert "group:          files nis" in text(render(site, "beo-10"), qb.NSSWITCH_CONF)
    assert "passwd:         files sss" in text(render(site, "beo-11"), qb.NSSWITCH_CONF)
    assert qb.NSSWITCH_CONF not in files_of(render(site, "beo-05"))


def test_nis_files(site: Site) -> None:
    b = render(site, "beo-09")
    assert text(b, "/etc/defaultdomain") == "hpc\n"
    assert text(b, "/etc/yp.conf").endswith(
        "\ndomain hpc server nis1\ndomain hpc server 10.0.2.4\n"
    )


@pytest.mark.parametrize("name", OPTIONS_HOSTS)
def test_golden_files(site: Site, name: str) -> None:
    check_golden(BUNDLE_GOLDEN / name, golden_outputs(render(site, name)))


def test_preview_shows_the_options(site: Site) -> None:
    out = qb.describe(render(site, "beo-09"))
    assert "0600 root:root /etc/sssd/sssd.conf  (sssd (host options))" in out
    assert "==> /etc/yp.conf <==" in out and "==> /etc/chrony/conf.d/qlustar.conf <==" in out


# --- real consumers -------------------------------------------------------------------------


def write_node_file(b: Bundle, path: str, dest: Path) -> Path:
    f = files_of(b)[path]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(f.content)
    os.chmod(dest, f.mode)
    return dest


@pytest.mark.parametrize("name", ["beo-09", "beo-11"])
def test_sssctl_accepts_sssd_conf(site: Site, name: str, tmp_path: Path) -> None:
    conf = write_node_file(render(site, name), qb.SSSD_CONF, tmp_path / "sssd/sssd.conf")
    (tmp_path / "sssd/conf.d").mkdir(mode=0o700)  # as sssd-common ships /etc/sssd/conf.d
    proc = subprocess.run(
        ["sssctl", "config-check", "-c", str(conf)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Issues identified by validators: 0" in proc.stdout
    # It is a real check: a misspelt option is reported.
    conf.write_text(conf.read_text().replace("ldap_search_base", "ldap_serch_base"))
    proc = subprocess.run(
        ["sssctl", "config-check", "-c", str(conf)], capture_output=True, text=True, check=False
    )
    assert "Issues identified by validators: 1" in proc.stdout, proc.stdout


def test_timesyncd_reads_the_drop_in(site: Site, tmp_path: Path) -> None:
    write_node_file(render(site, "beo-09"), qb.TIMESYNCD_CONF, tmp_path / qb.TIMESYNCD_CONF[1:])
    proc = subprocess.run(
        ["systemd-analyze", "cat-config", f"--root={tmp_path}", "systemd/timesyncd.conf"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"# {tmp_path}{qb.TIMESYNCD_CONF}" in proc.stdout
    assert "NTP=ntp1.example.org 10.0.2.3" in proc.stdout


def test_chronyd_parses_the_drop_in(site: Site, tmp_path: Path) -> None:
    conf = write_node_file(render(site, "beo-09"), qb.CHRONY_CONF, tmp_path / "chrony.conf")
    proc = subprocess.run(
        ["chronyd", "-p", "-f", str(conf)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "server ntp1.example.org iburst" in proc.stdout


def unshare_works() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.parametrize("name", ["beo-09", "beo-10", "beo-11"])
def test_getent_with_the_generated_nsswitch(site: Site, name: str, tmp_path: Path) -> None:
    conf = write_node_file(render(site, name), qb.NSSWITCH_CONF, tmp_path / "nsswitch.conf")
    # A private mount namespace: the generated file replaces /etc/nsswitch.conf for getent only.
    script = 'mount --bind "$1" /etc/nsswitch.conf && getent passwd root && getent group root'
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(conf)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("root:x:0:0:")


# --- the runner -----------------------------------------------------------------------------


def node_bundle_of(site: Site, name: str) -> node_bundle.Bundle:
    return node_bundle.parse_bundle(qb.bundle_json(render(site, name)), "0" * 64)


@pytest.fixture
def short_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(node_paths, "TIME_SYNC_TIMEOUT", 1)
    yield


def test_head_not_answering_does_not_block(
    site: Site, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    # An image with ntpd (no such image here: Debian's busybox has none): the node's ntpd is
    # simulated, killed by `timeout -s KILL` (status 137) as when no one answers. chronyd's
    # path runs for real below, and on the QEMU systemd node (test_systemd_node.py).
    sync = ["timeout", "-s", "KILL", "10", "ntpd", "-n", "-q", "-p", "10.0.2.2"]
    commands.argv_status[" ".join(sync)] = 137
    data = qb.bundle_json(render(site, "beo-05"))
    with fake_node() as fs:
        for program in ("/usr/sbin/ntpd", "/usr/bin/timeout"):
            fs.create_file(program, contents="#!/bin/sh\n", st_mode=0o100755)
        head.publish(data)
        with as_root():
            assert run_node(head, commands) == EXIT_OK
    assert commands.calls[0] == sync
    out = console_lines(capsys)
    assert (
        "qlustar: time: clock NOT set: no answer from 10.0.2.2 within 10s (ntpd); "
        "the boot goes on with the clock as it is"
    ) in out
    assert out[-1].startswith("qlustar: runner done: ")


def test_no_client_is_said_and_skipped(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    calls: list[list[str]] = []
    b = node_bundle_of(site, "beo-05")
    assert clock.sync_clock(b, lambda argv, input=None: (calls.append(list(argv)), (0, ""))[1],
                            Reporter()) is None  # fmt: skip
    assert calls == []
    assert (
        "qlustar: time: no NTP client (chronyd, ntpd, busybox ntpd) on this node; clock not set"
        in (capsys.readouterr().out)
    )


def test_chronyd_not_answering_is_said(
    site: Site, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    # chronyd bounds itself (-t) and exits 1 saying "Timeout reached" when no one answered.
    commands.status["chronyd"] = 1
    commands.output["chronyd"] = "chronyd version 4.3 starting\nTimeout reached\n"
    data = qb.bundle_json(render(site, "beo-05"))
    with fake_node() as fs:
        fs.create_file("/usr/sbin/chronyd", contents="#!/bin/sh\n", st_mode=0o100755)
        head.publish(data)
        with as_root():
            assert run_node(head, commands) == EXIT_OK
    assert commands.calls[0] == [
        "chronyd", "-q", "-u", "root", "-t", "10", "server 10.0.2.2 iburst maxsamples 1"
    ]  # fmt: skip
    out = console_lines(capsys)
    assert (
        "qlustar: time: clock NOT set: no answer from 10.0.2.2 within 10s (chronyd); "
        "the boot goes on with the clock as it is"
    ) in out
    assert out[-1].startswith("qlustar: runner done: ")


def time_bundle(*servers: str) -> node_bundle.Bundle:
    data = f"TIME_SERVERS='{' '.join(servers)}'\nTIME_SYNC_AT_BOOT=yes\n".encode()
    entry = node_bundle.Entry(path=node_paths.TIME_FILE, type="file", uid=0, gid=0, data=data)
    return node_bundle.Bundle(node="n", sha256="0" * 64, files=(entry,))


def query_only(argv: list[str], input: str | None = None) -> tuple[int, str]:
    # The runner's own command line with -Q for -q: chronyd asks the same way and reports the
    # offset, but never sets this machine's clock.
    return run_command(["-Q" if a == "-q" else a for a in argv], input)


def test_chronyd_one_shot_with_a_real_server(
    tmp_path: Path, short_sync: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with ntp_server(tmp_path):
        assert clock.sync_clock(time_bundle("127.0.0.1"), query_only, Reporter()) is True
        # 127.0.0.2 is loopback too, where no one serves NTP: the bounded attempt gives up.
        assert clock.sync_clock(time_bundle("127.0.0.2"), query_only, Reporter()) is False
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "qlustar: time: clock set from 127.0.0.1 (via chronyd)",
        "qlustar: time: clock NOT set: no answer from 127.0.0.2 within 1s (chronyd); "
        "the boot goes on with the clock as it is",
    ]


def test_sync_off_and_no_time_file(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    assert clock.sync_clock(node_bundle_of(site, "beo-11"), run_command, Reporter()) is None
    assert clock.sync_clock(node_bundle_of(site, "beo-10"), run_command, Reporter()) is None
    out = capsys.readouterr().out.splitlines()
    assert out == ["qlustar: time: setting the clock at boot is off for this node"]


def test_runner_sets_the_clock_first_and_applies_modes(
    site: Site, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    rendered = render(site, "beo-09")
    with fake_node() as fs:
        fs.create_file("/usr/sbin/ntpd", contents="#!/bin/sh\n", st_mode=0o100755)
        fs.create_file("/usr/bin/timeout", contents="#!/bin/sh\n", st_mode=0o100755)
        fs.create_file("/usr/share/pam-configs/sss", contents="Name: SSS\n")
        head.publish(qb.bundle_json(rendered))
        with as_root():
            assert run_node(head, commands) == EXIT_OK
            assert node_mode(qb.SSSD_CONF) == "0600"
            assert node_owner(qb.SSSD_CONF) == (0, 0)
            assert node_read(qb.NSSWITCH_CONF) == files_of(rendered)[qb.NSSWITCH_CONF].content
            assert node_mode("/etc/yp.conf") == "0644"
    sync = ["timeout", "-s", "KILL", "10", "ntpd", "-n", "-q",
            "-p", "ntp1.example.org", "-p", "10.0.2.3"]  # fmt: skip
    assert commands.calls[0] == sync
    assert ["/usr/sbin/pam-auth-update", "--enable", "sss"] in commands.calls
    out = console_lines(capsys)
    assert "qlustar: time: clock set from ntp1.example.org, 10.0.2.3 (via ntpd)" in out
    # The clock step comes before anything is written.
    assert out.index("qlustar: time: clock set from ntp1.example.org, 10.0.2.3 (via ntpd)") < (
        next(i for i, line in enumerate(out) if line.startswith("qlustar: bundle applied"))
    )
    assert "qlustar: action command PAM profile mkhomedir skipped" in out
