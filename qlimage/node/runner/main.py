"""The runner's steps in order (configure_node) and its command line (main)."""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Sequence

from . import names, paths
from .actions import perform_actions, run_init_scripts
from .apply import apply_files
from .bundle import Bundle, BundleError, check_node_paths, parse_bundle
from .clock import sync_clock
from .cluster import install_cluster_files
from .commands import Runner, run_command
from .disk import initialize_disks
from .fetch import Fetcher, bundle_url, check_base_url, fetch_bundle, fetch_url
from .identity import NodeIdentity, read_identity
from .report import Reporter

# Exit statuses (init.qlustar only logs a non-zero status and continues to the final init).
EXIT_OK = 0  # bundle applied; failed actions, disk setup and scripts are in the summary line
EXIT_INTERNAL = 1  # unexpected error in the runner itself (a bug; traceback in runner.log)
EXIT_USAGE = 2  # bad command-line arguments (argparse)
EXIT_UNCONFIGURED = 3  # no usable bundle: nothing was written, no actions, no scripts
# Writing the bundle failed part-way (actions, disk and scripts skipped), or the cluster files
# could not be installed (everything else done).
EXIT_PARTIAL = 4


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qlustar-runner", description="Configure this node from its bundle on the head."
    )
    parser.add_argument("--cmdline", default=paths.CMDLINE_FILE, help="kernel command line file")
    parser.add_argument("--net-env", default=paths.NET_ENV_FILE, help="DHCP lease of the initrd")
    parser.add_argument("--debug", action="store_true", help="as `debug` on the cmdline")
    parser.add_argument(
        "--init-d-only",
        action="store_true",
        help="only run the init.d scripts (init.qlustar: when there is no usable bundle)",
    )
    return parser.parse_args(argv)


def load_bundle(identity: NodeIdentity, fetch: Fetcher, reporter: Reporter) -> Bundle:
    if not identity.base:
        raise BundleError(f"no {names.CMDLINE_HTTP}=<URL> on the kernel command line")
    if not identity.mac:
        raise BundleError(f"no usable {names.CMDLINE_BOOTIF}=<mac> on the kernel command line")
    check_base_url(identity.base)
    url = bundle_url(identity.base, identity.mac)
    reporter.step(f"fetching bundle {url}")
    data, digest = fetch_bundle(url, fetch, reporter)
    bundle = parse_bundle(data, digest)
    check_node_paths(bundle.files)
    return bundle


def configure_node(identity: NodeIdentity, fetch: Fetcher, run: Runner, reporter: Reporter) -> int:
    reporter.step(
        f"runner started (node MAC {identity.mac or 'unknown'}, head {identity.base or 'unknown'})"
    )
    if identity.net:
        reporter.detail("net.env: " + " ".join(f"{k}={v}" for k, v in identity.net.items()))
    try:
        bundle = load_bundle(identity, fetch, reporter)
    except BundleError as e:
        reporter.error(f"{e}; nothing written, node stays unconfigured")
        return EXIT_UNCONFIGURED
    reporter.step(
        f"bundle for {bundle.node} verified: {len(bundle.files)} files, "
        f"{len(bundle.actions)} actions"
    )
    # First: files written and everything after them see the head's time.
    sync_clock(bundle, run, reporter)
    try:
        apply_files(bundle.files, reporter)
    except OSError as e:
        reporter.error(
            f"writing the bundle failed: {e}; node is only partly configured, "
            "actions, disk setup and init.d scripts skipped"
        )
        return EXIT_PARTIAL
    reporter.step(f"bundle applied: {len(bundle.files)} files (sha256 {bundle.sha256[:12]})")
    # Before the actions and scripts, which may start sshd; without them the node still
    # works, so a failure only makes the status partial.
    assert identity.base  # load_bundle fetched from it
    cluster_ok = install_cluster_files(identity.base, fetch, reporter)
    failed_actions = perform_actions(bundle.actions, run, reporter)
    # Before the init.d scripts: they may use the local file systems.
    disks, failed_disks = initialize_disks(run, reporter)
    scripts, failed_scripts = run_init_scripts(run, reporter)
    reporter.step(
        f"runner done: {len(bundle.files)} files, {len(bundle.actions)} actions "
        f"({failed_actions} failed), {disks} disks ({failed_disks} failed), "
        f"{scripts} scripts ({failed_scripts} failed)"
    )
    return EXIT_OK if cluster_ok else EXIT_PARTIAL


def run_init_d_only(run: Runner, reporter: Reporter) -> int:
    """The init.d step alone: init.qlustar runs it when configure_node found no usable bundle
    (EXIT_UNCONFIGURED), so the image's own scripts still run, in the same order as always."""
    scripts, failed = run_init_scripts(run, reporter)
    reporter.detail(f"init.d only: {scripts} scripts ({failed} failed)")
    return EXIT_OK


def main(
    argv: Sequence[str] | None = None,
    *,
    fetch: Fetcher = fetch_url,
    run: Runner = run_command,
) -> int:
    """Entry point; returns the exit status (EXIT_*)."""
    args = parse_args(argv)
    identity = read_identity(args)
    reporter = Reporter(debug=identity.debug)
    reporter.open_log(paths.LOG_DIR)
    try:
        if args.init_d_only:
            return run_init_d_only(run, reporter)
        return configure_node(identity, fetch, run, reporter)
    except Exception as e:
        reporter.error(f"internal error: {e!r}")
        reporter.detail(traceback.format_exc())
        return EXIT_INTERNAL
    finally:
        reporter.close()
