"""Site loading after a one-node edit: the inventory parsed and validated host by host
(qlimage/site/inventory.py), and the per-host checks' fast paths, always saying exactly what
tomllib, the schema and the slow checks say about the whole file."""

from __future__ import annotations

import ipaddress
import json
import random
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qlimage.errors import ConfigError
from qlimage.site import inventory, load_site
from qlimage.site import load as site_load
from qlimage.site.model import Network, Site

from helpers import edit

SiteFactory = Callable[..., Path]

# --- the cut: pieces that parse alone give what tomllib gives for the whole file ------------


def whole(blob: bytes) -> dict[str, Any] | str:
    """tomllib's answer for the whole file: its data, or its error text."""
    try:
        return tomllib.loads(blob.decode())
    except (ValueError, RecursionError) as e:
        return f"{type(e).__name__}: {e}"


def pieces(blob: bytes, known: dict[str, Any] | None = None) -> dict[str, Any] | None:
    parsed = inventory.parse(blob, known or {})
    return None if parsed is None else parsed.data


HOST = '[[hosts]]\nname = "{n}"\nmac = "52:54:00:00:00:{i:02x}"\nnetworks.boot = "10.0.0.{i}"\n'
PREFIX = '[optionsets.compute]\nrootfs = ["demo"]\n\n[groups.rack1]\noptionsets = ["compute"]\n\n'
PLAIN = PREFIX + "".join(HOST.format(n=f"n{i}", i=i) for i in range(1, 6))

# Texts the cut takes apart: (what, text); each must equal tomllib on the whole file.
SPLITS = [
    ("plain", PLAIN),
    ("no final newline", PLAIN.rstrip("\n")),
    ("CRLF line ends", PLAIN.replace("\n", "\r\n")),
    (
        "comments and blank lines",
        "# inventory\n" + PLAIN.replace("[[hosts]]\n", "# next\n\n[[hosts]]   # a rack\n"),
    ),
    (
        "sub-tables and nested arrays of a host",
        PREFIX + '[[hosts]]\nname = "a"\n[hosts.options]\nopensm = true\n[[hosts.disks]]\n'
        'dev = "sda"\n[[hosts.disks]]\ndev = "sdb"\n[hosts.networks.boot]\naddress = "10.0.0.1"\n'
        '[[hosts]]\nname = "b"\n[hosts.options.network]\nmtu = 9000\n',
    ),
    (
        "a multi-line string that does not hold a header line",
        '[[hosts]]\nname = "a"\nnote = """\n  [[hosts]]\nx"""\n[[hosts]]\nname = "b"\n',
    ),
    ("only a prefix", PREFIX),
    ("empty", ""),
    ("hosts but no prefix", HOST.format(n="a", i=1) + HOST.format(n="b", i=2)),
    (
        "identical hosts",
        HOST.format(n="a", i=1) + HOST.format(n="a", i=1) + HOST.format(n="a", i=1),
    ),
    ("non-ASCII text", PLAIN.replace('"n3"', '"nö3"') + "# Grüße\n"),
]

# Texts the cut must refuse (the caller then parses them whole).
FALLS_BACK = [
    (
        "a multi-line string holding a [[hosts]] line",
        '[[hosts]]\nname = "a"\nnote = """\n[[hosts]]\nname = "b"\n"""\n[[hosts]]\nname = "c"\n',
    ),
    (
        "a literal multi-line string holding a [[hosts]] line",
        "[[hosts]]\nname = 'a'\nnote = '''\n[[hosts]]\n'''\n",
    ),
    ("a table after the hosts", PLAIN + '\n[optionsets.late]\nrootfs = ["x"]\n'),
    ("an array of tables after the hosts", PLAIN + "[[other]]\nx = 1\n"),
    ("an inline hosts array in the prefix", 'hosts = [{ name = "a" }]\n'),
    ("an inline hosts array, then a header", 'hosts = [{ name = "a" }]\n' + PLAIN),
    ("a dotted hosts key in the prefix", "hosts.a = 1\n" + PLAIN),
    ("a [hosts] table in the prefix", '[hosts]\nname = "a"\n'),
    ("a [hosts] table after [[hosts]]", '[[hosts]]\nname = "a"\n[hosts]\nname = "b"\n'),
    ("a spaced header inside a chunk", PLAIN + '[[ hosts ]]\nname = "z"\n'),
    ("a quoted header inside a chunk", PLAIN + '[["hosts"]]\nname = "z"\n'),
    ("a BOM", "\ufeff" + PLAIN),
    ("a host that does not parse", PLAIN.replace('name = "n3"', 'name = "n3')),
    ("a duplicate key in a host", PLAIN.replace('name = "n3"', 'name = "n3"\nname = "n4"')),
    ("a bare CR", PLAIN.replace('name = "n2"\n', 'name = "n2"\r')),
    ("a prefix that does not parse", "[optionsets.x\n" + PLAIN),
    ("an unterminated array before the hosts", "a = [\n" + PLAIN),
    ("a table redefined across the cut", '[[hosts]]\nname = "a"\n[hosts.o]\nx = 1\n[hosts.o]\n'),
]


