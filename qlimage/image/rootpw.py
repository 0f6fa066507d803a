"""The root password hash of an image: the head's by default, or the image's own.

The hash is a secret: it is read here, written only into the image's /etc/shadow (0640
root:shadow), and anything else (doit's state, logs, manifests) sees only a digest of it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from qlimage.errors import ConfigError
from qlimage.site import Image, Site


def read_root_hash(shadow: Path) -> str:
    try:
        text = shadow.read_text()
    except OSError as e:
        raise ConfigError([f"{shadow}: cannot read the head's root password: {e.strerror}"]) from e
    for line in text.splitlines():
        fields = line.split(":")
        if fields[0] == "root" and len(fields) >= 2:
            return fields[1]
    raise ConfigError([f"{shadow}: no root entry"])


def image_root_hash(site: Site, image: Image) -> str:
    own = image.root_hash_file
    if own.exists():
        mode = stat.S_IMODE(own.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                [f"{own}: mode {mode:04o} exposes the root password hash; expected 0600"]
            )
        value = own.read_text().strip()
        if not value or ":" in value or "\n" in value:
            raise ConfigError([f"{own}: expected one crypt(3) hash on one line"])
        return value
    return read_root_hash(site.head_shadow)


def root_hash_digest(site: Site, image: Image) -> str:
    """What the task graph may know of the hash: enough to notice a change, nothing more."""
    return hashlib.sha256(b"qlimage-rootpw\0" + image_root_hash(site, image).encode()).hexdigest()


def group_id(root: Path, name: str) -> int | None:
    group = root / "etc/group"
    if group.exists():
        for line in group.read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name and len(fields) >= 3 and fields[2].isdigit():
                return int(fields[2])
    return None


def set_root_hash(root: Path, hash_: str) -> None:
    """Write the image's /etc/shadow with root's hash replaced (or a root entry added)."""
    shadow = root / "etc/shadow"
    lines = shadow.read_text().splitlines() if shadow.exists() else []
    out, found = [], False
    for line in lines:
        fields = line.split(":")
        if fields[0] == "root":
            fields[1] = hash_
            found = True
            line = ":".join(fields)
        out.append(line)
    if not found:
        out.insert(0, f"root:{hash_}:19000:0:99999:7:::")
    shadow.parent.mkdir(parents=True, exist_ok=True)
    # The stage may hold a hard link into the module cache: replace, never write through.
    shadow.unlink(missing_ok=True)
    fd = os.open(shadow, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{line}\n" for line in out))
    os.chown(shadow, 0, group_id(root, "shadow") or 0)
    os.chmod(shadow, 0o640)
