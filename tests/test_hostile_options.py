"""Bad values of the time, sssd and nis options: each refused at validation with one line
naming the file and the field, nothing served changed (helpers.assert_refused)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_refused, write_site

SSSD = (
    'domain = "example.org"\nuris = ["ldaps://ldap.example.org"]\n'
    'search_base = "dc=example,dc=org"\n'
)

# (id, the options table of beo-02 in TOML, a text the error line must contain)
CASES = [
    (
        "time-server-with-newline",
        'time = { servers = ["10.0.2.2\\nrefclock SHM 0"] }',
        "servers[0]",
    ),
    ("time-server-with-space", 'time = { servers = ["head iburst minpoll 0"] }', "servers[0]"),
    ("time-server-option-like", 'time = { servers = ["-x"] }', "servers[0]"),
    ("time-no-servers", "time = { servers = [] }", "servers"),
    ("time-unknown-field", 'time = { server = "head" }', "unknown field"),
    (
        "sssd-bind-password",
        f'sssd = {{ bind_password = "s3cret" }}\n[hosts.options.sssd]\n{SSSD}',
        "bind_password",
    ),
    (
        "sssd-uri-not-ldap",
        '[hosts.options.sssd]\ndomain = "e"\nuris = ["http://x"]\nsearch_base = "dc=e"\n',
        "uris[0]",
    ),
    (
        "sssd-uri-newline",
        '[hosts.options.sssd]\ndomain = "e"\nuris = ["ldap://x\\n[sssd]"]\nsearch_base = "dc=e"\n',
        "uris[0]",
    ),
    (
        "sssd-section-in-domain",
        '[hosts.options.sssd]\ndomain = "e]\\n[x"\nuris = ["ldap://x"]\nsearch_base = "dc=e"\n',
        "domain",
    ),
    (
        "sssd-base-newline",
        '[hosts.options.sssd]\ndomain = "e"\nuris = ["ldap://x"]\n'
        'search_base = "dc=e\\nid_provider = files"\n',
        "search_base",
    ),
    (
        "sssd-filter-comment",
        f'[hosts.options.sssd]\n{SSSD}access_filter = "(uid=*) # x"\n',
        "access_filter",
    ),
    ("sssd-cacert-relative", f'[hosts.options.sssd]\n{SSSD}tls_cacert = "ca.pem"\n', "tls_cacert"),
    ("sssd-unknown-provider", f'[hosts.options.sssd]\n{SSSD}provider = "files"\n', "provider"),
    ("nis-domain-space", 'nis = { domain = "a b", servers = ["nis1"] }', "domain"),
    (
        "nis-server-newline",
        'nis = { domain = "hpc", servers = ["nis1\\ndomain x server evil"] }',
        "servers[0]",
    ),
]


@pytest.mark.parametrize(("options", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_option_is_refused(tmp_path: Path, options: str, field: str) -> None:
    site = write_site(tmp_path / "site")
    nodes = site / "nodes.d/cluster.toml"
    if options.startswith("sssd = {"):  # the bind password: an extra key of a full table
        table = options.split("\n", 1)[1]
        options = table + 'bind_password = "s3cret"\n'
    nodes.write_text(nodes.read_text() + "[hosts.options]\n" + options + "\n")
    proc = assert_refused(site, names="nodes.d/cluster.toml")
    assert field in proc.stderr, proc.stderr
