#!/usr/bin/env bash
# The whole test suite: installs what is missing first (see install.sh), checks style (ruff) and
# types (mypy: strict on virtio/, iosched/, vfio/), then runs pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k protocol
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
echo "[test] ruff check"
.venv/bin/ruff check .
echo "[test] mypy (strict on virtio, iosched, vfio)"
.venv/bin/mypy --strict virtio iosched vfio
.venv/bin/mypy vhostx bench
exec .venv/bin/python -m pytest -q -rs "$@"
