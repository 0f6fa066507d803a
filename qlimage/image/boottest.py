"""The boot test before publishing (`[publish] boot_test = true`): a new image generation is
booted in QEMU with a node of the site before its `current` link moves.

The test node is the first host of the inventory that boots the image. It boots as under
`qlimage vm` (BIOS, pxelinux, QEMU's user network, bootfiles served on loopback), except that
the image's `current/generation` answers with the new generation: everything else the node
fetches comes from that generation's own directory, which is already in place. The boot must
reach the runner's end within `boot_test_timeout` seconds; otherwise the build fails with the
reason and the console's tail, and `publish` removes the generation (the previous one stays
current). A passed test leaves `boot-test.json` in the generation, which `qlimage status` shows.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlimage import contract
from qlimage.atomic import write_text
from qlimage.errors import BootTestFailed
from qlimage.progress import say
from qlimage.site import Host, Site

RECORD = "boot-test.json"  # in a generation that passed its boot test
CONSOLE_TAIL = 25  # console lines a failed test shows


def test_node(site: Site, image: str) -> Host | None:
    return next((h for h in site.hosts if site.bootconfigs[h.bootconfig].image == image), None)


def generation_override(image: str, gen: Path) -> dict[str, Path]:
    """The one URL that differs from what nodes see today: the image's current generation."""
    url = f"{contract.QLUSTAR_DIR}/{contract.image_path(image)}/{contract.CURRENT}"
    return {f"{url}/{contract.GENERATION}": gen / contract.GENERATION}


def boot_test(site: Site, image: str, gen: Path) -> None:
    """Boot the new generation `gen` of `image`; raise BuildError unless it reaches the
    runner's end. An image no host boots has nothing to be tested with (said, not failed)."""
    from qlimage.serve import vm  # QEMU and its HTTP server: only when a test runs

    host = test_node(site, image)
    if host is None:
        say(f"boot test: image {image}: no host boots it, generation {gen.name} untested")
        return
    say(f"boot test: image {image}, generation {gen.name}, node {host.name} ...")
    result = vm.boot(
        site,
        host.name,
        timeout=site.boot_test_timeout,
        overrides=generation_override(image, gen),
    )
    if not result.ok:
        tail = result.console[-CONSOLE_TAIL:]
        raise BootTestFailed(
            [
                f"image {image}: generation {gen.name} failed its boot test with node"
                f" {host.name} ({result.reason}); the current generation stays",
                *(f"  console: {line}" for line in tail),
            ]
        )
    record = {"node": host.name, "passed": True, "seconds": round(result.seconds, 1)}
    write_text(gen / RECORD, json.dumps(record, sort_keys=True) + "\n")
    say(f"boot test: image {image}: generation {gen.name} passed in {result.seconds:.1f} s")


def passed(gen: Path) -> dict[str, object] | None:
    """The record of a generation's passed boot test, if it has one."""
    try:
        data = json.loads((gen / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
