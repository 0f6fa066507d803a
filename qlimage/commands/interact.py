"""What several verbs share with the admin at the terminal (not a verb itself): the
confirmation before a deletion, and the last word of a command that may have rebuilt."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from qlimage.errors import QlimageError


def confirm(question: str, stdin: TextIO | None, action: str, undone: str) -> None:
    """Ask on the terminal; anything but y/yes, no terminal or no answer refuses.
    `action` names the command ("chroot remove"), `undone` what did not happen ("removed")."""
    import sys

    if stdin is None or not stdin.isatty():
        raise QlimageError(
            f"{action}: no terminal to confirm on; nothing {undone}",
            hint=f"pass --yes to {action.split()[-1]} without a confirmation",
        )
    print(question, end="", file=sys.stderr, flush=True)
    if stdin.readline().strip().lower() not in ("y", "yes"):
        raise QlimageError(f"{action}: not confirmed; nothing {undone}")


def finish(site_root: Path, rebuilt: int | None, *, changed: bool = True) -> int:
    """The exit status after a change: the rebuild's, or 0 with the way to rebuild when the
    admin asked for none (`--no-build`)."""
    if not changed:
        return 0  # nothing changed, nothing to rebuild
    if rebuilt is None:
        print(f"not rebuilt (--no-build); to rebuild: qlimage -C {site_root} build")
        return 0
    return rebuilt
