"""cffi builder of the C core: `python tools/build_core.py` builds virtio/_vx_core*.so in place.

vx_core.h and vx_drv.h (PUBLIC_HEADERS) are the single source of truth: their preprocessor lines
are stripped and the rest is the cdef. The internal headers (vx_internal.h, vx_cursor.h, vx_tx.h) are only compiled, never fed to
cdef. setup.py names `tools/build_core.py:ffibuilder` in cffi_modules. Runs at build time only.

VHOSTX_SANITIZE=1 in the environment builds with AddressSanitizer and UndefinedBehaviorSanitizer
(-O1 -g, no recovery from UBSan reports); run Python with the ASan runtime preloaded, e.g.
`LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python -m pytest ...`.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from cffi import FFI

__all__ = ["PUBLIC_HEADERS", "SOURCES", "cdef_from_header", "ffibuilder", "public_cdef",
           "sanitize"]

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "virtio" / "_core"
# the core's files by concern (see vx_internal.h); vx_fence.c: fences for the Python driver
# side; vx_kq.c: one kicked queue's turn in C; vx_wait.c: the worker's wait (vx_wait.h: shared
# by those two);
# vx_drv.c: driver-side test support (virtio.testing); vx_drvq.c: the driver side
# of a split virtqueue (virtio.driver.split); vx_iotlb.c: the ACCESS_PLATFORM IOTLB
SOURCES = [
    "vx_ring.c",
    "vx_used.c",
    "vx_net_rx.c",
    "vx_net_tx.c",
    "vx_switch.c",
    "vx_round.c",
    "vx_kq.c",
    "vx_wait.c",
    "vx_fence.c",
    "vx_drv.c",
    "vx_drvq.c",
    "vx_drvpair.c",
    "vx_drvserve.c",
    "vx_iotlb.c",
]
CFLAGS = ["-O2", "-fno-strict-aliasing", "-funroll-loops", "-std=gnu11", "-Wall"]
SANITIZE_CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                   "-fno-sanitize-recover=undefined"]
SANITIZE_LDFLAGS = ["-fsanitize=address,undefined"]


def cdef_from_header(text: str) -> str:
    """The header without comments and preprocessor lines."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    text = re.sub(r"//[^\n]*", "", text)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


PUBLIC_HEADERS = ("vx_core.h", "vx_drv.h")  # the cdef, in this order (vx_core.h includes the other)


def public_cdef(core: Path = CORE) -> str:
    """The cdef of the C core: every public header without comments and preprocessor lines."""
    return "\n".join(cdef_from_header((core / h).read_text()) for h in PUBLIC_HEADERS)


def sanitize() -> bool:
    """True when VHOSTX_SANITIZE asks for an ASan + UBSan build."""
    return os.environ.get("VHOSTX_SANITIZE", "") not in ("", "0")


ffibuilder = FFI()
ffibuilder.cdef(public_cdef())
ffibuilder.set_source(
    "virtio._vx_core",
    '#include "vx_core.h"\n',
    sources=[os.path.relpath(CORE / s, ROOT) for s in SOURCES],
    include_dirs=[os.path.relpath(CORE, ROOT)],
    py_limited_api=False,  # same file name from setup.py build_ext and from this script
    extra_compile_args=CFLAGS + (SANITIZE_CFLAGS if sanitize() else []),
    extra_link_args=SANITIZE_LDFLAGS if sanitize() else [],
)


def build_in_place() -> list[Path]:
    """Compile in a private temp dir, then rename the module into virtio/ atomically: processes
    that already mapped the old .so keep it intact (writing over a mapped .so can crash them)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vx-build-", dir=ROOT) as tmp:
        tmpdir = Path(tmp)
        shutil.copytree(CORE, tmpdir / "virtio" / "_core",
                        ignore=shutil.ignore_patterns("*.o"))
        os.chdir(tmpdir)
        try:
            ffibuilder.compile(tmpdir=str(tmpdir), verbose=False)
        finally:
            os.chdir(ROOT)
        built = []
        for so in (tmpdir / "virtio").glob("_vx_core*.so"):
            dest = ROOT / "virtio" / so.name
            staged = dest.with_name(dest.name + ".new")
            shutil.copy2(so, staged)
            os.replace(staged, dest)
            built.append(dest)
    return built


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    print("built", *sorted(str(p.relative_to(ROOT)) for p in build_in_place()))
