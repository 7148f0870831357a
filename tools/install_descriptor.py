"""Install vhostx's vhost-user descriptor (QEMU docs/interop/vhost-user.json, @VhostUserBackend)
with the path of the installed `vhostx-net` binary: `python tools/install_descriptor.py BINARY`.

Where: /etc/qemu/vhost-user/ when run as root (the directory for the administrator's local
additions; /usr/share/qemu/vhost-user/ is for distribution packages), else
$XDG_CONFIG_HOME/qemu/vhost-user/ (default ~/.config), the per-user directory. `--dir DIR` picks
another. The template is configs/qemu/50-vhostx-net.json; its "binary" and "tags" are replaced.
Prints the path written. Called by scripts/install.sh; runs at install time only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["BACKEND_TYPES", "TEMPLATE", "check_descriptor", "default_dir", "install", "main"]

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "configs" / "qemu" / "50-vhostx-net.json"
# VHostUserBackendType of docs/interop/vhost-user.json (QEMU 7.2)
BACKEND_TYPES = ("9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net",
                 "rng", "rpmsg", "rproc-serial", "scsi", "vsock", "fs")


def check_descriptor(doc: Any) -> None:
    """ValueError unless `doc` is a VhostUserBackend: description, type, binary (absolute), tags?"""
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__}")  # noqa: TRY004 - bad input
    extra = set(doc) - {"description", "type", "binary", "tags"}
    if extra:
        raise ValueError(f"unknown member(s) {sorted(extra)}; allowed: description, type, "
                         "binary, tags")
    for key in ("description", "type", "binary"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise ValueError(f"{key}: expected a non-empty string, got {doc.get(key)!r}")
    if doc["type"] not in BACKEND_TYPES:
        raise ValueError(f"type={doc['type']!r}: expected one of {', '.join(BACKEND_TYPES)}")
    if not os.path.isabs(doc["binary"]):
        raise ValueError(f"binary={doc['binary']!r}: expected an absolute path")
    tags = doc.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"tags={tags!r}: expected a list of strings")


def default_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/etc/qemu/vhost-user")
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "qemu" / "vhost-user"


def install(binary: str, directory: Path | None = None) -> Path:
    path = Path(binary).resolve() if not os.path.isabs(binary) else Path(binary)
    if not os.access(path, os.X_OK):
        raise ValueError(f"binary {binary}: not an executable file")
    doc = json.loads(TEMPLATE.read_text())
    doc["binary"] = str(path)
    doc["tags"] = [f"installed from {ROOT}"]
    check_descriptor(doc)
    target_dir = directory or default_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / TEMPLATE.name
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("binary", help="the installed vhostx-net (absolute path)")
    p.add_argument("--dir", type=Path, help="install here instead of the default directory")
    args = p.parse_args(argv)
    try:
        print(install(args.binary, args.dir))
    except (OSError, ValueError) as err:
        print(f"install_descriptor: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