@pytest.mark.parametrize(("what", "text"), SPLITS, ids=[w for w, _ in SPLITS])
def test_the_cut_gives_what_tomllib_gives(what: str, text: str) -> None:
    blob = text.encode()
    expected = whole(blob)
    assert isinstance(expected, dict), expected
    assert pieces(blob) == expected
    # With every chunk known (the cache of the last run): the same, nothing parsed again.
    first = inventory.parse(blob, {})
    assert first is not None
    again = inventory.parse(blob, dict(zip(first.digests, first.hosts, strict=True)))
    assert again is not None and again.data == expected and again.new == []


@pytest.mark.parametrize(("what", "text"), FALLS_BACK, ids=[w for w, _ in FALLS_BACK])
def test_the_cut_refuses_what_it_cannot_prove(what: str, text: str) -> None:
    assert pieces(text.encode()) is None, what


def test_the_cut_refuses_bytes_that_are_not_utf8() -> None:
    blob = PLAIN.replace('"n3"', '"n\udcff3"').encode("utf-8", "surrogateescape")
    assert str(whole(blob)).startswith("UnicodeDecodeError")
    assert pieces(blob) is None


# Lines from which random inventories are made: headers, keys, strings and arrays that open
# on one line and close on another, comments, CRLF. Many combinations are invalid TOML.
FRAGMENTS = [
    "[[hosts]]", "[[hosts]]  # c", "[[hosts]]\r", "[[ hosts ]]", " [[hosts]]", "[hosts]",
    "[hosts.options]", "[[hosts.disks]]", "[optionsets.a]", "[groups.g]", "[[other]]",
    'name = "a"', 'name = "b"', "x = 1", "x = 2", "y.z = true", "hosts = []", "hosts.q = 1",
    'note = """', '"""', "note = '''", "'''", "arr = [", "1,", "]", "t = { a = 1 }", "# c",
    "", "\r", 'k = "[[hosts]]"', "a = 'x'", "\ufeff",
]  # fmt: skip


def test_random_inventories_cut_or_refuse_never_differ() -> None:
    rng = random.Random(13)
    outcomes = {"cut": 0, "refused": 0, "invalid whole": 0}
    for _ in range(3000):
        lines = [rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 14))]
        text = "\n".join(lines) + rng.choice(["", "\n"])
        blob = text.encode()
        expected, got = whole(blob), pieces(blob)
        if got is not None:
            assert got == expected, text  # a cut that parses is the whole file's data
            outcomes["cut"] += 1
        else:
            outcomes["refused"] += 1
        if not isinstance(expected, dict):
            outcomes["invalid whole"] += 1
    # The sample must exercise both ways, and files tomllib refuses.
    assert min(outcomes.values()) > 100, outcomes


