"""The node runner's cluster files step (qlimage/node/runner/cluster.py): after the bundle, it
installs the cluster-wide files the head serves once for all nodes (qlustar/cluster/:
ssh_known_hosts, shosts.equiv and their SHA256SUMS, written by the build: test_sshfiles.py).

Runs are simulated on the fake node (tests/fake_node.py): the head is a dict of URLs that
answers 404 for what it does not serve. The sums are made by the head's own code
(sshfiles.sums), so the two sides are tested against each other; one test fetches from a real
HTTP server serving a built site's qlustar tree.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import urllib.error
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from qlimage import contract
from qlimage.bundle import sshfiles
from qlimage.layout import Layout
from qlimage.node.runner import cluster
from qlimage.node.runner.fetch import fetch_url
from qlimage.node.runner.main import EXIT_OK, EXIT_PARTIAL
from qlimage.node.runner.report import Reporter
from qlimage.serve import vm
from qlimage.site import load_site

from fake_node import (
    BASE,
    Commands,
    Head,
    console_lines,
    executable,
    file_entry,
    make_bundle,
    node_mode,
    node_owner,
    node_read,
    run_node,
    snapshot,
)
from helpers import KEY_ED25519

pytestmark = pytest.mark.usefixtures("node_env")

SUMS_URL = f"{BASE}/cluster/SHA256SUMS"
KNOWN = "# ssh_known_hosts of the cluster\nbeo-01,10.0.2.15 " + KEY_ED25519 + "\n"
EQUIV = "# shosts.equiv of the cluster\nbeo-01\n10.0.2.15\n"
FILES = {"ssh_known_hosts": KNOWN, "shosts.equiv": EQUIV}
NODE_PATHS = {
    "ssh_known_hosts": "/etc/ssh/ssh_known_hosts",
    "shosts.equiv": "/etc/ssh/shosts.equiv",
}
ATTEMPTS = 4  # fake_node's node_env: three retries without pauses


def url(name: str) -> str:
    return f"{BASE}/cluster/{name}"


def serve(head: Head, files: dict[str, str], sums: str | None = None) -> None:
    """An empty bundle (it writes nothing: what changes on the node is the cluster step's),
    the files, and their SHA256SUMS as the build writes it unless `sums` is given."""
    head.publish(make_bundle())
    for name, text in files.items():
        head.documents[url(name)] = text.encode()
    head.documents[SUMS_URL] = (sums if sums is not None else sshfiles.sums(files)).encode()


def cluster_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in console_lines(capsys) if line.startswith("qlustar: cluster files:")]


def test_node_paths_and_mode_are_the_contracts() -> None:
    assert dict(contract.CLUSTER_FILES) == NODE_PATHS
    assert contract.CLUSTER_FILE_MODE == 0o644
    assert {f.name: f.node_path for f in sshfiles.HOST_FILES} == NODE_PATHS


def test_installs_every_listed_file_0644_root(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    # An older copy, of another owner (the fake node's uid) and mode, is replaced whole.
    nodefs.create_file("/etc/ssh/ssh_known_hosts", contents="old\n", st_mode=0o100600)
    assert node_owner("/etc/ssh/ssh_known_hosts") != (0, 0)
    serve(head, FILES)
    head.publish(make_bundle([file_entry("/etc/motd", "hello\n")]))

    assert run_node(head, commands) == EXIT_OK

    for name, path in NODE_PATHS.items():
        assert node_read(path) == FILES[name].encode()
        assert (node_mode(path), node_owner(path)) == ("0644", (0, 0)), path
    assert node_read("/etc/motd") == b"hello\n"  # the bundle came first
    assert head.requests[-3:] == [SUMS_URL, url("shosts.equiv"), url("ssh_known_hosts")]
    assert cluster_lines(capsys) == [
        "qlustar: cluster files: installed /etc/ssh/shosts.equiv, /etc/ssh/ssh_known_hosts"
    ]


def test_creates_a_missing_etc_ssh_0755(
    nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    serve(head, FILES)

    assert run_node(head, commands) == EXIT_OK

    assert (node_mode("/etc/ssh"), node_owner("/etc/ssh")) == ("0755", (0, 0))


def test_checksum_mismatch_installs_nothing_and_is_partial(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    nodefs.create_file("/etc/ssh/ssh_known_hosts", contents="old\n")
    serve(head, FILES)
    head.documents[url("shosts.equiv")] = b"evil.example.org\n"  # not what SHA256SUMS says
    before = snapshot()

    assert run_node(head, commands) == EXIT_PARTIAL

    # Nothing written: not even the file that verified (known_hosts is listed first).
    assert snapshot() == before
    assert node_read("/etc/ssh/ssh_known_hosts") == b"old\n"
    # Retried like the bundle (the head may be rewriting the files), then one console line.
    assert head.requests.count(SUMS_URL) == ATTEMPTS
    [line] = cluster_lines(capsys)
    assert line.startswith(f"qlustar: cluster files: cannot fetch {BASE}/cluster/: ")
    assert f"checksum mismatch for {url('shosts.equiv')}" in line
    assert line.endswith("; none installed")


def test_rest_of_the_run_goes_on_after_a_failure(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    executable(nodefs, "/lib/qlustar/init.d/10-x")
    serve(head, FILES)
    del head.documents[url("ssh_known_hosts")]  # listed, but not served: a 404, not retried
    head.publish(make_bundle(actions=[{"kind": "command", "argv": ["/usr/bin/true"]}]))

    assert run_node(head, commands) == EXIT_PARTIAL

    assert commands.calls == [["/usr/bin/true"], ["/lib/qlustar/init.d/10-x"]]
    assert head.requests.count(url("ssh_known_hosts")) == 1
    out = console_lines(capsys)
    assert (
        f"qlustar: cluster files: cannot fetch {BASE}/cluster/: HTTP 404 Not Found; none installed"
        in out
    )
    assert out[-1].startswith("qlustar: runner done: ")


def test_transient_failures_are_retried(
    nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    serve(head, FILES)
    flaky = Flaky(head, {SUMS_URL: 1, url("ssh_known_hosts"): 2})

    assert cluster.install_cluster_files(BASE, flaky.fetch, Reporter())

    assert node_read("/etc/ssh/ssh_known_hosts") == KNOWN.encode()


def test_an_unreachable_head_is_partial_not_a_crash(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    serve(head, FILES)
    flaky = Flaky(head, {SUMS_URL: ATTEMPTS})

    assert not cluster.install_cluster_files(BASE, flaky.fetch, Reporter())

    assert cluster_lines(capsys) == [
        f"qlustar: cluster files: cannot fetch {BASE}/cluster/: Connection reset; none installed"
    ]


def test_a_head_without_cluster_files_is_skipped(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    head.publish(make_bundle())

    assert run_node(head, commands) == EXIT_OK

    assert head.requests.count(SUMS_URL) == 1  # a 404 is an answer: no retry
    assert cluster_lines(capsys) == [
        "qlustar: cluster files: the head serves no SHA256SUMS; skipped"
    ]


HOSTILE_NAMES = [
    "../../etc/shadow",
    "/etc/passwd",
    "ssh/../../../root/.ssh/authorized_keys",
    "sub/ssh_known_hosts",
    "ssh_known_hosts/..",
    "..",
    ".",
    "authorized_keys",
    "ssh_known_hosts ",  # not the same name
    "SSH_KNOWN_HOSTS",
]


def test_unknown_and_hostile_names_are_ignored(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    planted = {name: "root::0:0::/root:/bin/sh\n" for name in HOSTILE_NAMES}
    sums = sshfiles.sums({**planted, "ssh_known_hosts": KNOWN})
    sums += "not a sums line\n" + "0" * 63 + "  shosts.equiv\n"  # malformed: ignored too
    serve(head, {"ssh_known_hosts": KNOWN, **planted}, sums)
    before = snapshot()

    assert run_node(head, commands) == EXIT_OK

    after = snapshot()
    changed = {p for p in after.keys() | before.keys() if after.get(p) != before.get(p)}
    assert changed == {"/etc/ssh", "/etc/ssh/ssh_known_hosts"}
    assert node_read("/etc/ssh/ssh_known_hosts") == KNOWN.encode()
    assert [u for u in head.requests if "/cluster/" in u] == [SUMS_URL, url("ssh_known_hosts")]
    assert cluster_lines(capsys) == ["qlustar: cluster files: installed /etc/ssh/ssh_known_hosts"]


def test_sums_in_binary_mode_and_any_case_are_read(
    nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    digest = hashlib.sha256(EQUIV.encode()).hexdigest().upper()
    serve(head, {"shosts.equiv": EQUIV}, f"{digest} *shosts.equiv\r\n")

    assert run_node(head, commands) == EXIT_OK

    assert node_read("/etc/ssh/shosts.equiv") == EQUIV.encode()


def test_a_name_listed_twice_with_two_digests_installs_nothing(
    nodefs: FakeFilesystem, head: Head, commands: Commands
) -> None:
    other = hashlib.sha256(b"other\n").hexdigest()
    serve(head, FILES, sshfiles.sums(FILES) + f"{other}  ssh_known_hosts\n")

    assert run_node(head, commands) == EXIT_PARTIAL

    assert not any(p.startswith("/etc/ssh") for p in snapshot())


def test_a_directory_in_the_way_installs_nothing(
    nodefs: FakeFilesystem, head: Head, commands: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    nodefs.create_dir("/etc/ssh/shosts.equiv")
    serve(head, FILES)

    assert run_node(head, commands) == EXIT_PARTIAL

    assert not nodefs.exists("/etc/ssh/ssh_known_hosts")
    [line] = cluster_lines(capsys)
    assert line.startswith(
        "qlustar: cluster files: cannot install: files[0] (/etc/ssh/shosts.equiv)"
    )


class Flaky:
    """The head, with connection resets on given URLs for their first n requests."""

    def __init__(self, head: Head, failures: dict[str, int]) -> None:
        self.head = head
        self.failures = dict(failures)

    def fetch(self, url: str) -> bytes:
        if self.failures.get(url, 0) > 0:
            self.failures[url] -= 1
            raise urllib.error.URLError("Connection reset")
        return self.head.fetch(url)


# --- against a real web server serving a built site ------------------------------------------


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_tree(top: Path) -> Iterator[str]:
    """A loopback web server for `top`; yields the base URL of its qlustar tree."""
    handler = functools.partial(QuietHandler, directory=str(top))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/{contract.QLUSTAR_DIR}"
        finally:
            server.shutdown()


@pytest.mark.tools
@pytest.mark.network
def test_fetches_a_built_sites_files_over_http(built_site: Path, tmp_path: Path) -> None:
    layout = Layout(built_site / "bootfiles")
    served = {name: layout.cluster_file(name).read_bytes() for name, _ in contract.CLUSTER_FILES}
    with http_tree(built_site / "bootfiles") as base:
        assert cluster.fetch_verified(base, fetch_url, Reporter()) == served
    with http_tree(tmp_path) as base:
        assert cluster.fetch_verified(base, fetch_url, Reporter()) is None  # a 404: skipped
        sums = tmp_path / contract.QLUSTAR_DIR / contract.cluster_path(contract.CLUSTER_SUMS)
        sums.parent.mkdir(parents=True)
        sums.write_text(sshfiles.sums({"ssh_known_hosts": KNOWN}))
        with pytest.raises(urllib.error.HTTPError, match="404"):  # listed, not served
            cluster.fetch_verified(base, fetch_url, Reporter())


@pytest.mark.boot
@pytest.mark.network
def test_a_booting_node_installs_the_served_files(built_site: Path) -> None:
    """QEMU: the real runner on a real node installs the files the build serves, and its run
    ends with status 0 (init.qlustar logs any other)."""
    site = load_site(built_site)
    result = vm.boot(site, "beo-01", timeout=240)
    log = "\n".join(result.console)
    assert result.ok, f"{result.reason}\n{result.tail(60)}"
    installed = "qlustar: cluster files: installed /etc/ssh/shosts.equiv, /etc/ssh/ssh_known_hosts"
    assert log.index("qlustar: bundle applied: ") < log.index(installed), log
    assert "node runner exited with status" not in log
