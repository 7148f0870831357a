"""The scenario's data: backends, clients, placement, run settings, tests and their cases.

Frozen dataclasses built by the scenario file's parser (bench/harness/scenario.py, which
re-exports every name here), `Scenario.cases()` expanding each test's sweep (cartesian product,
in file order) into `Case`s and checking the rules across keys on every one, and
`Scenario.with_overrides()` for the command line. `ScenarioError` (a `ConfigError`) names the
key, the value that came and what is allowed. Pure module: no I/O; any thread.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from virtio.errors import ConfigError

__all__ = [
    "BACKEND_KINDS",
    "CLIENTS",
    "DIRECTIONS",
    "MAX_DEVICES",
    "MODES",
    "SWEEPABLE",
    "TEST_KINDS",
    "Backend",
    "Case",
    "GuestModelClient",
    "ModeSettings",
    "Placement",
    "QemuClient",
    "RunSettings",
    "Scenario",
    "ScenarioError",
    "TestSpec",
    "TestpmdClient",
    "param_text",
]

BACKEND_KINDS = ("vhostx", "dpdk", "vfio")
TEST_KINDS = ("stream", "pingpong", "idle")
DIRECTIONS = ("guest_tx", "guest_rx")
MODES = ("baseline", "shared")
SWEEPABLE = ("devices", "busy", "size", "rate", "queues", "direction")
CLIENTS = ("testpmd", "guest_model", "qemu")
MAX_DEVICES = 64


class ScenarioError(ConfigError):
    """A scenario file is invalid: the message names the key, the value and what is allowed."""


# ----------------------------------------------------------------------------------------------
# the data


@dataclass(frozen=True)
class RunSettings:
    duration: float = 5.0  # measurement window, seconds
    warmup: float = 2.0  # excluded, before the window
    repeats: int = 3  # runs per backend per case (A B A B ...)
    quiet_wait: float = 0.0  # before each run wait up to this long for idle cores (0: off)
    quiet_cores: float = 1.5  # idle cores wanted
    reference: str = ""  # backend the ratios are against ("" -> the last backend)
    min_pairs: int = 0  # same-mode pairs wanted per compared backend and case (0: min(3, repeats))
    max_extra_repeats: int = -1  # extra repetitions allowed per case to get them (-1: repeats)

    @property
    def pairs_wanted(self) -> int:
        return self.min_pairs or min(3, self.repeats)

    @property
    def extra_limit(self) -> int:
        return self.repeats if self.max_extra_repeats < 0 else self.max_extra_repeats


@dataclass(frozen=True)
class ModeSettings:
    """How each run's machine mode is found (`[modes]`, bench/harness/modes.py)."""

    probe: str = "dpdk"  # "dpdk": a DPDK-vs-DPDK reference probe before and after each run
    probe_duration: float = 0.5  # s, the probe's window
    gap: float = 1.8  # ratio between neighbouring rates that separates two modes
    slices: int = 4  # parts of a run's window whose rates are compared (1: off)

    def as_dict(self) -> dict[str, Any]:
        return {"probe": self.probe, "probe_duration": self.probe_duration, "gap": self.gap,
                "slices": self.slices}


@dataclass(frozen=True)
class Placement:
    backend_core: int = 1  # backend threads (vhostx daemon affinity, DPDK forwarding lcore)
    client_core: int = 0  # the client (testpmd forwarding lcore, the guest model's thread)


@dataclass(frozen=True)
class Backend:
    name: str
    kind: str  # vhostx | dpdk | vfio (reserved)
    mode: str = "baseline"  # vhostx
    params: tuple[tuple[str, Any], ...] = ()  # vhostx --param name=value, in file order
    memory_mb: int = 1024  # dpdk
    total_num_mbufs: int = 0  # dpdk; 0: sized from the number of devices
    burst: int = 0  # dpdk; 0: testpmd's default (32)

    def param_args(self) -> list[str]:
        """The daemon's --param items: mode first, then the scenario's params."""
        items = [f"mode={self.mode}"]
        items += [f"{k}={param_text(v)}" for k, v in self.params]
        return items


