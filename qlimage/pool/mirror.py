"""The site's view of the Debian archive: which sources, where the cache lives."""

from __future__ import annotations

from pathlib import Path

from qlimage.pool.archive import Archive, Source, host_sources
from qlimage.site import Site


def site_sources(site: Site) -> list[Source]:
    """The sources site.toml names, else the head's own apt sources."""
    if not site.archive.sources:
        return host_sources()
    return [
        Source(uri, suite, components)
        for uri, suites, components in site.archive.sources
        for suite in suites
    ]


_archives: dict[tuple[object, ...], Archive] = {}


def open_archive(site: Site) -> Archive:
    """One Archive per set of sources in this process: its parsed indexes are reused by every
    task of a build (parsing bookworm's indexes takes seconds)."""
    sources = site_sources(site)
    key = (tuple(sources), site.archive.arch, site.paths.cache, site.archive.index_max_age)
    if key not in _archives:
        _archives[key] = Archive(
            sources,
            arch=site.archive.arch,
            cache_dir=site.paths.cache,
            max_index_age=site.archive.index_max_age,
        )
    return _archives[key]


def fetch_package(site: Site, name: str) -> Path:
    """Download (or reuse from the cache) the newest `name` .deb; return its path."""
    archive = open_archive(site)
    return archive.download(archive.package(name))
