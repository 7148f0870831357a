"""The daemon's own parameter registry: per-device values from the config file, the command line
and the control socket reach the workers (the policy's per-queue settings) and the device's
busy-poll window; a device without its own value follows the global one; refusals; two daemons in
one process share nothing. In-process daemons on real UNIX sockets, no guest attached."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from iosched.params import Registry, Source
from vhostx.config import load_config
from vhostx.daemon import PARAM_SPECS, Daemon, new_registry
from virtio.errors import ConfigError


def config(tmp_path: Path, *, params: tuple[str, ...] = (), extra: str = "", tag: str = "") -> Any:
    f = tmp_path / f"d{tag}.toml"
    f.write_text(
        f"[params]\nworkers = 1\n{extra}\n"
        f'[[device]]\nname = "net0"\nsocket = "{tmp_path}/n0{tag}.sock"\n'
        "[device.params]\nturn_max_packets = 32\nbusy_poll_us = 0\n"
        f'[[device]]\nname = "net1"\nsocket = "{tmp_path}/n1{tag}.sock"\n'
    )
    return load_config(str(f), None, None, list(params))


def run(body: Callable[..., Awaitable[None]], *daemons: Daemon) -> None:
    async def main() -> None:
        try:
            for d in daemons:
                await d.start()
            await body(*daemons)
        finally:
            for d in daemons:
                await d.stop()

    asyncio.run(main())


def on(device: str) -> Any:
    """What the policy sees of a queue of `device` (QueueState's work)."""
    return SimpleNamespace(work=SimpleNamespace(name=f"{device}.tx0", device=device))


def budget(d: Daemon, device: str) -> tuple[int, int]:
    """The batch budget the worker serving `device` applies to its queues."""
    assert d.pool is not None
    home = d.pool._homes[device]
    return d.pool.workers[home].policy.batch_budget(on(device))


def test_device_values_from_config_reach_the_worker_and_the_device(tmp_path: Path) -> None:
    d = Daemon(config(tmp_path))

    async def body(d: Daemon) -> None:
        assert d.mode == "shared"  # the default
        assert budget(d, "net0") == (32, 524288) and budget(d, "net1") == (256, 524288)
        net0, net1 = d.devices
        assert (net0.busy_poll.ns, net1.busy_poll.ns) == (0, 50_000)
        got = d.control({"cmd": "param_get", "name": "turn_max_packets", "device": "net0"})
        assert got == {"ok": True, "name": "turn_max_packets", "value": 32, "source": "config",
                       "device": "net0", "own": True}
        got = d.control({"cmd": "param_get", "name": "turn_max_packets", "device": "net1"})
        assert (got["value"], got["source"], got["own"]) == (256, "default", False)
        st = d.stats()
        assert st["device_params"] == {"net0": {"busy_poll_us": 0, "turn_max_packets": 32}}
        assert st["params"]["turn_max_packets"] == 256
        rows = {r["name"]: r for r in d.control({"cmd": "params"})["params"]}
        assert rows["busy_poll_us"]["devices"] == {"net0": {"value": 0, "source": "config"}}

    run(body, d)


def test_run_time_device_value_and_following_the_global_one(tmp_path: Path) -> None:
    d = Daemon(config(tmp_path))

    async def body(d: Daemon) -> None:
        ok = await d.control_async({"cmd": "param_set", "name": "turn_max_packets",
                                    "value": "8", "device": "net1"})
        assert (ok["value"], ok["source"], ok["own"]) == (8, "runtime", True)
        assert budget(d, "net1") == (8, 524288) and budget(d, "net0")[0] == 32
        await d.control_async({"cmd": "param_set", "name": "busy_poll_us", "value": "20us",
                               "device": "net1"})
        assert d.devices[1].busy_poll.ns == 20_000 and d.devices[0].busy_poll.ns == 0
        # a global change: a device without its own value follows it, the others keep theirs
        await d.control_async({"cmd": "param_set", "name": "turn_max_bytes", "value": "64k"})
        assert budget(d, "net0") == (32, 65536) and budget(d, "net1") == (8, 65536)
        await d.control_async({"cmd": "param_set", "name": "busy_poll_us", "value": "7"})
        assert (d.devices[0].busy_poll.ns, d.devices[1].busy_poll.ns) == (0, 20_000)
        # dropping net1's run-time value: it follows the global value again, later changes too
        got = await d.control_async({"cmd": "param_reset", "name": "busy_poll_us",
                                     "device": "net1"})
        assert (got["value"], got["own"]) == (7, False) and d.devices[1].busy_poll.ns == 7_000
        await d.control_async({"cmd": "param_set", "name": "busy_poll_us", "value": "9"})
        assert d.devices[1].busy_poll.ns == 9_000
        await d.control_async({"cmd": "param_reset", "name": "turn_max_packets",
                               "device": "net1"})
        await d.control_async({"cmd": "param_set", "name": "turn_max_packets", "value": "99"})
        assert budget(d, "net1")[0] == 99 and budget(d, "net0")[0] == 32

    run(body, d)


@pytest.mark.parametrize(
    "req, words",
    [
        ({"name": "turn_max_packets", "value": "8", "device": "net9"},
         ["unknown device 'net9'", "devices: net0, net1"]),
        ({"name": "workers", "value": "2"}, ["workers: cannot be changed at run time"]),
        ({"name": "placement", "value": "least_loaded", "device": "net0"},
         ["placement@net0", "scope global"]),
        ({"name": "turn_max_packets", "value": "0", "device": "net0"},
         ["device net0: turn_max_packets='0': out of range, allowed [1, 65536] packets"]),
        ({"name": "busy_poll_us", "value": "fast"}, ["busy_poll_us='fast'", "allowed [0, 1000]"]),
    ],
)
def test_refused_run_time_values(tmp_path: Path, req: dict[str, Any], words: list[str]) -> None:
    d = Daemon(config(tmp_path))

    async def body(d: Daemon) -> None:
        with pytest.raises(ConfigError) as info:
            await d.control_async({"cmd": "param_set", **req})
        for w in words:
            assert w in str(info.value), str(info.value)
        assert budget(d, "net0") == (32, 524288)  # nothing changed
        assert d.params.device_snapshot()["net0"] == {"busy_poll_us": 0, "turn_max_packets": 32}

    run(body, d)


def test_command_line_device_values_beat_the_file(tmp_path: Path) -> None:
    cfg = config(tmp_path, params=("turn_max_packets@net0=64", "turn_max_packets=16"))
    d = Daemon(cfg)

    async def body(d: Daemon) -> None:
        assert budget(d, "net0")[0] == 64 and budget(d, "net1")[0] == 16
        assert d.params.source("turn_max_packets", "net0") is Source.CMDLINE

    run(body, d)


def test_two_daemons_in_one_process_share_no_value(tmp_path: Path) -> None:
    a = Daemon(config(tmp_path, tag="a"))
    b = Daemon(config(tmp_path, tag="b", extra="turn_max_bytes = 4096"))

    async def body(a: Daemon, b: Daemon) -> None:
        assert a.params is not b.params
        await a.control_async({"cmd": "param_set", "name": "turn_max_packets", "value": "3"})
        await a.control_async({"cmd": "param_set", "name": "busy_poll_us", "value": "1",
                               "device": "net1"})
        assert budget(a, "net1") == (3, 524288) and budget(b, "net1") == (256, 4096)
        assert a.devices[1].busy_poll.ns == 1_000 and b.devices[1].busy_poll.ns == 50_000

    run(body, a, b)


def test_baseline_mode_is_explicit_and_gets_device_values_too(tmp_path: Path) -> None:
    d = Daemon(config(tmp_path, params=("mode=baseline",)))

    async def body(d: Daemon) -> None:
        assert d.mode == "baseline" and d.pool is not None
        assert len(d.pool.workers) == 2  # one worker per device
        assert budget(d, "net0")[0] == 32 and budget(d, "net1")[0] == 256
        assert not d.pool.workers[0].settings.polling

    run(body, d)


def test_a_daemon_can_be_handed_its_registry(tmp_path: Path) -> None:
    reg = new_registry()
    reg.load_cmdline(["turn_max_bytes=8k"])
    d = Daemon(config(tmp_path), reg)

    async def body(d: Daemon) -> None:
        assert d.params is reg and reg.devices() == ["net0", "net1"]
        assert budget(d, "net1") == (256, 8192)

    run(body, d)
    assert set(Registry(PARAM_SPECS)) == set(reg)
