"""Shared fixtures: small real sites built in tmp_path with the real pipeline.

Fixtures only: the constants and functions they use, and that tests import, are in helpers.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import qlimage, write_site


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
