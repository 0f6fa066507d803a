"""The command line: the seed's command names map onto qlimage verbs."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["-C", "SITE", "edit"]),
        (["-e", "etc/motd"], ["-C", "SITE", "edit", "-e", "etc/motd"]),
        (["-e", "x", "-C", "/s"], ["-C", "SITE", "-C", "/s", "edit", "-e", "x"]),
        (
            ["--site=/s", "--debug", "-s", "demo"],
            ["-C", "SITE", "-C", "/s", "--debug", "edit", "-s", "demo"],
        ),
    ],
)
def test_seed_commands_take_the_global_options_anywhere(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], expected: list[str]
) -> None:
    from qlimage.cli import seed_argv

    monkeypatch.setenv("QLIMAGE_SITE", "SITE")
    assert seed_argv("edit", argv) == expected
