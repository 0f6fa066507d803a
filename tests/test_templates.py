"""Compiled templates kept between runs (`templates.bytecode_cache`): only in a private
directory, and never stale when a template's source, the environment's settings or Jinja
change."""

from __future__ import annotations

import os
from pathlib import Path

import jinja2
import pytest

from qlimage import templates

SETTINGS = {"trim_blocks": True, "keep_trailing_newline": True}


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(templates, "USER_CACHE", tmp_path / "cache")
    return tmp_path / "cache" / "templates"


def render(source: str, settings: dict[str, object]) -> str:
    """A fresh environment, as a new process has, with the cache of these settings."""
    cache = templates.bytecode_cache(settings)
    assert cache is not None
    env = jinja2.Environment(
        loader=jinja2.DictLoader({"t.j2": source}), bytecode_cache=cache, **settings
    )
    return env.get_template("t.j2").render(x="X")


def test_compiled_templates_are_kept_privately(cache_root: Path) -> None:
    assert render("a {{ x }}\n", SETTINGS) == "a X\n"
    assert cache_root.stat().st_mode & 0o777 == 0o700
    kept = list(cache_root.iterdir())
    assert len(kept) == 1
    assert render("a {{ x }}\n", SETTINGS) == "a X\n"
    assert list(cache_root.iterdir()) == kept  # read, not compiled and written again


def test_a_changed_source_or_setting_is_compiled_anew(cache_root: Path) -> None:
    assert render("a {{ x }}\n", SETTINGS) == "a X\n"
    assert render("b {{ x }}\n", SETTINGS) == "b X\n"
    block = "{% if x %}\n{{ x }}\n{% endif %}\n"
    assert render(block, SETTINGS) == "X\n"
    assert render(block, {**SETTINGS, "trim_blocks": False}) == "\nX\n\n"


@pytest.mark.parametrize("problem", ["group-writable", "another owner", "a link"])
def test_a_directory_others_could_write_is_not_used(cache_root: Path, problem: str) -> None:
    """The cache holds code the build runs."""
    if problem == "a link":
        elsewhere = cache_root.parent / "elsewhere"
        elsewhere.mkdir(parents=True, mode=0o700)
        cache_root.symlink_to(elsewhere)
    else:
        cache_root.mkdir(parents=True, mode=0o700)
    if problem == "group-writable":
        os.chmod(cache_root, 0o770)
    elif problem == "another owner":
        os.chown(cache_root, 65534, 65534)
    assert templates.bytecode_cache(SETTINGS) is None
