"""The one Jinja2 environment for every generated file: node files, boot loader configs and,
later, head service configs.

Templates live beside the code that fills them (`<room>/templates/*.j2`) and are named
`<room>/<file>.j2` here. Undefined variables are errors, and values are escaped explicitly for
their consumer with the filters below, never by a global autoescape that knows only HTML.
"""

from __future__ import annotations

import functools
import hashlib
import shlex
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).parent
ROOMS = ("boot", "bundle")


@functools.cache
def environment() -> Any:
    # Built on first render: a no-op build only fingerprints templates, it renders none.
    import jinja2

    loader = jinja2.PrefixLoader(
        {room: jinja2.FileSystemLoader(PACKAGE / room / "templates") for room in ROOMS}
    )
    env = jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["sh"] = lambda value: shlex.quote(str(value))
    env.filters["unit"] = lambda value: str(value).replace("%", "%%")  # systemd specifiers
    return env


def render(name: str, **context: Any) -> str:
    """Render `<room>/<file>.j2`, e.g. `bundle/node.j2`."""
    return str(environment().get_template(name).render(**context))


@functools.cache
def digest(room: str) -> str:
    """The room's templates, names and bytes: a change to any may change what it renders."""
    h = hashlib.sha256()
    for path in sorted((PACKAGE / room / "templates").iterdir()):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
