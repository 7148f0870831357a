"""Daemon configuration: devices from a TOML file (configs/*.toml) or `--device k=v,...` strings.

Every value is checked here, before anything starts; a bad one raises ConfigError naming the key,
the value that came and what is allowed. Parameter values (`[params]`, a device's
`[device.params]`, `--param`) are only checked to be tables of scalars here: the daemon's
registry checks names, scopes and ranges when it starts. Called from the main thread at start-up
only.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtio.errors import ConfigError

from .metrics import parse_addr

__all__ = ["PORTS", "DaemonConfig", "DeviceConfig", "load_config", "parse_device_spec"]

PORTS = ("sink", "echo", "source", "switch", "tap")
DEVICE_TYPES = ("net",)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


@dataclass(frozen=True)
class DeviceConfig:
    """One vhost-user device the daemon serves."""

    name: str
    socket: str
    type: str = "net"
    port: str = "sink"
    client: bool = False  # connect to the socket (and reconnect) instead of listening on it
    queues: int = 1  # queue pairs
    mac: str = ""  # empty: derived from the name
    mtu: int = 1500
    switch: str = "default"  # which switch a port=switch device joins
    frame_size: int = 64  # port=source: generated frame length (without the net header)
    tap_name: str = ""  # port=tap: interface name (empty: chosen by the kernel)
    tap_netns: str = ""  # port=tap: move the interface into this namespace (created if absent)
    tap_address: str = ""  # port=tap: address/prefix to give the interface, e.g. 10.0.0.1/24
    worker: int = -1  # explicit placement (shared mode, later); -1: the policy decides
    in_order: bool = True  # offer VIRTIO_F_IN_ORDER (chains are always completed in avail order)
    # [device.params]: this device's own values of device-scope parameters, as typed, in order
    params: tuple[tuple[str, Any], ...] = ()

    def effective_mac(self) -> bytes:
        if self.mac:
            return bytes(int(b, 16) for b in self.mac.split(":"))
        # Locally administered, unicast, stable per name.
        h = 0
        for ch in self.name.encode():
            h = (h * 131 + ch) & 0xFFFFFFFF
        return bytes([0x52, 0x54, 0x00, (h >> 16) & 0xFF, (h >> 8) & 0xFF, h & 0xFF])


@dataclass(frozen=True)
class DaemonConfig:
    devices: tuple[DeviceConfig, ...]
    control: str = ""  # control socket path ("" = none)
    metrics: str | None = None  # "HOST:PORT" of the Prometheus endpoint (None = none)
    param_table: dict[str, Any] = field(default_factory=dict)  # [params] of the file, as typed
    param_items: tuple[str, ...] = ()  # --param name=value, in order (they win over the file)
    path: str = ""  # the config file, for messages


_DAEMON_KEYS = ("control", "metrics")  # the keys of the [daemon] table
_INT_RANGES = {
    "queues": (1, 64),
    "mtu": (68, 65535),
    "frame_size": (60, 9000),
    "worker": (-1, 1023),
}
_BOOL_KEYS = {"client", "in_order"}
_STR_KEYS = {
    "name", "socket", "type", "port", "mac", "switch", "tap_name", "tap_netns", "tap_address",
}


def _coerce(key: str, value: Any, where: str) -> Any:
    if key in _INT_RANGES:
        lo, hi = _INT_RANGES[key]
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {key}={value!r}: expected an integer in [{lo}, {hi}]")
        try:
            ivalue = int(value, 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: {key}={value!r}: expected an integer in [{lo}, {hi}]"
            ) from None
        if not lo <= ivalue <= hi:
            raise ConfigError(f"{where}: {key}={ivalue}: out of range, allowed [{lo}, {hi}]")
        return ivalue
    if key in _BOOL_KEYS:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: {key}={value!r}: expected true or false")
    if key in _STR_KEYS:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}={value!r}: expected a string")
        return value
    known = sorted(_INT_RANGES) + sorted(_BOOL_KEYS) + sorted(_STR_KEYS) + ["params"]
    raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(known)}")


def _param_table(raw: Any, where: str) -> tuple[tuple[str, Any], ...]:
    """A table of parameter name = scalar value (the registry checks the rest)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table of parameter = value, got {raw!r}")
    for key, value in raw.items():
        if isinstance(value, dict | list):
            raise ConfigError(f"{where}: {key} = {value!r}: expected a single value")
    return tuple((str(k), v) for k, v in raw.items())


