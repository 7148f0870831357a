"""Configuration parsing: every bad value is refused naming the key, the value and the range."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vhostx.config import load_config, parse_device_spec
from virtio.errors import ConfigError


def test_device_spec_round_trip() -> None:
    d = parse_device_spec("name=net0,type=net,socket=/tmp/x.sock,port=echo,queues=2")
    assert (d.name, d.type, d.socket, d.port, d.queues) == ("net0", "net", "/tmp/x.sock", "echo", 2)
    assert len(d.effective_mac()) == 6 and not d.effective_mac()[0] & 1


@pytest.mark.parametrize(
    "spec, words",
    [
        ("name=a,socket=/tmp/a,port=bogus", ["port", "bogus", "sink"]),
        ("name=a,socket=/tmp/a,queues=0", ["queues", "0", "[1, 64]"]),
        ("name=a,socket=/tmp/a,queues=x", ["queues", "integer"]),
        ("name=a,socket=/tmp/a,colour=red", ["unknown key", "colour"]),
        ("name=a,port=sink", ["socket"]),
        ("name=a b,socket=/tmp/a", ["name"]),
        ("name=a,socket=/tmp/a,mac=01:00:00:00:00:01", ["multicast"]),
        ("name=a,socket=/tmp/a,mac=zz", ["mac"]),
        ("name=a,socket=/tmp/a,tap_netns=ns1", ["tap_netns", "tap"]),
        ("name=a,socket=/tmp/a,client=maybe", ["client", "true or false"]),
        ("name=a,socket=" + "/x" * 60, ["107"]),
    ],
)
def test_bad_device_specs_are_refused_clearly(spec: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_device_spec(spec)
    for w in words:
        assert w in str(info.value)


def test_toml_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        '[daemon]\ncontrol = "/tmp/ctl"\n[params]\nfoo = 1\n'
        '[[device]]\nname = "net0"\ntype = "net"\nsocket = "/tmp/n0"\nport = "sink"\nqueues = 1\n'
        '[[device]]\nname = "net1"\nsocket = "/tmp/n1"\nport = "switch"\nclient = true\n'
    )
    cfg = load_config(str(f), ["name=net2,socket=/tmp/n2"], None, ["foo=2"])
    assert [d.name for d in cfg.devices] == ["net0", "net1", "net2"]
    assert cfg.devices[1].client is True
    assert cfg.control == "/tmp/ctl"
    assert cfg.param_table == {"foo": 1} and cfg.param_items == ("foo=2",)


@pytest.mark.parametrize(
    "text, words",
    [
        ("[[device]]\nname = 1\nsocket = '/tmp/a'\n", ["name", "string"]),
        ("[[device]\n", ["invalid TOML"]),
        ("[whatever]\n", ["unknown table"]),
        ("[[device]]\nname='a'\nsocket='/tmp/a'\n[[device]]\nname='a'\nsocket='/tmp/b'\n", ["twice"]),
        ("[[device]]\nname='a'\nsocket='/tmp/a'\n[[device]]\nname='b'\nsocket='/tmp/a'\n", ["two devices"]),
        ("[[device]]\nname='a'\nsocket='/tmp/a'\nqueues=true\n", ["queues"]),
    ],
)
def test_bad_toml_is_refused(tmp_path: Path, text: str, words: list[str]) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(f))
    for w in words:
        assert w in str(info.value)


def test_no_devices_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no devices"):
        load_config(None, [])


def test_cli_exits_2_on_bad_config(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vhostx", "serve", "--device",
         f"name=a,socket={tmp_path}/a.sock,port=nowhere"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert r.returncode == 2
    assert "port='nowhere'" in r.stderr and "sink | echo" in r.stderr


def test_cli_exits_2_when_socket_path_is_not_a_socket(tmp_path: Path) -> None:
    f = tmp_path / "plain"
    f.write_text("x")
    r = subprocess.run(
        [sys.executable, "-m", "vhostx", "serve", "--device", f"name=a,socket={f}"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert r.returncode == 2
    assert "not a socket" in r.stderr


def test_daemon_table_metrics_and_control(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[daemon]\ncontrol = "/tmp/ctl"\nmetrics = "127.0.0.1:9477"\n'
                 '[[device]]\nname = "net0"\nsocket = "/tmp/n0"\n')
    cfg = load_config(str(f))
    assert cfg.metrics == "127.0.0.1:9477" and cfg.control == "/tmp/ctl"
    # the command line wins over the file
    cfg = load_config(str(f), None, "/tmp/other", None, metrics="[::1]:0")
    assert cfg.metrics == "[::1]:0" and cfg.control == "/tmp/other"
    # no metrics anywhere: None
    assert load_config(None, ["name=a,socket=/tmp/a"]).metrics is None


@pytest.mark.parametrize(
    "daemon, words",
    [
        ('metrics = "9477"', ["[daemon] metrics", "'9477'", "HOST:PORT"]),
        ('metrics = "127.0.0.1:70000"', ["[daemon] metrics", "[0, 65535]"]),
        ("metrics = 9477", ["[daemon] metrics=9477", "string"]),
        ('metrics = "::1:80"', ["brackets"]),
        ("control = 3", ["[daemon] control=3", "string"]),
        ('metric = "127.0.0.1:1"', ["unknown key 'metric'", "control, metrics"]),
    ],
)
def test_bad_daemon_table_is_refused(tmp_path: Path, daemon: str, words: list[str]) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[daemon]\n{daemon}\n[[device]]\nname = 'a'\nsocket = '/tmp/a'\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(f))
    for w in words:
        assert w in str(info.value)


def test_bad_metrics_option_is_refused() -> None:
    with pytest.raises(ConfigError, match="--metrics='localhost'"):
        load_config(None, ["name=a,socket=/tmp/a"], metrics="localhost")


@pytest.mark.parametrize("args", [["--metrics", "nope"], ["--metrics", "127.0.0.1:99999"]])
def test_cli_exits_2_on_bad_metrics_address(tmp_path: Path, args: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vhostx", "serve", "--device", f"name=a,socket={tmp_path}/a.sock",
         *args],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert r.returncode == 2, r.stderr
    assert "--metrics=" in r.stderr and "configuration error" in r.stderr
    assert not (tmp_path / "a.sock").exists()  # refused before anything started


def test_cli_exits_2_on_bad_metrics_in_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f'[daemon]\nmetrics = "x:y"\n[[device]]\nname = "a"\nsocket = "{tmp_path}/a.sock"\n')
    r = subprocess.run([sys.executable, "-m", "vhostx", "serve", "--config", str(f)],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 2, r.stderr
    assert "[daemon] metrics='x:y'" in r.stderr


def test_device_params_table(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        '[params]\nturn_max_packets = 128\n'
        '[[device]]\nname = "net0"\nsocket = "/tmp/n0"\n'
        '[device.params]\nbusy_poll_us = 0\npoll_stop_idle = "1ms"\n'
        '[[device]]\nname = "net1"\nsocket = "/tmp/n1"\n'
        '[[device]]\nname = "net2"\nsocket = "/tmp/n2"\nparams = { turn_max_packets = 32 }\n'
    )
    cfg = load_config(str(f))
    assert [d.params for d in cfg.devices] == [
        (("busy_poll_us", 0), ("poll_stop_idle", "1ms")), (), (("turn_max_packets", 32),)]
    assert cfg.param_table == {"turn_max_packets": 128}


@pytest.mark.parametrize(
    "device, words",
    [
        ("params = 3", ["params=3", "expected a table", "--param NAME@DEVICE=VALUE"]),
        ("[device.params]\nbusy_poll_us = [1, 2]",
         ["[device.params]", "busy_poll_us = [1, 2]", "single value"]),
        ("[device.params.more]\nx = 1", ["[device.params]", "more", "single value"]),
    ],
)
def test_bad_device_params_are_refused(tmp_path: Path, device: str, words: list[str]) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[[device]]\nname = 'a'\nsocket = '/tmp/a'\n{device}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(f))
    for w in words:
        assert w in str(info.value), str(info.value)


def test_device_spec_params_point_to_param_option() -> None:
    with pytest.raises(ConfigError, match="--param NAME@DEVICE=VALUE"):
        parse_device_spec("name=a,socket=/tmp/a,params=busy_poll_us")


@pytest.mark.parametrize(
    "params, words",
    [
        ("workers = 2", ["device a [device.params]", "workers@a", "scope global"]),
        ("turn_max_packets = 0", ["device a [device.params]", "turn_max_packets=0",
                                  "allowed [1, 65536]"]),
        ("turn_max_packet = 8", ["unknown parameter 'turn_max_packet'", "turn_max_packets"]),
    ],
)
def test_cli_exits_2_on_bad_device_param(tmp_path: Path, params: str, words: list[str]) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f'[[device]]\nname = "a"\nsocket = "{tmp_path}/a.sock"\n[device.params]\n{params}\n')
    r = subprocess.run([sys.executable, "-m", "vhostx", "serve", "--config", str(f)],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 2, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    assert not (tmp_path / "a.sock").exists()  # refused before anything started
