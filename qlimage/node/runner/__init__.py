"""qlustar-runner: the boot-time node runner of a Qlustar-style node OS image.

The qlimage pipeline installs this package into every node image below /usr/lib/qlustar/runner
with the launcher /usr/lib/qlustar/qlustar-runner, so it uses nothing but the Python standard
library and imports nothing from qlimage (only its own modules, relatively).  /sbin/init.qlustar
calls it once after udev and before the final init (the role of QluMan execd's one-shot
configure mode):

 1. read the node's identity from /proc/cmdline (qlustar.http=, BOOTIF=, debug) and the
    initrd's DHCP lease in /run/qlustar/net.env (identity.py);
 2. fetch <qlustar.http>/nodes/<mac>/bundle.json and its .sha256 from the head, verify and
    validate the whole bundle before anything is written (fetch.py, bundle.py);
 3. write the bundle's files, directories and symlinks atomically (apply.py), then the
    cluster-wide files <qlustar.http>/cluster/* that its SHA256SUMS lists and verifies
    (ssh_known_hosts, shosts.equiv: cluster.py);
 4. perform the bundle's actions (hostname, IPMI address, commands, lines ensured in
    files of the image) (actions.py);
 5. initialize and mount the local disk described by /etc/qlustar/options.d/disk-config,
    if the bundle has one and the disk is present (disk.py);
 6. run the executables in /lib/qlustar/init.d in byte-wise sorted order (actions.py).

`qlustar-runner --init-d-only` runs step 6 alone: init.qlustar uses it when there is no usable
bundle (exit status 3), so the image's own init.d scripts still run, in the same order.

Everything is reported as `qlustar: ...` lines on the console and logged under
/var/log/qlustar (report.py).  Exit statuses: see EXIT_* in main.py.  Paths and timeouts
are in paths.py, the names shared with the head in names.py.
"""
