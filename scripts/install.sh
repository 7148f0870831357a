#!/usr/bin/env bash
# Install everything vhostx needs on Debian bookworm (run as root); idempotent and quick when done.
#   system packages: QEMU 7.2, DPDK 22.11 (testpmd), busybox-static, iproute2, a C toolchain,
#     libvirt-clients + libxml2-utils (virt-xml-validate checks configs/libvirt/*.xml),
#     valgrind (bench/micro_core.py --callgrind: instructions per packet of the C core),
#     clang + libclang-rt-14-dev (libFuzzer and its sanitizer runtimes: the fuzz targets in fuzz/;
#     the sanitizer build of the C core uses gcc's libasan/libubsan)
#   Python: a virtual environment in .venv with vhostx (C core built by cffi) and its test/bench extras
#   QEMU/libvirt: the vhost-user descriptor 50-vhostx-net.json naming .venv/bin/vhostx-net, in
#     /etc/qemu/vhost-user/ as root, else $XDG_CONFIG_HOME/qemu/vhost-user/
#   guest: the Debian kernel + busybox initramfs for the QEMU tests, built into the cache dir
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(qemu-system-x86 dpdk-dev busybox-static iproute2 cpio gcc libffi-dev python3-venv python3-dev pkg-config
      libvirt-clients libxml2-utils valgrind clang libclang-rt-14-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[install] apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
stamp=.venv/.vhostx-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ -n "$(find virtio/_core tools setup.py -newer "$stamp" 2>/dev/null | head -1)" ]; then
  echo "[install] pip install -e .[test,bench,dev]"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test,bench,dev]'
  touch "$stamp"
fi
echo "[install] vhost-user descriptor: $(.venv/bin/python tools/install_descriptor.py "$PWD/.venv/bin/vhostx-net")"
echo "[install] guest image (cached in \${VHOSTX_CACHE:-~/.cache/vhostx})"
.venv/bin/python -m bench.guest build >/dev/null
echo "[install] done"