def test_only_new_chunks_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    text = PREFIX + "".join(HOST.format(n=f"n{i}", i=i) for i in range(1, 50))
    first = inventory.parse(text.encode(), {})
    assert first is not None and first.new == list(range(49))
    known = dict(zip(first.digests, first.hosts, strict=True))
    edited = text.replace('name = "n20"', 'name = "m20"').replace(PREFIX, "")
    edited = HOST.format(n="new", i=99) + edited  # every host moves one place down
    parsed_pieces: list[bytes] = []
    real = inventory.parse_piece

    def counting(piece: bytes) -> dict[str, Any] | None:
        parsed_pieces.append(piece)
        return real(piece)

    monkeypatch.setattr(inventory, "parse_piece", counting)
    again = inventory.parse(edited.encode(), known)
    assert again is not None and again.data == tomllib.loads(edited)
    assert again.new == [0, 20]
    # The (empty) prefix, then the renamed host and the new one (last first): nothing else.
    assert parsed_pieces[0] == b"" and len(parsed_pieces) == 3
    assert b'"m20"' in parsed_pieces[1]
    assert parsed_pieces[2] == HOST.format(n="new", i=99).encode()


def test_empty_lines_that_end_a_chunk_are_not_part_of_its_digest() -> None:
    """A host appended after a blank line, or blank lines between hosts, leave the host
    before known (its origin, hence its bundle key, unchanged); a stray carriage return at
    the end is no line end: parsed, and refused as tomllib refuses it."""
    first = inventory.parse(PLAIN.encode(), {})
    assert first is not None
    known = dict(zip(first.digests, first.hosts, strict=True))
    for spaced in (
        PLAIN.replace("\n[[hosts]]", "\n\n\n[[hosts]]"),
        PLAIN.replace("\n[[hosts]]", "\n\r\n\n[[hosts]]") + "\n\n",
        PLAIN + "\n" + HOST.format(n="n9", i=9),
    ):
        again = inventory.parse(spaced.encode(), known)
        assert again is not None and again.data == whole(spaced.encode())
        assert again.digests[:5] == first.digests and again.new == [5] * (len(again.hosts) > 5)
    stray = (PLAIN + "\r").encode()
    assert inventory.parse(stray, known) is None
    assert str(whole(stray)).startswith("TOMLDecodeError")


def test_tables_known_from_another_file_never_differ_from_tomllib() -> None:
    """Chunks known by digest from a file that differs in its line ends (blank lines, CRLF,
    stray carriage returns): the cut still gives what tomllib gives, or is refused."""
    rng = random.Random(17)
    body = ['name = "a"', "x = 1", "y.z = true", "t = { a = 1 }", "# c", "", "[hosts.o]", "q = 2"]
    # Mostly line ends that keep the text valid; now and then one that does not.
    ends = ["\n", "\n\n", "\r\n", "\r\n\r\n", "\n\r\n", "  \n", "\r", "", "\n\r"]
    weights = [40, 10, 10, 5, 5, 5, 1, 1, 1]

    def spelled(lines: list[str]) -> str:
        return "".join(line + rng.choices(ends, weights)[0] for line in lines)

    outcomes = {"reused": 0, "refused": 0}
    for _ in range(2000):
        lines = []
        for _ in range(rng.randint(1, 4)):
            lines += ["[[hosts]]", *rng.sample(body, rng.randint(1, 4))]
        first = inventory.parse(spelled(lines).encode(), {})
        if first is None:
            continue
        text = spelled(lines).encode()
        again = inventory.parse(text, dict(zip(first.digests, first.hosts, strict=True)))
        if again is None:
            outcomes["refused"] += 1
        else:
            assert again.data == whole(text), text
            outcomes["reused"] += len(again.hosts) - len(again.new)
    assert min(outcomes.values()) > 100, outcomes


# --- load_site with the validation cache --------------------------------------------------


def big_site(site_factory: SiteFactory, hosts: int = 300) -> Path:
    """The test site with `hosts` more hosts on a /16, and a bootfiles directory, so that the
    validation cache is kept (a site never built keeps none)."""
    root = site_factory()
    edit(root / "site.toml", 'cidr = "10.0.2.0/24"', 'cidr = "10.0.0.0/16"')
    extra = "".join(
        f'\n[[hosts]]\nname = "n{n:04d}"\nmac = "52:54:01:00:{n >> 8:02x}:{n & 255:02x}"\n'
        f'image = "demo"\nnetworks.boot = "10.0.{3 + n // 250}.{1 + n % 250}"\n'
        for n in range(hosts)
    )
    nodes = root / "nodes.d/cluster.toml"
    nodes.write_text(nodes.read_text() + extra)
    (root / "bootfiles").mkdir()
    return root


