#!/usr/bin/env bash
# The whole test suite: installs what is missing first (see install.sh), then runs pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k protocol
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q -rs "$@"
