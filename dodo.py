"""doit entry point for the site in this directory: `doit list`, `doit`, `doit info <task>`.

Thin on purpose: the graph is built by qlimage.tasks from the validated site model.
"""

import sys

from qlimage.cli import doit_runs_tasks, exit_on_user_error, load_site_or_exit
from qlimage.image.publish import build_lock
from qlimage.tasks.graph import doit_config, site_tasks

_site = load_site_or_exit(".")
if doit_runs_tasks(sys.argv[1:]):
    # Held until doit exits: builds of this site never overlap, whichever command started them.
    _lock = build_lock(_site.paths.bootfiles)
    _lock.__enter__()
DOIT_CONFIG = doit_config(_site)
globals().update(exit_on_user_error(lambda: site_tasks(_site)))
