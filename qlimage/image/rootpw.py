"""The root password hash of an image: the head's by default, or the image's own.

The hash is a secret: it is read here, written only into the image's /etc/shadow (0640
root:shadow), and anything else (doit's state, logs, manifests) sees only a digest of it.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from qlimage.errors import ConfigError, QlimageError
from qlimage.site import Image, Site
from qlimage.trees import read_in_root, replace_in_root


def read_root_hash(shadow: Path) -> str:
    try:
        text = shadow.read_text()
    except OSError as e:
        raise ConfigError([f"{shadow}: cannot read the head's root password: {e.strerror}"]) from e
    except UnicodeDecodeError:
        raise ConfigError([f"{shadow}: not a shadow file (not UTF-8 text)"]) from None
    for line in text.splitlines():
        fields = line.split(":")
        if fields[0] == "root" and len(fields) >= 2:
            return fields[1]
    raise ConfigError([f"{shadow}: no root entry"])


# crypt(3) hashes libxcrypt verifies and that are still fit to guard a served image: the hash
# alphabet is "./0-9A-Za-z". Anything else, plaintext in particular, is refused: /etc/shadow
# would hold it as a "hash" no password matches (and the plaintext would be in the image).
B64 = "[./0-9A-Za-z]"
CRYPT_HASH = re.compile(
    "|".join(
        (
            rf"\$(y|gy)\${B64}+\${B64}{{1,86}}\${B64}{{43}}",  # yescrypt, gost-yescrypt
            rf"\$6\$(rounds=[0-9]{{1,9}}\$)?[^$:\s]{{1,16}}\${B64}{{86}}",  # SHA-512
            rf"\$5\$(rounds=[0-9]{{1,9}}\$)?[^$:\s]{{1,16}}\${B64}{{43}}",  # SHA-256
            rf"\$2[by]\$[0-9]{{2}}\${B64}{{53}}",  # bcrypt
        )
    )
)
# Locked forms: "*" (no password login) and "!" (locked), the latter also before a hash.
LOCKED = re.compile(r"\*|!\*?")


def check_root_hash(value: str, where: str) -> str:
    """`value` if it is a crypt hash or a locked form; else ConfigError naming `where`."""
    hash_ = value.removeprefix("!") if value.startswith("!$") else value
    if CRYPT_HASH.fullmatch(hash_) or LOCKED.fullmatch(value):
        return value
    raise ConfigError(
        [f"{where}: expected one crypt(3) hash (yescrypt $y$, SHA-512 $6$, SHA-256 $5$, "
         "bcrypt $2b$/$2y$, gost-yescrypt $gy$; e.g. from `mkpasswd -m yescrypt`) or a locked "
         "form (*, !); plaintext is refused"]
    )  # fmt: skip


def image_root_hash(site: Site, image: Image) -> str:
    """The image's own hash if it has a `.rootpw` (mode 0600, a regular file in images.d, one
    crypt hash), else the head's."""
    own = image.root_hash_file
    where = rel_to(own, site.paths.root)
    try:
        st = own.lstat()
    except FileNotFoundError:
        return read_root_hash(site.head_shadow)
    except OSError as e:
        raise ConfigError([f"{where}: cannot read: {e.strerror}"]) from e
    if not stat.S_ISREG(st.st_mode):  # a link could read any file of the head into the image
        raise ConfigError([f"{where}: expected a regular file holding one crypt(3) hash"])
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(
            [f"{where}: mode {mode:04o} exposes the root password hash; expected 0600"]
        )
    try:
        fd = os.open(own, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read(4097)
    except OSError as e:
        raise ConfigError([f"{where}: cannot read: {e.strerror}"]) from e
    try:
        value = data.decode("ascii").strip()
    except UnicodeDecodeError:
        value = ""  # binary: refused below, without echoing any of it
    return check_root_hash(value, where)


def rel_to(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def root_hash_digest(site: Site, image: Image) -> str:
    """What the task graph may know of the hash: enough to notice a change, nothing more."""
    return hashlib.sha256(b"qlimage-rootpw\0" + image_root_hash(site, image).encode()).hexdigest()


def group_id(root: Path, name: str) -> int | None:
    # Read inside the image (its links resolved in it): a module's /etc/group may be a link.
    for line in text_in_root(root, "etc/group").splitlines():
        fields = line.split(":")
        if fields[0] == name and len(fields) >= 3 and fields[2].isdigit():
            return int(fields[2])
    return None


def text_in_root(root: Path, rel: str) -> str:
    data = read_in_root(root, rel)
    return "" if data is None else data.decode("utf-8", "surrogateescape")


def set_root_hash(root: Path, hash_: str) -> None:
    """Write the image's /etc/shadow with root's hash replaced (or a root entry added).

    The old file is read and the new one written inside the staged tree only: a module that
    ships /etc/shadow (or /etc) as a link to a path on the head neither leaks that file into
    the image nor gets it overwritten (see trees.resolve_in_root)."""
    out, found = [], False
    for line in text_in_root(root, "etc/shadow").splitlines():
        fields = line.split(":")
        if fields[0] == "root":
            fields[1] = hash_
            found = True
            line = ":".join(fields)
        out.append(line)
    if not found:
        out.insert(0, f"root:{hash_}:19000:0:99999:7:::")
    data = "".join(f"{line}\n" for line in out).encode("utf-8", "surrogateescape")
    # The stage may hold a hard link into the module cache: replaced, never written through.
    try:
        replace_in_root(root, "etc/shadow", data, 0o640, (0, group_id(root, "shadow") or 0))
    except OSError as e:
        raise QlimageError(
            f"/etc/shadow: cannot install it in the staged image: {e.strerror}"
        ) from e
