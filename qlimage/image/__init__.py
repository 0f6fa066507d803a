"""One image and the boot pair: staging (modules, overlays, root password, changelogs),
squashfs, kernel, initrd, generations and their atomic publishing."""
