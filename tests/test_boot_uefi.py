"""End-to-end UEFI: the built test site boots in QEMU (TCG) with OVMF through Debian's signed
shim -> signed GRUB (grubx64.efi, grub/grub.cfg-01-<mac>) -> signed kernel -> our initrd, with
Secure Boot off and on, with the same code as `qlimage vm NODE --uefi [--secure-boot]`; the
iPXE path (`qlimage vm NODE --ipxe`); and GRUB fetching kernel and initrd over HTTP (a boot
config with `grub_fetch = "http"`), which Secure Boot turns back into TFTP."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from qlimage.layout import Layout
from qlimage.serve import vm
from qlimage.site import load_site

from helpers import (
    GRUB_HTTP_SERVER,
    access_logged_http,
    clone_built_site,
    edit,
    port80_guestfwd,
    qlimage,
)

pytestmark = [pytest.mark.boot, pytest.mark.network]

HOST_CONFIG = "grub.cfg-01-52-54-00-12-34-56"  # beo-01's boot MAC


# Under TCG on a loaded host the kernel's IO-APIC timer check can miss its ticks and panic
# before anything of ours runs; that boot is repeated once (any other failure is not).
TCG_TIMER_PANIC = "IO-APIC + timer doesn't work"


def boot_log(built_site: Path, firmware: str, **kw: Any) -> str:
    result = vm.boot(load_site(built_site), "beo-01", timeout=300, firmware=firmware, **kw)
    if not result.ok and any(TCG_TIMER_PANIC in line for line in result.console):
        result = vm.boot(load_site(built_site), "beo-01", timeout=300, firmware=firmware, **kw)
    log = "\n".join(result.console)
    assert result.ok, f"{result.reason}\n{result.tail(80)}"
    return log


def assert_booted_through_its_host_config(log: str) -> None:
    # OVMF fetched shim, shim fetched GRUB, GRUB's default config found the host's own.
    assert "Fetching Netboot Image grubx64.efi" in log, log
    assert f"qlustar: grub config {HOST_CONFIG} (boot config compute)" in log, log
    assert "qlustar: grub config grub.cfg " not in log
    assert re.search(rf"Command line: .*qlustar\.pxecfg={HOST_CONFIG}\b", log), log
    assert re.search(r"Command line: .*\bBOOTIF=01-52-54-00-12-34-56\b", log), log
    # The initrd took the NIC that BOOTIF names, then the runner applied the bundle.
    assert "qlustar: boot NIC eth0 (52:54:00:12:34:56)" in log
    assert re.search(r"qlustar: image demo sha256 ok \([0-9a-f]{64}\)", log)
    assert re.search(r"qlustar: bundle applied: \d+ files \(sha256 [0-9a-f]{12}\)", log), log
    assert "qlustar: handing over to /sbin/init" in log


def test_uefi_node_boots_through_its_grub_host_config(built_site: Path) -> None:
    log = boot_log(built_site, "uefi")
    assert_booted_through_its_host_config(log)
    assert "secureboot: Secure boot disabled" in log, log


def test_secure_boot_node_boots_signed_chain_locked_down(built_site: Path) -> None:
    log = boot_log(built_site, "uefi-secure-boot")
    assert_booted_through_its_host_config(log)
    assert "secureboot: Secure boot enabled" in log, log
    assert re.search(r"Kernel is locked down from EFI Secure Boot", log), log
    # Every module the initrd loaded passed the kernel's signature check under lockdown.
    assert "module verification failed" not in log
    assert not re.search(r"insmod .* failed", log)


def test_ipxe_node_boots_through_its_host_script_over_http(built_site: Path) -> None:
    """BIOS with the NIC's iPXE ROM: boot.ipxe chains ipxe/<mac>.ipxe, which fetches kernel and
    initrd over HTTP (iPXE prints to the screen only, so the kernel's command line tells)."""
    log = boot_log(built_site, "ipxe")
    assert re.search(r"Command line: .*qlustar\.pxecfg=52-54-00-12-34-56\.ipxe\b", log), log
    assert re.search(r"Command line: .*\bBOOTIF=01-52-54-00-12-34-56\b", log), log
    assert "qlustar: boot NIC eth0 (52:54:00:12:34:56)" in log
    assert re.search(r"qlustar: bundle applied: \d+ files \(sha256 [0-9a-f]{12}\)", log), log
    assert "qlustar: handing over to /sbin/init" in log


# --- GRUB over HTTP ---------------------------------------------------------------------------

COMPUTE = '[bootconfigs.compute]\nimage = "demo"\n'
HTTP_DEVICE = f"(http,{GRUB_HTTP_SERVER})"
BOOT_FILES = ("/qlustar/boot/current/vmlinuz", "/qlustar/boot/current/initrd.img")


@pytest.fixture(scope="module")
def http_site(built_site: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built test site with beo-01's boot config fetching over HTTP from port 80 of
    GRUB_HTTP_SERVER (the head's own port is not 80, as on a head whose nginx serves another)."""
    root = clone_built_site(built_site, tmp_path_factory.mktemp("grub-http") / "site")
    extra = f'grub_fetch = "http"\ngrub_http_server = "{GRUB_HTTP_SERVER}"\n'
    edit(root / "site.toml", COMPUTE, COMPUTE + extra)
    qlimage("-C", str(root), "build")
    return root


def grub_requests(access: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    assert all(r["agent"].startswith("GRUB 2.06") for r in access), access  # GRUB asked, only
    return {r["uri"]: r for r in access}


def test_uefi_grub_fetches_kernel_and_initrd_over_http(http_site: Path) -> None:
    layout = Layout(http_site / "bootfiles")
    with access_logged_http(layout.bootfiles) as (port, access):
        log = boot_log(http_site, "uefi", guestfwd=[port80_guestfwd(port)])
    assert_booted_through_its_host_config(log)
    assert f"qlustar: grub: kernel and initrd from {HTTP_DEVICE}" in log, log
    assert "qlustar: grub: kernel and initrd from (tftp)" not in log  # HTTP worked: no fallback
    assert f"Command line: BOOT_IMAGE={HTTP_DEVICE}{BOOT_FILES[0]} " in log, log
    # The port-80 server's access log: GRUB fetched both files over HTTP, whole, once each.
    fetched = grub_requests(access)
    assert sorted(fetched) == sorted(BOOT_FILES), access
    for uri, size in zip(BOOT_FILES, (layout.vmlinuz, layout.initrd), strict=True):
        assert fetched[uri]["status"] == 200, access
        assert fetched[uri]["bytes"] == size.stat().st_size, access


def test_secure_boot_grub_falls_back_to_tftp(http_site: Path) -> None:
    """Under Secure Boot, Debian's signed GRUB refuses the http module it did not embed, so the
    same host config fetches over TFTP and the signed chain still reaches the runner."""
    with access_logged_http(Layout(http_site / "bootfiles").bootfiles) as (port, access):
        log = boot_log(http_site, "uefi-secure-boot", guestfwd=[port80_guestfwd(port)])
    assert_booted_through_its_host_config(log)
    assert "error: prohibited by secure boot policy" in log, log
    tried = re.findall(r"qlustar: grub: kernel and initrd from (\S+)", log)
    assert tried == [HTTP_DEVICE, "(tftp)"], log
    assert f"Command line: BOOT_IMAGE=(tftp){BOOT_FILES[0]} " in log, log
    assert "secureboot: Secure boot enabled" in log, log
    assert access == []  # nothing came over HTTP from GRUB
