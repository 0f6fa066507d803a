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


@pytest.mark.parametrize("argv", [["-C", "/nonexistent/site", "status"], ["--help"]])
def test_main_leaves_the_cycle_collector_as_it_found_it(argv: list[str]) -> None:
    """main pauses the collector while a site loads; a caller in the same process (a test)
    gets it back as it was, whether the command failed, printed help or ran."""
    import gc

    from qlimage.cli import main

    threshold = gc.get_threshold()
    assert gc.isenabled()
    with pytest.raises(SystemExit):
        main(argv)
    assert gc.isenabled()
    assert gc.get_threshold() == threshold
