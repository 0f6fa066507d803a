"""Fetching the node's bundle from the head and verifying it against its checksum file; the
retry loop the cluster files (cluster.py) share."""

from __future__ import annotations

import hashlib
import http.client
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TypeVar

from . import names, paths
from .bundle import BundleError
from .report import Reporter

Fetcher = Callable[[str], bytes]
T = TypeVar("T")


class FetchError(BundleError):
    """The bundle could not be fetched or its checksum does not match."""


def bundle_url(base: str, mac: str) -> str:
    node = mac.replace(":", "-").lower()
    return f"{base.rstrip('/')}/{names.NODES_DIR}/{node}/{names.BUNDLE_FILE}"


def check_base_url(base: str) -> None:
    parsed = urllib.parse.urlsplit(base)
    # Only the head's web server may configure a node; a file:// URL would read node files.
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise BundleError(f"{names.CMDLINE_HTTP}={base!r} is not an http(s) URL")


def fetch_url(url: str) -> bytes:
    """GET `url`; raises OSError (URLError, HTTPError, TimeoutError) or
    http.client.HTTPException on failure."""
    # No proxies: the head is on the cluster network, and a stray http_proxy in the boot
    # environment must not divert the node's configuration.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"User-Agent": "qlustar-runner/1"})
    with opener.open(request, timeout=paths.FETCH_TIMEOUT) as response:
        data: bytes = response.read()
        return data


def is_permanent(error: Exception) -> bool:
    """A 404 means the head has no bundle for this node: retrying will not help."""
    if isinstance(error, urllib.error.HTTPError):
        return 400 <= error.code < 500 and error.code not in (408, 429)
    return isinstance(error, ValueError)  # malformed URL


def parse_checksum_file(data: bytes) -> str:
    """`<hex>  bundle.json` (sha256sum format) -> the hex digest."""
    words = data.decode("ascii", errors="replace").split()
    digest = words[0].lower() if words else ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise FetchError("bundle.json.sha256 does not hold a sha256 digest")
    return digest


def fetch_verified(url: str, fetch: Fetcher) -> tuple[bytes, str]:
    """One attempt: the bundle and its checksum file, verified. Returns (bytes, hex digest)."""
    data = fetch(url)
    expected = parse_checksum_file(fetch(url + names.CHECKSUM_SUFFIX))
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise FetchError(f"checksum mismatch for {url}: got {actual}, expected {expected}")
    return data, actual


def fetch_bundle(url: str, fetch: Fetcher, reporter: Reporter) -> tuple[bytes, str]:
    """Fetch and verify with a few retries; a mismatch is retried too, since the head
    may have been rewriting the bundle between our two requests."""
    return with_retries(f"bundle {url}", lambda: fetch_verified(url, fetch), reporter)


def with_retries(what: str, attempt: Callable[[], T], reporter: Reporter) -> T:
    """attempt() with a few retries (paths.RETRY_DELAYS), none after a permanent error;
    raises FetchError("cannot fetch <what>: <reason>") when every attempt failed."""
    delays = [*paths.RETRY_DELAYS, None]
    for number, delay in enumerate(delays, 1):
        try:
            return attempt()
        # HTTPException: e.g. IncompleteRead when the connection drops mid-transfer.
        except (OSError, ValueError, http.client.HTTPException, FetchError) as e:
            reason = describe_error(e)
            if delay is None or is_permanent(e):
                raise FetchError(f"cannot fetch {what}: {reason}") from e
            reporter.detail(f"fetch attempt {number} failed ({reason}); retrying in {delay:g}s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def describe_error(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__
