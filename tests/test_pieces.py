"""The per-host pieces kept between builds (qlimage.pieces): what may not be taken from the
kept file, and when it is written. That kept pieces make what fresh ones do after every kind
of edit is tests/test_host_origin.py's `test_kept_pieces_make_what_fresh_ones_make`."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlimage import pieces
from qlimage.boot import pxelinux
from qlimage.bundle import sshfiles
from qlimage.serve import head
from qlimage.site import Site, load_site

from helpers import make_site

KINDS = 4  # dnsmasq, nginx, ssh, pxelinux: the pieces each host has


@pytest.fixture
def root(tmp_path: Path) -> Path:
    site = make_site(tmp_path / "site")
    (site / "bootfiles").mkdir()
    return site


def kept_file(root: Path) -> Path:
    return root / "bootfiles/.host-pieces"


def every_node_file(site: Site) -> tuple[object, ...]:
    return head.configs(site), sshfiles.render_all(site), pxelinux.host_links(site)


def built(root: Path) -> tuple[Site, tuple[object, ...]]:
    """The site loaded, its files made, its pieces kept (as a build does)."""
    site = load_site(root)
    made = every_node_file(site)
    pieces.of(site).save()
    return site, made


def test_an_unchanged_site_makes_no_piece_again(root: Path) -> None:
    site, first = built(root)
    assert pieces.of(site).new == 0  # written
    assert kept_file(root).stat().st_mode & 0o777 == 0o600
    site = load_site(root)
    assert every_node_file(site) == first
    assert pieces.of(site).new == 0


def test_hosts_of_a_file_read_whole_have_their_pieces_made_every_time(root: Path) -> None:
    """A table after the hosts: the file does not cut, its hosts have no origin, so nothing
    of theirs can be kept, and their pieces are made anew in every build."""
    path = root / "nodes.d/hosts.toml"
    path.write_text(path.read_text() + "\n[optionsets.late]\nopensm = true\n")
    site, first = built(root)
    assert not kept_file(root).exists()  # nothing made that could be kept
    site = load_site(root)
    assert every_node_file(site) == first
    assert pieces.of(site).new == 0
    assert all(o == "" for _, origins, _ in pieces.of(site).made_now.values() for o in origins)


@pytest.mark.parametrize("damage", [b"", b"not marshal", b"\xe9(\x00", None])
def test_an_unreadable_or_foreign_file_is_no_pieces(root: Path, damage: bytes | None) -> None:
    import marshal

    _, first = built(root)
    kept_file(root).write_bytes(
        marshal.dumps((pieces.FORMAT + 1, {})) if damage is None else damage
    )
    site = load_site(root)
    assert every_node_file(site) == first
    assert pieces.of(site).new == KINDS * len(site.hosts)  # every piece made afresh


def test_a_change_to_qlimage_code_drops_every_kept_piece(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, first = built(root)
    monkeypatch.setattr(pieces, "code_key", lambda: "another version of qlimage")
    site = load_site(root)
    assert every_node_file(site) == first
    assert pieces.of(site).new == KINDS * len(site.hosts)


def test_a_few_new_pieces_wait_for_the_next_write(tmp_path: Path) -> None:
    """Writing a thousand hosts' pieces costs more than making one host's again: a one-node
    edit's build leaves the file as it was, and the next build makes that node's again."""
    hosts = "".join(
        f'\n[[hosts]]\nname = "n{i:04d}"\nmac = "52:54:01:00:{i // 256:02x}:{i % 256:02x}"\n'
        f'image = "demo"\nnetworks.boot = "10.0.{100 + i // 250}.{1 + i % 250}"\n'
        for i in range(1000)
    )
    root = make_site(tmp_path / "site", extra_hosts=hosts)
    edit_site(root)
    (root / "bootfiles").mkdir()
    built(root)
    written = kept_file(root).stat().st_mtime_ns
    path = root / "nodes.d/hosts.toml"
    path.write_text(path.read_text().replace('name = "n0007"', 'name = "r0007"'))
    site, made = built(root)
    assert pieces.of(site).new == KINDS  # one host's pieces, not written
    assert kept_file(root).stat().st_mtime_ns == written
    site = load_site(root)
    assert every_node_file(site) == made
    assert pieces.of(site).new == KINDS  # made again, the others kept


def edit_site(root: Path) -> None:
    """The boot network wide enough for a thousand hosts more."""
    path = root / "site.toml"
    path.write_text(path.read_text().replace('cidr = "10.0.2.0/24"', 'cidr = "10.0.0.0/16"'))


def test_a_host_read_whole_is_made_anew_beside_hosts_with_origins(root: Path) -> None:
    """Pieces are kept for the hosts of one file, while another file's host has none: an
    edit of that host shows although no origin changed."""
    whole = root / "nodes.d/whole.toml"
    whole.write_text(
        WHOLE_HOST.format(address="10.0.2.40") + "\n[optionsets.late]\nopensm = true\n"
    )
    built(root)
    assert kept_file(root).exists()
    whole.write_text(whole.read_text().replace("10.0.2.40", "10.0.2.41"))
    site = load_site(root)
    assert every_node_file(site) == fresh(root)


WHOLE_HOST = """\
[[hosts]]
name = "whole-01"
mac = "52:54:00:12:35:01"
image = "demo"
networks.boot = "{address}"
"""


def fresh(root: Path) -> tuple[object, ...]:
    kept_file(root).unlink()
    return every_node_file(load_site(root))
