"""Per-host boot files (GRUB configs, iPXE scripts) at 10,000 hosts: rendered once per boot
config, written only when their bytes change.

Two hosts of one boot config get the same file but for the host's own words (its MAC with
dashes, in the file's name and BOOTIF). So the file is rendered once with a slot token where the
MAC goes, and each host's file is that text with the token replaced: a string replacement
instead of a Jinja render per host. The shortcut is taken only where it provably gives the
render's bytes (`shape`); anything else falls back to the full render. The result (`Files`)
carries a digest of that plan, for the tasks' up-to-date checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from qlimage import atomic
from qlimage.atomic import served_epoch, write_text
from qlimage.errors import QlimageError
from qlimage.site import Host

# Slot tokens stand for a MAC with dashes: as long as one (17 characters, so nothing that pads
# or wraps by length can tell them apart), made only of characters that GRUB quoting and iPXE
# words pass through unchanged, and upper case, which no rendered MAC is.
SLOT = "QLIMAGEHOSTSLOT-A"
OTHER_SLOT = "QLIMAGEHOSTSLOT-B"
# What the model promises for Host.mac; a MAC in any other form gets the full render.
MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
MODE = 0o644


# A host's file split at its slots: the host's file is its MAC joined between the parts.
Shape = tuple[str, ...]


def shape(render: Callable[[str], str]) -> Shape | None:
    """`render(SLOT)`, the file of a host whose MAC with dashes is SLOT, split at SLOT, when
    joining the parts with a MAC gives exactly `render(MAC)`; else None. Rendering with a second
    token proves it: the text with SLOT replaced must be the other token's render, and neither
    token may occur in the other's text (a boot config that carries a token, or a template that
    changes the value, shows there). A render that fails is done again, per host, by the full
    render."""
    try:
        text, other = render(SLOT), render(OTHER_SLOT)
    except QlimageError:
        return None
    if SLOT in other or OTHER_SLOT in text or text.replace(SLOT, OTHER_SLOT) != other:
        return None
    return tuple(text.split(SLOT))


class Files(dict[str, str]):
    """{file name: content} of per-host files, filled by `put` and `put_hosts` only, with a
    `digest` that changes whenever a name or a byte does: a hash of each boot config's shape
    and each host's MAC, not of the megabytes of text (what a task's up-to-date check needs
    at 10,000 hosts). The digest may change when the files do not (a host's file made another
    way, a boot config renamed), never the other way round: equal digests, equal files."""

    def __init__(self) -> None:
        super().__init__()
        # Each boot config's `shape` (None: its hosts get the full render), by its name.
        self.shapes: dict[str, Shape | None] = {}
        # file name: boot config, and file name: MAC, of the files put_hosts made. Strings
        # only: a tuple per host would be 10,000 more objects for the garbage collector to
        # walk, which doubled the time of a call.
        self.shaped: dict[str, str] = {}
        self.macs: dict[str, str] = {}
        self.whole: set[str] = set()  # names put as text; a later put_hosts overrides

    def put(self, name: str, text: str) -> None:
        self.shaped.pop(name, None)
        self.macs.pop(name, None)
        self.whole.add(name)
        self[name] = text

    def put_hosts(
        self,
        hosts: Iterable[Host],
        shape_of: Callable[[str], Shape | None],
        name: tuple[str, str],
    ) -> list[Host]:
        """Put the file `name[0] + <MAC with dashes> + name[1]` of every host whose MAC has
        the plain form the model promises (else its characters might need quoting) and whose
        boot config has a shape (`shape_of(boot config)`, asked once per boot
        config); returns the other hosts, for their full render. One loop without calls per
        host: it runs for 10,000 hosts in every build."""
        shapes, shaped, macs = self.shapes, self.shaped, self.macs
        prefix, suffix = name
        rest = []
        for host in hosts:
            key = host.bootconfig
            if key not in shapes:
                shapes[key] = shape_of(key)
            parts = shapes[key]
            if parts is None or MAC.fullmatch(host.mac) is None:
                rest.append(host)
                continue
            mac = host.mac.replace(":", "-")
            file = prefix + mac + suffix
            shaped[file] = key
            macs[file] = mac
            self[file] = mac.join(parts)
        return rest

    @property
    def digest(self) -> str:
        """Not in the hosts' order (hosts reordered in nodes.d change no file). The shaped
        names with their boot configs and MACs are one string, not JSON: 10,000 of each."""
        whole = {name: self[name] for name in self.whole if name not in self.shaped}
        h = hashlib.sha256(json.dumps([self.shapes, whole], sort_keys=True).encode())
        # A boot config by its place among the shapes (its name could hold any character);
        # file names and MACs are made of plain MACs.
        place = {key: str(i) for i, key in enumerate(sorted(self.shapes))}
        lines = sorted(f"{n}\t{place[self.shaped[n]]}\t{self.macs[n]}" for n in self.shaped)
        h.update("\0".join(lines).encode())
        return h.hexdigest()


def write_changed(
    directory: Path, rendered: Mapping[str, str], owned: Callable[[str], bool]
) -> None:
    """Make the files of `directory` that `owned` names exactly `rendered`: write a file only
    when its bytes or mode differ (a host added to 10,000 renames in one file, not 10,000),
    and remove owned names that are not in `rendered`."""
    directory.mkdir(parents=True, exist_ok=True)
    epoch = served_epoch(directory)
    with os.scandir(directory) as scan:
        entries = {e.name: e for e in scan}
    for name, text in sorted(rendered.items()):
        entry = entries.get(name)
        if entry is None or not holds(entry, text.encode(), epoch):
            write_text(directory / name, text, MODE)
    for name, entry in sorted(entries.items()):
        if owned(name) and name not in rendered:
            os.unlink(entry.path)  # a name in this directory: a link is removed, not followed


def holds(entry: os.DirEntry[str], data: bytes, epoch: int | None) -> bool:
    """atomic.holds with MODE; the mtime of a file that holds `data` is clamped to the served
    epoch when something touched it since it was written."""
    if not atomic.holds(Path(entry.path), data, MODE):
        return False
    if epoch is not None and os.lstat(entry.path).st_mtime > epoch:
        os.utime(entry.path, (epoch, epoch), follow_symlinks=False)
    return True
