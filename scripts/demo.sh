#!/usr/bin/env bash
# Install everything, then run the main job: the daemon serving a DPDK virtio-user client,
# with live figures on screen. Extra arguments go to `vhostx demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/vhostx demo "$@"
