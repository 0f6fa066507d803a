"""One image: staging (modules, overlays, root password, changelogs), squashfs, kernel, initrd, publishing."""
