"""The UEFI loaders of the TFTP tree, from Debian's signed packages: shim (signed by Microsoft's
UEFI CA) and GRUB's network image (signed by Debian), which shim verifies and chain-loads.

Both come through the archive client (InRelease verified with gpgv, every .deb by SHA256) and
its cache, like the kernel and busybox; the kernel is Debian's signed one already (the kernel
package `linux-image-<abi>-amd64` is built from `linux-signed-amd64`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qlimage.atomic import TMP_PREFIX, atomic_path
from qlimage.errors import BuildError
from qlimage.layout import Layout
from qlimage.run import run
from qlimage.site import Site


@dataclass(frozen=True)
class Loader:
    package: str
    member: str  # the signed file inside the package
    name: str  # its name in the TFTP tree


# shim is what the firmware boots (DHCP's boot file for client architectures 7 and 9); it
# chain-loads `grubx64.efi` from the directory it came from, whatever GRUB image that is.
LOADERS = (
    Loader("shim-signed", "usr/lib/shim/shimx64.efi.signed", "bootx64.efi"),
    Loader(
        "grub-efi-amd64-signed",
        "usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed",
        "grubx64.efi",
    ),
)


# iPXE for the hosts whose boot config says `loader = "ipxe"`: their firmware's PXE loads one
# of these (Debian's `ipxe` package, unsigned: no Secure Boot), which asks DHCP again as iPXE
# and gets boot.ipxe. snponly.efi drives the NIC through the firmware's own network stack.
IPXE_LOADERS = (
    Loader("ipxe", "usr/lib/ipxe/undionly.kpxe", "undionly.kpxe"),
    Loader("ipxe", "usr/lib/ipxe/snponly.efi", "snponly.efi"),
)


def loader_names(loaders: tuple[Loader, ...] = LOADERS) -> list[str]:
    return [loader.name for loader in loaders]


def install_loaders(site: Site, loaders: tuple[Loader, ...]) -> None:
    """Fetch (or reuse from the cache) each loader's package and copy its signed file into
    the TFTP tree, unchanged: a single changed byte would break its signature."""
    from qlimage.pool.mirror import fetch_package  # the archive client pulls in requests

    layout = Layout(site)
    for loader in loaders:
        deb = fetch_package(site, loader.package)
        with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=layout.bootfiles) as tmp:
            run(["dpkg-deb", "-x", deb, tmp])
            src = Path(tmp, loader.member)
            if src.is_symlink() or not src.is_file():
                raise BuildError(f"{deb.name}: no regular file /{loader.member} in this package")
            with atomic_path(layout.tftpboot / loader.name) as out:
                shutil.copyfile(src, out)
                os.chmod(out, 0o644)
