"""One error base class for everything a user can fix (kiwi style).

The entry point prints these as one line and exits with status 2; any other exception is a bug
and shows its traceback only with --debug.
"""

from __future__ import annotations

from typing import NoReturn


class QlimageError(Exception):
    """A problem the user can fix: bad input, a missing tool, an unreachable mirror."""

    exit_status = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class ConfigError(QlimageError):
    """One or more site files are invalid; `problems` holds one line per error."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ToolMissing(QlimageError):
    """An external program is not installed."""


class BuildError(QlimageError):
    """A build step failed (an external command returned non-zero, a checksum did not match)."""


class BootTestFailed(BuildError):
    """A new generation did not pass its boot test: `problems` is the reason, then the
    console's tail (the lines an admin needs to see without --debug)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class CommandTimeout(BuildError):
    """An external command ran longer than its time limit and was killed."""


class TaskFailures(BuildError):
    """Tasks of a build stopped on user errors. `problems` holds one line each (`task: what`);
    `details` the full messages (the command and the tool's stderr), shown with --debug."""

    def __init__(self, problems: list[str], details: list[str] | None = None) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.details = details or []


class TaskCrashed(Exception):
    """Not a user error: a task raised something unexpected, a bug. `details` holds the
    task's traceback, which the CLI shows with --debug."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def die(message: str, hint: str | None = None) -> NoReturn:
    raise QlimageError(message, hint=hint)
