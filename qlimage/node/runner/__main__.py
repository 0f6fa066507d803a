"""`python3 -m <runner package>`: what /usr/lib/qlustar/qlustar-runner runs."""

from __future__ import annotations

import sys

from .main import main

sys.exit(main())
