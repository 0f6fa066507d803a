"""What runs ON the node: standard library (and busybox) only, importing nothing from the head.

runner/         the boot-time node runner, installed as a package under /usr/lib/qlustar/runner
                with the launcher /usr/lib/qlustar/qlustar-runner
qlustar-runner  that launcher
initrd/         the initrd's /init and its udhcpc script
init.qlustar    the second boot stage, installed as /sbin/init.qlustar in every image

The names the node shares with the head (URL paths, kernel command-line keys, the bundle
format) are mirrored in runner/names.py from qlimage/contract.py; a test keeps them equal.
"""
