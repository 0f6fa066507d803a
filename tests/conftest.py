"""Shared fixtures: small real sites built in tmp_path with the real pipeline.

Fixtures only: the constants and functions they use, and that tests import, are in helpers.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import clone_built_site, make_sentinel, qlimage, write_site

# The fake node's fixtures (nodefs, node_env, head, commands) for the runner's unit tests.
pytest_plugins = ("fake_node",)


@pytest.fixture(scope="session")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test site, built once per session with `qlimage build`."""
    root = write_site(tmp_path_factory.mktemp("site"))
    qlimage("-C", str(root), "build")
    return root


@pytest.fixture
def site_factory(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "site", **kw: object) -> Path:
        return write_site(tmp_path / name, **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture
def built_copy(built_site: Path, tmp_path: Path) -> Path:
    """A private copy of the session's built test site, to break and rebuild (hostile inputs)."""
    return clone_built_site(built_site, tmp_path / "site")


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A tree outside the site that hostile inputs point at (see helpers.make_sentinel)."""
    return make_sentinel(tmp_path / "outside")