def param_text(value: Any) -> str:
    """A parameter value as the daemon's --param takes it (booleans as true / false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class TestpmdClient:
    queue_size: int = 0  # 0: DPDK's default (256)
    burst: int = 0  # 0: default (32)
    memory_mb: int = 1024
    total_num_mbufs: int = 0  # 0: sized from the number of devices
    mbcache: int = 0  # testpmd --mbcache (the lcore's mempool cache); 0: testpmd's default (250)
    mrg_rxbuf: bool | None = None
    in_order: bool | None = None
    packed_vq: bool | None = None


@dataclass(frozen=True)
class GuestModelClient:
    queue_size: int = 256
    wait: str = "interrupt"  # pingpong: wait for the call eventfd, or "poll" the used ring
    mem_mb: int = 16  # guest memory per device


@dataclass(frozen=True)
class QemuClient:
    memory_mb: int = 256  # guest RAM (memfd, shared with the backend)
    boot_timeout: float = 180.0  # s from QEMU start to the guest's VX-READY


@dataclass(frozen=True)
class TestSpec:
    """One [[tests]] entry before its sweep is expanded."""

    __test__ = False

    name: str
    kind: str  # stream | pingpong | idle
    direction: str = "guest_tx"
    size: int = 64
    devices: int = 1
    busy: int = 0  # stream: devices carrying traffic (0: all)
    queues: int = 1  # queue pairs per device
    rate: int = 0  # stream: offered packets/s per device (0: unlimited, testpmd)
    client: str = ""  # "" -> testpmd for unlimited streams, guest_model otherwise; or qemu
    idle_time: float = 0.0  # idle: seconds without traffic before the window
    pingpong_alongside: bool = False  # stream: one more device carrying a guest-model ping-pong
    pingpong_rate: int = 1000  # round trips/s the alongside flow attempts (0: back to back)
    sweep: tuple[tuple[str, tuple[Any, ...]], ...] = ()


@dataclass(frozen=True)
class Case:
    """One point of a test: every dimension fixed."""

    test: str
    kind: str
    direction: str
    size: int
    devices: int
    busy: int
    queues: int
    rate: int
    client: str
    idle_time: float
    sweep_values: tuple[tuple[str, Any], ...] = ()
    pingpong_alongside: bool = False  # one more device (not counted in `devices`): a ping-pong
    pingpong_rate: int = 1000  # flow by the guest model during the stream's window
    rx_ping_us: int = 0  # client qemu, guest_rx: vxperf also pings every this many us on the
    # same NIC (the backend reflects guest TX into the stream: a `source` port with echo_tx)

    @property
    def label(self) -> str:
        if not self.sweep_values:
            return self.test
        return self.test + "[" + ",".join(f"{k}={v}" for k, v in self.sweep_values) + "]"

    @property
    def busy_devices(self) -> int:
        return self.devices if self.busy == 0 else self.busy


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    run: RunSettings
    placement: Placement
    backends: tuple[Backend, ...]
    testpmd: TestpmdClient
    guest_model: GuestModelClient
    tests: tuple[TestSpec, ...]
    source: str = ""  # the file it came from
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    qemu: QemuClient = QemuClient()
    modes: ModeSettings = ModeSettings()

    @property
    def reference(self) -> str:
        return self.run.reference or self.backends[-1].name

    def cases(self) -> list[Case]:
        out: list[Case] = []
        for t in self.tests:
            keys = [k for k, _ in t.sweep]
            for combo in itertools.product(*(vals for _, vals in t.sweep)) if t.sweep else [()]:
                values = dict(zip(keys, combo, strict=True))
                base = replace(t, **values) if values else t
                client = base.client or ("testpmd" if base.kind == "stream" and base.rate == 0
                                         else "guest_model")
                case = Case(base.name, base.kind, base.direction, base.size, base.devices,
                            base.busy, base.queues, base.rate, client, base.idle_time,
                            tuple(values.items()), base.pingpong_alongside,
                            base.pingpong_rate)
                _check_case(case, f"tests '{t.name}'" + (f" sweep {values}" if values else ""))
                out.append(case)
        return out

    def with_overrides(self, *, repeats: int | None = None, duration: float | None = None,
                       warmup: float | None = None, quiet_wait: float | None = None,
                       backends: list[str] | None = None,
                       tests: list[str] | None = None, min_pairs: int | None = None,
                       max_extra_repeats: int | None = None,
                       probe: str | None = None) -> Scenario:
        """The scenario with command-line overrides applied (validated like the file)."""
        run = self.run
        for key, value, lo, hi in (("repeats", repeats, 1, 100), ("duration", duration, 0.1, 3600),
                                   ("warmup", warmup, 0.0, 600), ("quiet_wait", quiet_wait, 0, 3600),
                                   ("min_pairs", min_pairs, 0, 100),
                                   ("max_extra_repeats", max_extra_repeats, -1, 100)):
            if value is not None:
                if not lo <= value <= hi:
                    raise ScenarioError(f"--{key.replace('_', '-')} {value}: out of range, "
                                        f"allowed [{lo}, {hi}]")
                run = replace(run, **{key: value})  # type: ignore[arg-type]
        sc = replace(self, run=run)
        if probe is not None:
            if probe not in ("dpdk", "none"):
                raise ScenarioError(f"--probe {probe!r}: allowed dpdk | none")
            sc = replace(sc, modes=replace(sc.modes, probe=probe))
        if backends:
            _check_named("backends", "backend", backends, [b.name for b in self.backends])
            sc = replace(sc, backends=tuple(b for b in self.backends if b.name in backends))
            if sc.run.reference and sc.run.reference not in backends:
                sc = replace(sc, run=replace(sc.run, reference=""))
        if tests:
            _check_named("tests", "test", tests, [t.name for t in self.tests])
            sc = replace(sc, tests=tuple(t for t in self.tests if t.name in tests))
        return sc


def _check_named(option: str, what: str, names: list[str], known: list[str]) -> None:
    """Every name given to --OPTION must be a WHAT of the scenario."""
    for name in names:
        if name not in known:
            raise ScenarioError(f"--{option}: {name!r} is not a {what} of this scenario; "
                                f"known: {', '.join(known)}")


# ----------------------------------------------------------------------------------------------
# the rules across keys


def _check_case(c: Case, where: str) -> None:
    """Rules across keys, checked on every expanded case."""
    if c.busy > c.devices:
        raise ScenarioError(f"{where}: busy = {c.busy} exceeds devices = {c.devices}")
    if c.client == "qemu":
        if c.kind == "idle":
            raise ScenarioError(f"{where}: client = 'qemu' runs kind = 'stream' or 'pingpong'")
        for key, value, want in (("devices", c.devices, 1), ("queues", c.queues, 1),
                                 ("rate", c.rate, 0), ("busy", c.busy, 0)):
            if value != want:
                raise ScenarioError(f"{where}: client = 'qemu' boots one guest with one NIC "
                                    f"and one queue pair, unpaced: {key} = {value} (allowed "
                                    f"{want})")
    elif c.kind == "stream":
        if c.rate and c.client == "testpmd":
            raise ScenarioError(f"{where}: rate = {c.rate} needs client = 'guest_model' (testpmd "
                                "txonly cannot pace a virtio-user port)")
        if c.rate and c.direction == "guest_rx":
            raise ScenarioError(f"{where}: rate applies to guest_tx only (in guest_rx the backend "
                                "is the sender)")
        if c.client == "guest_model" and c.direction == "guest_rx":
            raise ScenarioError(f"{where}: guest_rx streams use client = 'testpmd'")
        if c.client == "guest_model" and c.queues != 1:
            raise ScenarioError(f"{where}: the guest model drives one queue pair per device")
        if c.busy and c.client != "testpmd":
            raise ScenarioError(f"{where}: busy applies to testpmd clients only")
    else:
        if c.client == "testpmd":
            raise ScenarioError(f"{where}: kind = {c.kind!r} uses the guest model (or qemu) "
                                "client")
        for key, bad in (("rate", c.rate), ("busy", c.busy)):
            if bad:
                raise ScenarioError(f"{where}: {key} applies to kind = 'stream' only")
        if c.queues != 1:
            raise ScenarioError(f"{where}: kind = {c.kind!r} uses one queue pair per device")
    if c.kind != "idle" and c.idle_time:
        raise ScenarioError(f"{where}: idle_time applies to kind = 'idle' only")
    if c.pingpong_alongside:
        if c.kind != "stream" or c.client != "testpmd" or c.direction != "guest_tx":
            raise ScenarioError(f"{where}: pingpong_alongside applies to guest_tx streams driven "
                                f"by testpmd only (got kind = {c.kind!r}, client = {c.client!r}, "
                                f"direction = {c.direction!r})")
        if c.queues != 1:
            raise ScenarioError(f"{where}: pingpong_alongside needs queues = 1 (the guest model "
                                "drives one queue pair)")
        if c.devices + 1 > MAX_DEVICES:
            raise ScenarioError(f"{where}: pingpong_alongside adds a device: devices = "
                                f"{c.devices} + 1 exceeds {MAX_DEVICES}")
