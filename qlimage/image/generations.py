"""What a published generation holds, built into its directory before `publish` renames it in:
the boot pair (kernel + initrd) and each image (squashfs, checksum, modules.json, state/)."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

from qlimage import contract
from qlimage.atomic import TMP_PREFIX
from qlimage.image import changelogs, initrd, kernel, publish, squashfs, stage
from qlimage.layout import Layout
from qlimage.run import run
from qlimage.site import Image, Site
from qlimage.trees import file_digest


def publish_boot(site: Site) -> None:
    """A new boot generation, unless the current one has the same bytes."""
    publish.publish(Layout(site).boot, lambda gen: build_boot(site, gen), site.keep_generations)


def build_boot(site: Site, gen: Path) -> list[Path]:
    layout = Layout(site)
    k = kernel.read_kernel(layout.kernel_dir)
    from qlimage.pool.mirror import fetch_package  # the archive client pulls in requests

    vmlinuz, initrd_img = gen / contract.KERNEL_FILE, gen / contract.INITRD_FILE
    busybox_deb = fetch_package(site, "busybox-static")
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=layout.bootfiles) as tmp:
        run(["dpkg-deb", "-x", busybox_deb, tmp])
        mcast = extract_multicast_debs(site, Path(tmp, "mcast"))
        initrd.build_initrd(
            initrd_img,
            busybox=Path(tmp, "bin/busybox"),
            kernel_modules=k.modules,
            kver=k.kver,
            modules=site.initrd_modules,
            epoch=site.source_date_epoch,
            multicast=mcast,
            arch=site.archive.arch,
        )
    shutil.copyfile(k.vmlinuz, vmlinuz)
    os.chmod(vmlinuz, 0o644)
    return [vmlinuz, initrd_img]


# What the initrd's multicast client runs (udp-receiver) and links, from the archive.
MCAST_PACKAGES = ("udpcast", "libc6")


def extract_multicast_debs(site: Site, into: Path) -> Path:
    """udpcast and libc6 from the site's archive, extracted into `into` for the initrd."""
    from qlimage.pool.mirror import fetch_package

    into.mkdir()
    for name in MCAST_PACKAGES:
        run(["dpkg-deb", "-x", fetch_package(site, name), into])
    return into


def publish_image(site: Site, image: Image, resolved: str) -> None:
    """A new generation of `image` from its staged tree, unless the current one is the same."""
    root = Layout(site).image_root(image.name)
    accept = None
    if site.boot_test:
        from qlimage.image import boottest

        accept = functools.partial(boottest.boot_test, site, image.name)
    publish.publish(
        root, lambda gen: build_image(site, image, resolved, gen), site.keep_generations, accept
    )


def build_image(site: Site, image: Image, resolved: str, gen: Path) -> list[Path]:
    staged = Layout(site).stage(image.name)
    img = gen / contract.image_file(image.name)
    squashfs.pack_image(site, staged, img)
    (gen / contract.MODULES_JSON).write_text(resolved)
    checksum = gen / contract.image_sum_file(image.name)
    checksum.write_text(contract.checksum_line(file_digest(img), img.name))
    shutil.copytree(stage.state_dir(staged), gen / changelogs.STATE_DIR)
    # Named by the checksum file, not the image: the image is hashed once.
    return [checksum, gen / contract.MODULES_JSON]
