"""The one Jinja2 environment for every generated file: node files, boot loader configs and,
later, head service configs.

Templates live beside the code that fills them (`<room>/templates/*.j2`) and are named
`<room>/<file>.j2` here. Undefined variables are errors, and values are escaped explicitly for
their consumer with the filters below, never by a global autoescape that knows only HTML.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shlex
import stat
from pathlib import Path
from typing import Any

from qlimage.errors import QlimageError
from qlimage.layout import USER_CACHE

PACKAGE = Path(__file__).parent
ROOMS = ("boot", "bundle", "serve")


@functools.cache
def environment() -> Any:
    # Built on first render: a no-op build only fingerprints templates, it renders none.
    import jinja2

    loader = jinja2.PrefixLoader(
        {room: jinja2.FileSystemLoader(PACKAGE / room / "templates") for room in ROOMS}
    )
    settings: dict[str, Any] = {
        "undefined": jinja2.StrictUndefined,
        "keep_trailing_newline": True,
        "autoescape": False,
        "trim_blocks": True,
        "lstrip_blocks": True,
    }
    env = jinja2.Environment(loader=loader, bytecode_cache=bytecode_cache(settings), **settings)
    env.filters["sh"] = sh
    env.filters["unit"] = unit
    env.filters["line"] = line
    env.filters["word"] = word
    return env


def bytecode_cache(settings: dict[str, Any]) -> Any:
    """Jinja's cache of compiled templates, kept between runs: compiling the templates a build
    renders costs more than rendering them (about 25 ms of every build). Jinja keys an entry by
    the template's name, file and source; the file name adds what else shapes the code, the
    environment's settings and Jinja's version. None (compile every time) unless the directory
    is ours and nobody else may write it: the cache holds code this process runs."""
    import jinja2

    directory = USER_CACHE.expanduser() / "templates"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = directory.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return None
    shaped = repr(sorted(settings.items())) + jinja2.__version__
    tag = hashlib.sha256(shaped.encode()).hexdigest()[:16]
    return jinja2.FileSystemBytecodeCache(str(directory), f"%s.{tag}.cache")


class UnsafeValue(QlimageError):
    """A value its consumer cannot take. The schemas keep such values out of the site, so this
    is the last line of defence: a generated file is never written with it."""


# The escaping filters. Each either escapes a value for its consumer so that the consumer reads
# back exactly the value, or, where a format has no escape for a character, refuses it.

CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def line(value: Any) -> str:
    """A value inside one line of a line-based format (a pxelinux directive, an interfaces(5)
    option, a comment of any file): no character may end the line or hide in it."""
    text = str(value)
    if CONTROL.search(text):
        raise UnsafeValue(f"{text!r}: a control character cannot be written into one line")
    return text


def word(value: Any) -> str:
    """One white-space separated word of a line (an ifupdown device name, a pxelinux
    argument): `line`, and no white space either."""
    text = line(value)
    if not text or any(c.isspace() for c in text):
        raise UnsafeValue(f"{text!r}: expected one word without white space")
    return text


def sh(value: Any) -> str:
    """A POSIX shell word: single-quoted unless it is harmless bare. Quoting keeps every byte,
    a newline included, but NUL cannot be in a shell string."""
    text = str(value)
    if "\0" in text:
        raise UnsafeValue(f"{text!r}: a NUL cannot be in a shell value")
    return shlex.quote(text)


def unit(value: Any) -> str:
    """A systemd unit file setting value: `%` doubled (specifiers); a newline would start a
    new setting, surrounding white space is stripped by systemd and a final backslash continues
    the line, and unit files have no escape for these, so they are refused."""
    text = line(value)
    if text != text.strip() or text.endswith("\\"):
        raise UnsafeValue(f"{text!r}: surrounding white space or a final backslash")
    return text.replace("%", "%%")


def render(name: str, **context: Any) -> str:
    """Render `<room>/<file>.j2`, e.g. `bundle/node.j2`. UnsafeValue (a user error naming the
    template) if a filter refuses a value."""
    try:
        return str(environment().get_template(name).render(**context))
    except UnsafeValue as e:
        raise UnsafeValue(f"{name}: {e}") from None


@functools.cache
def digest(room: str) -> str:
    """The room's templates, names and bytes: a change to any may change what it renders."""
    h = hashlib.sha256()
    for path in sorted((PACKAGE / room / "templates").iterdir()):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
