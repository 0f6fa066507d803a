#!/bin/sh
# The whole test suite: static checks, unit tests, real-tool tests and the QEMU boot tests.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
exec .venv/bin/python -m pytest --durations=20 "$@"