def cache_file(root: Path) -> Path:
    return root / "bootfiles/.validated.json"


def uncached(root: Path) -> Site:
    """The site loaded with no cache at all: what every cached load must equal."""
    cache_file(root).unlink(missing_ok=True)
    return load_site(root)


def problems_of(root: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_site(root)
    return e.value.problems


class Counter:
    """Counts what load_site parses and validates (the real functions do the work)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pieces: list[bytes] = []
        self.validated: list[Any] = []
        parse_piece, validate = inventory.parse_piece, site_load.validate

        def counting_parse(piece: bytes) -> dict[str, Any] | None:
            self.pieces.append(piece)
            return parse_piece(piece)

        def counting_validate(data: Any, schema_name: str, where: str) -> list[str]:
            self.validated.append(data)
            return validate(data, schema_name, where)

        monkeypatch.setattr(inventory, "parse_piece", counting_parse)
        monkeypatch.setattr(site_load, "validate", counting_validate)

    def reset(self) -> None:
        self.pieces.clear()
        self.validated.clear()


def test_one_host_edit_parses_and_validates_that_host_only(
    site_factory: SiteFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = big_site(site_factory)
    nodes = root / "nodes.d/cluster.toml"
    count = Counter(monkeypatch)
    load_site(root)
    assert len(count.pieces) == 1 + 302  # the prefix and every host, once

    count.reset()
    load_site(root)
    assert count.pieces == [] and count.validated == []  # unchanged: nothing parsed

    count.reset()
    edit(nodes, 'name = "n0150"', 'name = "r0150"')
    cached = load_site(root)
    assert [p for p in count.pieces if b"[[hosts]]" in p] == [
        p for p in count.pieces if b'"r0150"' in p
    ]
    assert len(count.pieces) == 2  # the prefix (cut again) and the edited host
    assert [d.get("hosts", [{}])[0].get("name") for d in count.validated] == ["r0150"]
    assert cached == uncached(root)
    assert cached.host("r0150").addresses[0].address == "10.0.3.151"


def test_an_invalid_edit_is_reported_as_the_whole_file_check_reports_it(
    site_factory: SiteFactory,
) -> None:
    root = big_site(site_factory)
    nodes = root / "nodes.d/cluster.toml"
    load_site(root)
    # A new host first: every later host moves one place, and the error names the new place.
    new = 'name = "x"\nmac = "52:54:01:ff:00:01"\nimage = "demo"\nnetworks.boot = "10.0.9.9"\n'
    edit(nodes, '[[hosts]]\nname = "n0000"', f'[[hosts]]\n{new}\n[[hosts]]\nname = "n0000"')
    edit(nodes, 'name = "n0200"\nmac = "52:54:01:00:00:c8"', 'name = "n0200"\nmac = "zz"')
    raw = tomllib.loads(nodes.read_text())
    full = site_load.validate(raw, "nodes", "nodes.d/cluster.toml")
    assert len(full) == 1 and ".hosts[203].mac" in full[0], full
    assert problems_of(root) == full


def test_a_chunk_that_stops_parsing_gets_tomllibs_message_for_the_whole_file(
    site_factory: SiteFactory,
) -> None:
    root = big_site(site_factory)
    nodes = root / "nodes.d/cluster.toml"
    load_site(root)
    edit(nodes, 'name = "n0100"', 'name = "n0100')
    with pytest.raises(tomllib.TOMLDecodeError) as e:
        tomllib.loads(nodes.read_text())
    assert problems_of(root) == [f"nodes.d/cluster.toml: {e.value}"]
    line = nodes.read_text().splitlines().index('name = "n0100') + 1
    assert f"(at line {line}," in str(e.value)  # the whole file's line, not the chunk's (2)


def test_a_bom_gets_the_whole_files_message(site_factory: SiteFactory) -> None:
    root = big_site(site_factory)
    load_site(root)
    nodes = root / "nodes.d/cluster.toml"
    nodes.write_bytes(b"\xef\xbb\xbf" + nodes.read_bytes())
    with pytest.raises(tomllib.TOMLDecodeError) as e:
        tomllib.loads(nodes.read_text())
    assert problems_of(root) == [f"nodes.d/cluster.toml: {e.value}"]


def test_an_inventory_that_does_not_cut_loads_the_whole_way(
    site_factory: SiteFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = big_site(site_factory)
    nodes = root / "nodes.d/cluster.toml"
    # A table after the hosts: a valid file the cut refuses.
    nodes.write_text(nodes.read_text() + '\n[optionsets.late]\nrootfs = ["tweaks"]\n')
    site = load_site(root)
    assert site == uncached(root)
    count = Counter(monkeypatch)
    load_site(root)  # the cache written by the whole way, which an unchanged file hits...
    assert count.pieces == [] and count.validated == []
    edit(nodes, 'name = "n0007"', 'name = "r0007"')
    assert load_site(root).host("r0007").name == "r0007"
    # ...still validates only the edited host (the whole file's host-by-host check).
    assert [d["hosts"][0]["name"] for d in count.validated if d.get("hosts")] == ["r0007"]


def test_duplicate_hosts_are_reported_with_and_without_the_cache(
    site_factory: SiteFactory,
) -> None:
    root = big_site(site_factory)
    nodes = root / "nodes.d/cluster.toml"
    load_site(root)
    text = nodes.read_text()
    start = text.index('[[hosts]]\nname = "n0005"')
    chunk = text[start : text.index("[[hosts]]", start + 1)]
    nodes.write_text(text + "\n" + chunk)  # the same bytes twice: one chunk digest, two hosts
    first = problems_of(root)
    assert any("name 'n0005' is already used by" in p for p in first), first
    assert problems_of(root) == first


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # torn
        lambda text: "[]",
        lambda text: json.dumps({k: [v[0], 1, 2, 3] for k, v in json.loads(text).items()}),
        lambda text: json.dumps(
            {k: [*v[:3], [["x", "not a table"]]] for k, v in json.loads(text).items()}
        ),
        lambda text: json.dumps(
            {k: [v[0], *v[1:3], [[["x"], {}]]] for k, v in json.loads(text).items()}
        ),
    ],
    ids=["torn", "not a table", "wrong types", "bad pair", "unhashable digest"],
)
def test_a_damaged_cache_means_full_work_never_a_wrong_site(
    site_factory: SiteFactory, damage: Callable[[str], str]
) -> None:
    root = big_site(site_factory, hosts=20)
    expected = load_site(root)
    cache = cache_file(root)
    cache.write_text(damage(cache.read_text()))
    assert load_site(root) == expected


def test_a_cache_of_another_digest_rule_is_parsed_again(
    site_factory: SiteFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk digests name the hosts' origins: a file remembered under another rule (an older
    qlimage's) is not served with its digests, which the next edit would change all at once."""
    root = big_site(site_factory, hosts=20)
    expected = load_site(root)
    cache = json.loads(cache_file(root).read_text())
    entry = cache[str(root / "nodes.d/cluster.toml")]
    assert entry[1].startswith(inventory.DIGEST_RULE)
    entry[1] = entry[1][len(inventory.DIGEST_RULE) :]
    entry[3] = [["0" * 32, table] for _, table in entry[3]]  # no digest this rule makes
    cache_file(root).write_text(json.dumps(cache))
    count = Counter(monkeypatch)
    again = load_site(root)
    assert len(count.pieces) == 1 + 22  # the prefix and every host
    assert again == expected
    assert [again.origin(h) for h in again.hosts] == [expected.origin(h) for h in expected.hosts]


def test_a_cache_of_the_whole_way_serves_until_the_first_edit(
    site_factory: SiteFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry read() writes (as every inventory had before the cut): kept while the file
    is unchanged, replaced by the cut's at the next edit."""
    root = big_site(site_factory, hosts=20)
    expected = load_site(root)
    nodes = root / "nodes.d/cluster.toml"
    cache = site_load.ValidationCache(cache_file(root))
    assert cache.read(nodes, "nodes", "nodes.d/cluster.toml", []) == tomllib.loads(
        nodes.read_text()
    )
    cache.save()
    assert len(json.loads(cache_file(root).read_text())[str(nodes)]) == 2
    count = Counter(monkeypatch)
    assert load_site(root) == expected
    assert count.pieces == [] and count.validated == []
    edit(nodes, 'name = "n0007"', 'name = "r0007"')
    edited = load_site(root)
    entries = json.loads(cache_file(root).read_text())
    assert len(entries[str(nodes)]) == 4 and site_load.HOSTS_SLOT + str(nodes) not in entries
    assert edited == uncached(root)


# --- the per-host checks' fast paths say what the slow ones say ------------------------------


NETWORKS = ["10.0.0.0/16", "10.0.2.0/24", "192.168.7.0/30", "10.9.9.8/31", "10.9.9.9/32"]


@pytest.mark.parametrize("cidr", NETWORKS)
def test_usable_agrees_with_unusable_address(cidr: str) -> None:
    net = Network("boot", ipaddress.IPv4Network(cidr), None, None, True, "")
    low, high = int(net.cidr.network_address), int(net.cidr.broadcast_address)
    values = {low - 2, low - 1, low, low + 1, low + 2, high - 1, high, high + 1, high + 2}
    addresses = [str(ipaddress.IPv4Address(v)) for v in sorted(values) if 0 <= v < 2**32]
    for head in ["10.0.2.2", "192.168.7.1", "10.9.9.9", str(net.cidr.network_address)]:
        for address in [*addresses, head, "0.0.0.0", "255.255.255.255"]:
            slow = site_load.unusable_address(address, net, head)
            assert site_load.usable(address, site_load.host_range(net), head) == (not slow), (
                address,
                head,
                slow,
            )


def test_canonical_ipv4_reads_what_ipaddress_reads_and_nothing_else() -> None:
    texts = ["10.0.0.1", "0.0.0.0", "255.255.255.255", "192.168.100.200", "10.0.0.01"]
    texts += ["010.0.0.1", "10.0.0.256", "10.0.0", "10.1", "0x0a.0.0.1", "10.0.0.1.", " 10.0.0.1"]
    texts += ["10.0.0.1\n", "10.0.0.1 ", "10.0.0.1\x00", "\u0661\u0660.0.0.1", "", "1e1.0.0.1"]
    for text in texts:
        try:
            expected: int | None = int(ipaddress.IPv4Address(text))
        except ValueError:
            expected = None
        assert site_load.canonical_ipv4(text) == expected, text
    net = Network("boot", ipaddress.IPv4Network("10.0.0.0/16"), None, None, True, "")
    assert not site_load.usable("10.0.0.01", site_load.host_range(net), "10.0.0.9")


def test_unicast_mac_agrees_with_the_octet_reading() -> None:
    rng = random.Random(7)
    macs = ["00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "33:33:00:00:00:01"]
    macs += ["02:00:00:00:00:00", "00:00:00:00:00:01", "FE:ED:fa:ce:00:00", "52:54:00:12:34:56"]
    macs += [":".join(f"{rng.randrange(256):02x}" for _ in range(6)) for _ in range(500)]
    for mac in macs:
        octets = [int(part, 16) for part in mac.split(":")]
        assert site_load.unicast_mac(mac) == (any(octets) and not octets[0] & 1), mac


def test_address_problems_are_worded_as_before(site_factory: SiteFactory) -> None:
    root = big_site(site_factory, hosts=4)
    nodes = root / "nodes.d/cluster.toml"
    for old, new, words in [
        ('"10.0.3.1"', '"10.1.0.1"', "10.1.0.1 is outside 10.0.0.0/16"),
        ('"10.0.3.1"', '"10.0.0.0"', "10.0.0.0 is the network address of 10.0.0.0/16;"),
        ('"10.0.3.1"', '"10.0.255.255"', "10.0.255.255 is the broadcast address of 10.0.0.0/16;"),
        ('"10.0.3.1"', '"10.0.2.2"', "10.0.2.2 is the head's own address"),
    ]:
        edit(nodes, old, new)
        problems = problems_of(root)
        assert len(problems) == 1 and words in problems[0], problems
        assert problems[0].startswith("nodes.d/cluster.toml: .hosts[2].networks.boot: ")
        edit(nodes, new, old)
    load_site(root)
