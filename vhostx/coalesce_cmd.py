"""`vhostx coalesce DEVICE [KEY VALUE ...]`: a device's interrupt moderation, shown and set the
way `ethtool -c` / `ethtool -C` do for a NIC, over a running daemon's control socket.

Keys (ethtool's names where they exist, then vhostx's): rx-usecs / usecs -> irq_coalesce_us,
rx-frames / frames -> irq_coalesce_frames, adaptive-rx / adaptive on|off -> irq_mode adaptive
(off: moderate), mode off|moderate|adaptive -> irq_mode, adaptive-on-kpps, adaptive-off-kpps,
adaptive-window-us -> irq_adaptive_*. Like `ethtool -C rx-usecs N`, setting usecs or frames
on a device whose irq_mode is off turns moderation on (mode moderate), unless `mode` is given.
Every value goes through `param_set` with the device, so the daemon checks it (a refused value
is exit 2 with the daemon's reason) and `vhostx param get NAME --device DEV` shows the same.
Threads: the main thread only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from virtio.errors import ConfigError

__all__ = ["KEYS", "SHOWN", "add_parser", "parse_settings", "run"]

# key -> parameter
KEYS: dict[str, str] = {
    "rx-usecs": "irq_coalesce_us", "usecs": "irq_coalesce_us", "tx-usecs": "irq_coalesce_us",
    "rx-frames": "irq_coalesce_frames", "frames": "irq_coalesce_frames",
    "tx-frames": "irq_coalesce_frames",
    "mode": "irq_mode", "adaptive": "irq_mode", "adaptive-rx": "irq_mode",
    "adaptive-tx": "irq_mode",
    "adaptive-on-kpps": "irq_adaptive_on_kpps", "adaptive-off-kpps": "irq_adaptive_off_kpps",
    "adaptive-window-us": "irq_adaptive_window_us",
}  # fmt: skip
# what `show` prints: label, parameter
SHOWN: tuple[tuple[str, str], ...] = (
    ("Mode", "irq_mode"),
    ("usecs", "irq_coalesce_us"),
    ("frames", "irq_coalesce_frames"),
    ("adaptive-on-kpps", "irq_adaptive_on_kpps"),
    ("adaptive-off-kpps", "irq_adaptive_off_kpps"),
    ("adaptive-window-us", "irq_adaptive_window_us"),
)
_ADAPTIVE_KEYS = ("adaptive", "adaptive-rx", "adaptive-tx")


def parse_settings(words: list[str], current_mode: str | None = None) -> list[tuple[str, str]]:
    """KEY VALUE pairs -> (parameter, value) in order; ConfigError on anything else."""
    if len(words) % 2:
        raise ConfigError(f"coalesce: expected KEY VALUE pairs, got an odd list {words}")
    out: dict[str, str] = {}
    for key, value in zip(words[::2], words[1::2], strict=True):
        if key not in KEYS:
            raise ConfigError(f"coalesce: unknown key {key!r}; allowed: {', '.join(KEYS)}")
        if key in _ADAPTIVE_KEYS:
            if value not in ("on", "off"):
                raise ConfigError(f"coalesce: {key} takes on or off, got {value!r}")
            value = "adaptive" if value == "on" else "moderate"
        out[KEYS[key]] = value
    touched = {"irq_coalesce_us", "irq_coalesce_frames"} & set(out)
    if touched and "irq_mode" not in out and current_mode == "off":
        out["irq_mode"] = "moderate"  # like ethtool -C rx-usecs N: coalescing on
    return list(out.items())


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "coalesce", help="show or set a device's interrupt moderation (like ethtool -c / -C)")
    p.add_argument("device", help="device name, e.g. net0")
    p.add_argument("settings", nargs="*", metavar="KEY VALUE",
                   help="e.g. rx-usecs 50 rx-frames 32 adaptive on; none: show")
    p.add_argument("--control", required=True, help="the daemon's control socket")
    p.set_defaults(func=run)
    return p


def _get(control: str, name: str, device: str) -> Any:
    from .cli import ask

    return ask(control, {"cmd": "param_get", "name": name, "device": device})["value"]


def run(args: argparse.Namespace) -> int:
    from .cli import ask

    dev = args.device
    if args.settings:
        pairs = parse_settings(args.settings, str(_get(args.control, "irq_mode", dev)))
        for name, value in pairs:
            answer = ask(args.control, {"cmd": "param_set", "name": name, "value": value,
                                        "device": dev}, check=False)
            if not answer.get("ok"):
                print(f"vhostx coalesce: the daemon refused {name} = {value!r} for {dev}: "
                      f"{answer.get('error')}", file=sys.stderr)
                return 2
    print(f"Coalesce parameters for {dev}:")
    for label, name in SHOWN:
        print(f"{label + ':':<20}{_get(args.control, name, dev)}")
    return 0
