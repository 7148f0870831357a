"""The file formats the test guest's image is made of: newc cpio, ELF, kernel modules.

Role: the byte-level pieces bench/guest.py builds the image from: a reproducible newc cpio writer
(``CpioWriter``, ``gzip_cpio``), a small ELF reader (``elf_is_static`` for busybox, the PVH
entry note, ``extract_vmlinux`` from a bzImage), and kernel modules (``module_depends`` from
``.modinfo``, ``module_closure``: the wanted modules and their dependencies in load order,
decompressed). ``GuestBuildError`` names the step that failed. bench/guest.py re-exports
``CpioWriter``, ``GuestBuildError`` and ``module_depends``.

Threads: any thread; nothing here takes a lock (the caller, ``build_image``, holds the cache's).
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import stat
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "CpioWriter",
    "GuestBuildError",
    "elf_is_static",
    "extract_vmlinux",
    "gzip_cpio",
    "has_pvh_entry",
    "module_closure",
    "module_depends",
]


class GuestBuildError(RuntimeError):
    """Building the guest image failed; the message says which step and what it saw."""


# --------------------------------------------------------------------------------------------
# cpio (newc) writer


class CpioWriter:
    """Writes a reproducible newc cpio archive (mtime 0, uid/gid 0) into a binary stream."""

    def __init__(self, out: io.BufferedIOBase | io.BytesIO) -> None:
        self._out = out
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        *,
        rdev: tuple[int, int] = (0, 0),
        nlink: int = 1,
    ) -> None:
        name = name.lstrip("/")
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08X}"
            for v in (
                self._ino,
                mode,
                0,
                0,
                nlink,
                0,
                len(data),
                0,
                0,
                rdev[0],
                rdev[1],
                len(encoded),
                0,
            )
        )
        self._ino += 1
        buf = header.encode() + encoded
        buf += b"\0" * (-len(buf) % 4)
        buf += data
        buf += b"\0" * (-len(data) % 4)
        self._out.write(buf)

    def mkdir(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        if not name or name in self._dirs:
            return
        parent = os.path.dirname(name)
        if parent:
            self.mkdir(parent)
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.mkdir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.mkdir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.mkdir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0, nlink=1)


def gzip_cpio(build: Iterable[tuple[str, tuple[object, ...]]]) -> bytes:
    """A gzip-compressed newc archive of (CpioWriter method, arguments) entries, reproducible."""
    raw = io.BytesIO()
    writer = CpioWriter(raw)
    for method, args in build:
        getattr(writer, method)(*args)
    writer.close()
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


# --------------------------------------------------------------------------------------------
# Small ELF reader: static-binary check and module .modinfo


def _elf_sections(data: bytes) -> dict[str, bytes]:
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestBuildError("not a 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx]
    names = data[strtab[4] : strtab[4] + strtab[5]]
    out: dict[str, bytes] = {}
    for h in headers:
        name = names[h[0] : names.index(b"\0", h[0])].decode()
        out[name] = data[h[4] : h[4] + h[5]]
    return out


def elf_is_static(data: bytes) -> bool:
    """True for an ELF binary without a PT_INTERP header (statically linked)."""
    if data[:4] != b"\x7fELF":
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def has_pvh_entry(elf: bytes) -> bool:
    """True if an ELF kernel carries XEN_ELFNOTE_PHYS32_ENTRY (18), i.e. QEMU can boot it
    directly in PVH mode (no real-mode setup, no decompression)."""
    try:
        sections = _elf_sections(elf)
    except (GuestBuildError, struct.error, ValueError):
        return False
    for name, data in sections.items():
        if not name.startswith(".note"):
            continue
        off = 0
        while off + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, off)
            nname = data[off + 12 : off + 12 + namesz]
            if nname.rstrip(b"\0") == b"Xen" and ntype == 18:
                return True
            off += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def extract_vmlinux(bzimage: Path, dest: Path) -> Path | None:
    """Decompress the ELF kernel inside a bzImage (xz or gzip payload) into ``dest`` if it can
    be booted in PVH mode; None (use the bzImage) otherwise. Under TCG this saves the xz
    decompression and the real-mode setup: boot to userspace drops from ~16 s to ~6-10 s here."""
    if dest.exists():
        return dest
    data = bzimage.read_bytes()
    elf: bytes | None = None
    for magic, make in (
        (b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor()),
        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
    ):
        start = data.find(magic)
        while start >= 0 and elf is None:
            try:
                out = make().decompress(data[start:])
            except (lzma.LZMAError, zlib.error):
                out = b""
            if out[:4] == b"\x7fELF":
                elf = out
            start = data.find(magic, start + 1)
        if elf is not None:
            break
    if elf is None or not has_pvh_entry(elf):
        return None
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-vmlinux-")
    with os.fdopen(fd, "wb") as f:
        f.write(elf)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    return dest


def _read_module(path: Path) -> bytes:
    """The module's ELF bytes, decompressing .ko.xz / .ko.zst."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        try:
            return subprocess.run(
                ["zstd", "-dc", str(path)], check=True, capture_output=True
            ).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise GuestBuildError(f"cannot decompress {path}: zstd failed ({e})") from e
    return data


def module_depends(ko: bytes) -> list[str]:
    """Module names listed in the ``depends=`` field of a module's ``.modinfo`` section."""
    modinfo = _elf_sections(ko).get(".modinfo", b"")
    for field in modinfo.split(b"\0"):
        if field.startswith(b"depends="):
            return [d.replace("-", "_") for d in field[8:].decode().split(",") if d]
    return []


def _find_modules(moddir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        m = re.match(r"^(.*)\.ko(\.xz|\.zst|\.gz)?$", path.name)
        if m:
            found[m.group(1).replace("-", "_")] = path
    return found


def module_closure(moddir: Path, wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """The wanted modules plus their dependencies, each after what it depends on."""
    index = _find_modules(moddir)
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in done:
            return
        if name in visiting:
            raise GuestBuildError(f"module dependency cycle at {name}")
        path = index.get(name)
        if path is None:
            builtin = moddir / "modules.builtin"
            if builtin.exists() and re.search(
                rf"/{re.escape(name)}\.ko\b", builtin.read_text().replace("-", "_")
            ):
                done.add(name)
                return
            raise GuestBuildError(f"module {name} not found under {moddir} (nor built in)")
        visiting.add(name)
        ko = _read_module(path)
        for dep in module_depends(ko):
            visit(dep)
        visiting.discard(name)
        done.add(name)
        order.append((name, ko))

    for name in wanted:
        visit(name)
    return order
