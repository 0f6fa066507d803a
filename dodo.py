"""doit entry point for the site in this directory: `doit list`, `doit`, `doit info <task>`.

Thin on purpose: qlimage builds the graph from the validated site model and takes the build
lock when doit is about to run tasks, exactly as `qlimage build` does.
"""

import sys

from qlimage.cli import exit_on_user_error
from qlimage.site import load_site
from qlimage.tasks.run import dodo_namespace

globals().update(exit_on_user_error(lambda: dodo_namespace(load_site("."), sys.argv[1:])))
