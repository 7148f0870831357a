#!/usr/bin/env bash
# Install everything, then run the main job: four devices fed by one DPDK testpmd (virtio-user,
# 64 B frames), served by one shared I/O core with polling, then by a thread per device on the
# same core, with live tables side by side. Extra arguments go to `vhostx demo` (see --help:
# --seconds per phase, --devices, --size).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/vhostx demo "$@"
