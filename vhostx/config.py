"""Daemon configuration: devices from a TOML file (configs/*.toml) or `--device k=v,...` strings.

Every value is checked here, before anything starts; a bad one raises ConfigError naming the key,
the value that came and what is allowed. Parameter values (`[params]`, a device's
`[device.params]`, `--param`) are only checked to be tables of scalars here: the daemon's
registry checks names, scopes and ranges when it starts. Called from the main thread at start-up
only.
"""

from __future__ import annotations

import grp
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from virtio.errors import ConfigError

from .metrics import parse_addr

__all__ = ["PORTS", "DaemonConfig", "DeviceConfig", "backend_device", "load_config",
           "parse_device_spec", "parse_socket_group", "parse_socket_mode"]

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
    rate_pps: int = 0  # port=source: frames per second per RX queue (0: as fast as buffers come)
    # port=source: TX frames come back on the pair's RX queue, MACs swapped, between the generated
    # ones (instead of being drained)
    echo_tx: bool = False
    tap_name: str = ""  # port=tap: interface name (empty: chosen by the kernel)
    tap_netns: str = ""  # port=tap: move the interface into this namespace (created if absent)
    tap_address: str = ""  # port=tap: address/prefix to give the interface, e.g. 10.0.0.1/24
    worker: int = -1  # explicit placement (shared mode, later); -1: the policy decides
    in_order: bool = True  # offer VIRTIO_F_IN_ORDER (chains are always completed in avail order)
    # offer VIRTIO_F_ACCESS_PLATFORM (vIOMMU: descriptors are IOVAs, the device IOTLB protocol)
    # with the BACKEND_REQ protocol feature it needs
    iommu: bool = False
    socket_group: str = ""  # listening socket: its group (name or gid); "" = the daemon's group
    socket_mode: int = -1  # listening socket: its permission bits, e.g. 0o660; -1 = as created
    fd: int = -1  # serve this inherited, connected socket (`serve --fd N`) instead of `socket`
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


_DAEMON_KEYS = ("control", "metrics", "socket_group", "socket_mode")  # the [daemon] table
_INT_RANGES = {
    "queues": (1, 64),
    "mtu": (68, 65535),
    "frame_size": (60, 9000),
    "rate_pps": (0, 100_000_000),
    "worker": (-1, 1023),
}
_BOOL_KEYS = {"client", "echo_tx", "in_order", "iommu"}
_STR_KEYS = {
    "name", "socket", "type", "port", "mac", "switch", "tap_name", "tap_netns", "tap_address",
}
_SOCKET_KEYS = {"socket_group", "socket_mode"}  # checked by parse_socket_group/_mode
_OCTAL_RE = re.compile(r"^(0o|0)?([0-7]{1,4})$")


def parse_socket_mode(value: Any, where: str) -> int:
    """A socket's permission bits from a string of octal digits ("0660", "660", "0o660")."""
    m = _OCTAL_RE.match(value) if isinstance(value, str) else None
    mode = int(m.group(2), 8) if m else -1
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{where}: socket_mode={value!r}: expected a string of octal permission "
                          "bits from \"0000\" to \"0777\", e.g. \"0660\"")
    return mode


def parse_socket_group(value: Any, where: str) -> str:
    """A group that exists on this host, by name or number; returned as given."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: socket_group={value!r}: expected a group name or number")
    try:
        if value.isdigit():
            grp.getgrgid(int(value))
        else:
            grp.getgrnam(value)
    except (KeyError, OverflowError):
        raise ConfigError(f"{where}: socket_group={value!r}: no such group on this host") from None
    return value


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
    if key == "socket_mode":
        return parse_socket_mode(value, where)
    if key == "socket_group":
        return parse_socket_group(value, where)
    if key in _STR_KEYS:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}={value!r}: expected a string")
        return value
    known = (sorted(_INT_RANGES) + sorted(_BOOL_KEYS) + sorted(_STR_KEYS) + sorted(_SOCKET_KEYS)
             + ["params"])
    raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(known)}")


def _param_table(raw: Any, where: str) -> tuple[tuple[str, Any], ...]:
    """A table of parameter name = scalar value (the registry checks the rest)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table of parameter = value, got {raw!r}")
    for key, value in raw.items():
        if isinstance(value, dict | list):
            raise ConfigError(f"{where}: {key} = {value!r}: expected a single value")
    return tuple((str(k), v) for k, v in raw.items())


