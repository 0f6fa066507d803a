"""Site files -> one validated, frozen model (`model`), loaded by `load`; schemas in schemas/."""

from qlimage.site.load import load_site
from qlimage.site.model import (
    BootConfig,
    Chroot,
    Host,
    HostAddress,
    Image,
    Network,
    Recipe,
    Site,
    addresses_on,
)

__all__ = [
    "BootConfig",
    "Chroot",
    "Host",
    "HostAddress",
    "Image",
    "Network",
    "Recipe",
    "Site",
    "addresses_on",
    "load_site",
]
