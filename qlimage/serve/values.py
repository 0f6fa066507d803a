"""Values the head service configs carry, checked once more for their consumers' syntax.

Addresses, MACs and host names come from the validated site model, so these checks never fail
for a loaded site; they stand between a future schema change and a config that a stray `,`,
`;`, `$` or newline would turn into other directives. Paths are the one input the schema does
not constrain (the site directory's own name): a path that dnsmasq or nginx could misread is
refused with the setting to change.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path

from qlimage.errors import ConfigError, QlimageError

# dnsmasq splits values at `,` and reads `#` and quotes; nginx splits at whitespace and `;`,
# expands `$` and reads `{}` and quotes. Neither can carry these, so a path must avoid them.
SAFE_PATH = re.compile(r"/[A-Za-z0-9._+@~:/-]*")
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# An IPv4 address already in its canonical dotted-quad form (no leading zeros, each 0-255):
# what every node's address is, checked at a tenth of ipaddress's cost for 10,000 nodes.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
CANONICAL_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def config_path(path: Path) -> str:
    """An absolute path as a config value; the bootfiles setting is what decides it."""
    text = str(path)
    if not SAFE_PATH.fullmatch(text):
        raise ConfigError(
            [
                f"site.toml: .paths.bootfiles: {text!r} cannot appear in the dnsmasq and nginx"
                " configs (allowed in the path: letters, digits and . _ + @ ~ : / -)"
            ]
        )
    return text


def ipv4(value: str) -> str:
    if CANONICAL_IPV4.fullmatch(value):
        return value
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise QlimageError(f"not an IPv4 address: {value!r}") from None


def cidr(value: str) -> str:
    try:
        return str(ipaddress.IPv4Network(value, strict=False))
    except ValueError:
        raise QlimageError(f"not an IPv4 network: {value!r}") from None


def mac(value: str) -> str:
    if not MAC.fullmatch(value):
        raise QlimageError(f"not a MAC address (lower case, colon separated): {value!r}")
    return value


def hostname(value: str) -> str:
    if not HOSTNAME.fullmatch(value):
        raise QlimageError(f"not a host name (RFC 1123 label, lower case): {value!r}")
    return value


# --- whole columns: one value per host, 10,000 hosts (issue 13) --------------------------------


def checked(texts: list[str], pattern: re.Pattern[str], check: Callable[[str], str]) -> list[str]:
    """`[check(t) for t in texts]` for a `check` above that returns every text `pattern`
    fullmatches unchanged (and `pattern` matches no newline): one regex run over the texts
    joined by newlines, in C, for a column of clean values, and `check` (its canonical form,
    its error) only when one is not."""
    joined = "\n".join(texts)
    # The count shows that no text holds a newline itself: the joined lines are the texts.
    if joined.count("\n") == len(texts) - 1 and column(pattern).fullmatch(joined):
        return texts
    return [check(t) for t in texts]


@functools.cache
def column(pattern: re.Pattern[str]) -> re.Pattern[str]:
    """Lines that each fullmatch `pattern`."""
    return re.compile(rf"(?:{pattern.pattern})(?:\n(?:{pattern.pattern}))*")