def _device_from_mapping(raw: dict[str, Any], where: str, fd: int = -1) -> DeviceConfig:
    values = {k: _coerce(k, v, where) for k, v in raw.items() if k != "params"}
    if "params" in raw:
        if not isinstance(raw["params"], dict):
            raise ConfigError(
                f"{where}: params={raw['params']!r}: expected a table ([device.params] in a "
                "config file; on the command line use --param NAME@DEVICE=VALUE)"
            )
        values["params"] = _param_table(raw["params"], f"{where} [device.params]")
    for required in ("name",) if fd >= 0 else ("name", "socket"):
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
    sock = values.get("socket", "")
    if len(sock.encode()) > 107:
        raise ConfigError(f"{where}: socket={sock!r}: a UNIX socket path is at most 107 bytes")
    if values.get("client") or fd >= 0:
        for key in sorted(_SOCKET_KEYS & set(values)):
            raise ConfigError(f"{where}: {key} applies to a socket the daemon listens on, not to "
                              + ("an inherited --fd" if fd >= 0 else "client = true"))
    if values.get("port") != "tap":
        for key in ("tap_name", "tap_netns", "tap_address"):
            if values.get(key):
                raise ConfigError(f"{where}: {key} is only meaningful with port = \"tap\"")
    if values.get("echo_tx") and values.get("port", "sink") != "source":
        raise ConfigError(f"{where}: echo_tx is only meaningful with port = \"source\" (port = "
                          f"\"{values.get('port', 'sink')}\"; an echo port echoes every frame)")
    if values.get("tap_name") and len(values["tap_name"]) > 15:
        raise ConfigError(f"{where}: tap_name={values['tap_name']!r}: at most 15 characters")
    values.setdefault("socket", "")  # an --fd device has none
    return DeviceConfig(**values, fd=fd)


def _spec_items(items: list[str], where: str) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"{where}: {item!r} is not key=value")
        key, value = item.split("=", 1)
        raw[key.strip()] = value.strip()
    return raw


def parse_device_spec(spec: str) -> DeviceConfig:
    """Parse `name=net0,type=net,socket=PATH,port=sink` (the --device option)."""
    return _device_from_mapping(_spec_items(spec.split(","), f"--device {spec!r}"),
                                f"--device {spec!r}")


def backend_device(*, socket_path: str | None = None, fd: int | None = None, name: str = "net0",
                   port: str = "sink", options: list[str] | None = None) -> DeviceConfig:
    """The one net device of `serve --socket-path PATH` or `serve --fd N` (QEMU's backend program
    conventions); `options` are further device keys as KEY=VALUE strings."""
    where = f"--socket-path {socket_path}" if socket_path is not None else f"--fd {fd}"
    raw = _spec_items(list(options or []), f"{where} --device-option")
    for key, option in (("name", "--name"), ("port", "--port"), ("socket", "--socket-path")):
        if key in raw:
            raise ConfigError(f"{where}: give the device's {key} with {option}, "
                              "not as a --device-option")
    raw.update(name=name, port=port, type=raw.get("type", "net"))
    if socket_path is not None:
        return _device_from_mapping({**raw, "socket": socket_path}, where)
    if fd is None or fd < 0:
        raise ConfigError(f"--fd {fd}: expected a file descriptor number >= 0")
    return _device_from_mapping(raw, where, fd=fd)


def _check_unique(devices: list[DeviceConfig]) -> None:
    seen_names: set[str] = set()
    seen_socks: set[str] = set()
    for dev in devices:
        if dev.name in seen_names:
            raise ConfigError(f"device name {dev.name!r} is used twice")
        if dev.socket in seen_socks:
            raise ConfigError(f"socket {dev.socket!r} is used by two devices")
        seen_names.add(dev.name)
        if dev.socket:
            seen_socks.add(dev.socket)


def _with_socket_defaults(dev: DeviceConfig, defaults: dict[str, Any]) -> DeviceConfig:
    """A listening device without its own socket_group/socket_mode takes the daemon's."""
    if dev.client or dev.fd >= 0 or not defaults:
        return dev
    changes = {k: v for k, v in defaults.items() if getattr(dev, k) in ("", -1)}
    return replace(dev, **changes) if changes else dev


def load_config(
    path: str | None = None,
    device_specs: list[str] | None = None,
    control: str | None = None,
    params: list[str] | None = None,
    metrics: str | None = None,
    *,
    extra_devices: tuple[DeviceConfig, ...] = (),
    socket_group: str | None = None,
    socket_mode: str | None = None,
) -> DaemonConfig:
    """Combine a TOML file and command-line devices into one checked configuration.

    `control`, `metrics`, `socket_group` and `socket_mode` given here (the command line) win over
    the file's [daemon] table; the socket ones are defaults for devices that set neither.
    `extra_devices` (the one of `--socket-path`/`--fd`) come after those of the file and --device."""
    devices: list[DeviceConfig] = []
    file_params: dict[str, Any] = {}
    file_control = ""
    file_metrics: str | None = None
    sock_defaults: dict[str, Any] = {}
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
            if key in _SOCKET_KEYS:
                sock_defaults[key] = _coerce(key, value, f"config file {path}: [daemon]")
            elif key == "control":
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
    devices.extend(extra_devices)
    if not devices:
        raise ConfigError("no devices: give --config FILE, --socket-path PATH, --fd N or at least "
                          "one --device")
    if socket_group is not None:
        sock_defaults["socket_group"] = parse_socket_group(socket_group, "--socket-group")
    if socket_mode is not None:
        sock_defaults["socket_mode"] = parse_socket_mode(socket_mode, "--socket-mode")
    devices = [_with_socket_defaults(dev, sock_defaults) for dev in devices]
    _check_unique(devices)
    return DaemonConfig(
        devices=tuple(devices),
        control=control if control is not None else file_control,
        metrics=metrics if metrics is not None else file_metrics,
        param_table=file_params,
        param_items=tuple(params or ()),
        path=path or "",
    )

