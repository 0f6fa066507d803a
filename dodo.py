"""doit entry point for the site in this directory: `doit list`, `doit`, `doit info <task>`.

Thin on purpose: the graph is built by qlimage.tasks from the validated site model.
"""

from qlimage.cli import exit_on_user_error, load_site_or_exit
from qlimage.tasks import doit_config, site_tasks

_site = load_site_or_exit(".")
DOIT_CONFIG = doit_config(_site)
globals().update(exit_on_user_error(lambda: site_tasks(_site)))
