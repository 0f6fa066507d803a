"""One module per `qlimage` verb: argparse wiring and printing only; the logic is elsewhere.

Each module has `register(subparsers)`, which adds its parser and sets `func=run`, and
`run(site, args) -> exit status`. Add a verb by adding a module and naming it in `VERBS`.
"""

VERBS = (
    "validate",
    "build",
    "rollback",
    "doit",
    "vm",
    "preview",
    "apt_hook",
    "repro_check",
    "serve",
    "reconfigure",
    "edit",
    "rootfs",
    "status",
    "chroot",
)