def _device_from_mapping(raw: dict[str, Any], where: str) -> DeviceConfig:
    values = {k: _coerce(k, v, where) for k, v in raw.items() if k != "params"}
    if "params" in raw:
        if not isinstance(raw["params"], dict):
            raise ConfigError(
                f"{where}: params={raw['params']!r}: expected a table ([device.params] in a "
                "config file; on the command line use --param NAME@DEVICE=VALUE)"
            )
        values["params"] = _param_table(raw["params"], f"{where} [device.params]")
    for required in ("name", "socket"):
        if not values.get(required):
            raise ConfigError(f"{where}: missing required key {required!r}")
    name = values["name"]
    if not _NAME_RE.match(name):
        raise ConfigError(f"{where}: name={name!r}: expected 1-32 characters of [A-Za-z0-9_.-]")
    where = f"{where} ({name})"
    if values.get("type", "net") not in DEVICE_TYPES:
        raise ConfigError(
            f"{where}: type={values['type']!r}: allowed {', '.join(DEVICE_TYPES)}"
        )
    if values.get("port", "sink") not in PORTS:
        raise ConfigError(f"{where}: port={values['port']!r}: allowed {' | '.join(PORTS)}")
    mac = values.get("mac", "")
    if mac:
        if not _MAC_RE.match(mac):
            raise ConfigError(f"{where}: mac={mac!r}: expected six hex bytes like 52:54:00:12:34:56")
        if int(mac[:2], 16) & 1:
            raise ConfigError(f"{where}: mac={mac!r}: a multicast address cannot be a device MAC")
    sock = values["socket"]
    if len(sock.encode()) > 107:
        raise ConfigError(f"{where}: socket={sock!r}: a UNIX socket path is at most 107 bytes")
    if values.get("port") != "tap":
        for key in ("tap_name", "tap_netns", "tap_address"):
            if values.get(key):
                raise ConfigError(f"{where}: {key} is only meaningful with port = \"tap\"")
    if values.get("tap_name") and len(values["tap_name"]) > 15:
        raise ConfigError(f"{where}: tap_name={values['tap_name']!r}: at most 15 characters")
    return DeviceConfig(**values)


def parse_device_spec(spec: str) -> DeviceConfig:
    """Parse `name=net0,type=net,socket=PATH,port=sink` (the --device option)."""
    raw: dict[str, Any] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"--device {spec!r}: {item!r} is not key=value")
        key, value = item.split("=", 1)
        raw[key.strip()] = value.strip()
    return _device_from_mapping(raw, f"--device {spec!r}")


def _check_unique(devices: list[DeviceConfig]) -> None:
    seen_names: set[str] = set()
    seen_socks: set[str] = set()
    for dev in devices:
        if dev.name in seen_names:
            raise ConfigError(f"device name {dev.name!r} is used twice")
        if dev.socket in seen_socks:
            raise ConfigError(f"socket {dev.socket!r} is used by two devices")
        seen_names.add(dev.name)
        seen_socks.add(dev.socket)


def load_config(
    path: str | None = None,
    device_specs: list[str] | None = None,
    control: str | None = None,
    params: list[str] | None = None,
    metrics: str | None = None,
) -> DaemonConfig:
    """Combine a TOML file and command-line devices into one checked configuration.

    `control` and `metrics` given here (the command line) win over the file's [daemon] table."""
    devices: list[DeviceConfig] = []
    file_params: dict[str, Any] = {}
    file_control = ""
    file_metrics: str | None = None
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path}: invalid TOML: {err}") from err
        unknown = set(data) - {"device", "daemon", "params"}
        if unknown:
            raise ConfigError(
                f"config file {path}: unknown table(s) {sorted(unknown)}; "
                "allowed: [[device]], [daemon], [params]"
            )
        raw_devices = data.get("device", [])
        if not isinstance(raw_devices, list):
            raise ConfigError(f"config file {path}: 'device' must be an array of tables [[device]]")
        for i, raw in enumerate(raw_devices):
            if not isinstance(raw, dict):
                raise ConfigError(f"config file {path}: device #{i + 1} is not a table")
            devices.append(_device_from_mapping(raw, f"{path}: device #{i + 1}"))
        daemon = data.get("daemon", {})
        if not isinstance(daemon, dict):
            raise ConfigError(f"config file {path}: [daemon] must be a table")
        for key, value in daemon.items():
            if key not in _DAEMON_KEYS:
                raise ConfigError(
                    f"config file {path}: [daemon] unknown key {key!r}; "
                    f"known: {', '.join(_DAEMON_KEYS)}"
                )
            if key == "control":
                if not isinstance(value, str):
                    raise ConfigError(
                        f"config file {path}: [daemon] control={value!r}: expected a string path"
                    )
                file_control = value
            else:
                if not isinstance(value, str):
                    raise ConfigError(
                        f"config file {path}: [daemon] metrics={value!r}: expected a string "
                        "\"HOST:PORT\", e.g. \"127.0.0.1:9477\""
                    )
                parse_addr(value, what=f"config file {path}: [daemon] metrics")
                file_metrics = value
        raw_params = data.get("params", {})
        if not isinstance(raw_params, dict):
            raise ConfigError(f"config file {path}: [params] must be a table")
        file_params = dict(_param_table(raw_params, f"config file {path}: [params]"))
    if metrics is not None:
        parse_addr(metrics, what="--metrics")
    for spec in device_specs or []:
        devices.append(parse_device_spec(spec))
    if not devices:
        raise ConfigError("no devices: give --config FILE or at least one --device")
    _check_unique(devices)
    return DaemonConfig(
        devices=tuple(devices),
        control=control if control is not None else file_control,
        metrics=metrics if metrics is not None else file_metrics,
        param_table=file_params,
        param_items=tuple(params or ()),
        path=path or "",
    )

