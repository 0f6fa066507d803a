"""Long-running head services: the QEMU harness today; HTTP, dnsmasq and multicast next."""
