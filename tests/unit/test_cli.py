"""The control-socket commands of the CLI (stats, workers, worker add/remove, migrate, param)
against a small fake daemon: a real UNIX socket speaking JSON lines. Also the error paths (no
daemon, a refused command, a daemon that hangs or babbles), the plugin commands (entry points;
vhostx imports no bench) and `vhostx-net`."""

from __future__ import annotations

import argparse
import importlib
import json
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostx import cli
from virtio.errors import ConfigError

Handler = Callable[[dict[str, Any]], Any]


class FakeDaemon:
    """Answers each JSON line with handler(request); records the requests. The handler may return
    bytes to send raw, or None to never answer."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.sock.settimeout(0.1)  # here, not in the thread: close() may come before it runs
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, conn.makefile("rb") as f:  # the file holds the fd open too
                line = f.readline()
                if not line:
                    continue
                req = json.loads(line)
                self.requests.append(req)
                answer = self.handler(req)
                if answer is None:
                    self.stop.wait(3)
                    continue
                conn.sendall(answer if isinstance(answer, bytes) else json.dumps(answer).encode() + b"\n")

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[[Handler], FakeDaemon]]:
    made: list[FakeDaemon] = []

    def make(handler: Handler) -> FakeDaemon:
        d = FakeDaemon(str(tmp_path / f"ctl{len(made)}.sock"), handler)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


WORKERS = [
    {"index": 0, "name": "w0", "cpu": 2, "busy_ns": 3_000, "idle_ns": 1_000, "loops": 5,
     "works": 2, "devices": ["net0", "net1"], "polling": 1},
    {"index": 1, "name": "w1", "cpu": None, "busy_ns": 0, "idle_ns": 0, "works": 0,
     "devices": [], "polling": 0},
]


def shared_daemon(req: dict[str, Any]) -> dict[str, Any]:
    cmd = req["cmd"]
    if cmd == "workers":
        return {"ok": True, "workers": WORKERS}
    if cmd == "worker_add":
        return {"ok": True, "worker": 2}
    if cmd == "worker_remove":
        if req["worker"] == 0 and len(WORKERS) == 1:
            return {"ok": False, "error": "cannot remove the last worker"}
        if req["worker"] > 1:
            return {"ok": False, "error": f"no worker {req['worker']}; workers: 0, 1"}
        return {"ok": True}
    if cmd == "migrate":
        if req["device"] != "net0":
            return {"ok": False, "error": f"unknown device {req['device']!r}"}
        return {"ok": True}
    if cmd == "stats":
        return {"ok": True, "mode": "shared", "time": 1.0, "workers": WORKERS, "queues": [],
                "devices": []}
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_workers_lists_them(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    d = fake(shared_daemon)
    rc, out, _ = run(capsys, "workers", "--control", d.path)
    assert rc == 0 and d.requests == [{"cmd": "workers"}]
    lines = out.splitlines()
    assert lines[0].split() == ["worker", "name", "cpu", "works", "polling", "busy", "devices"]
    assert lines[1].split() == ["0", "w0", "2", "2", "1", "75.0%", "net0,net1"]
    assert lines[2].split() == ["1", "w1", "-", "0", "0", "-"]
    rc, out, _ = run(capsys, "workers", "--json", "--control", d.path)
    assert rc == 0 and json.loads(out) == WORKERS


def test_worker_add_and_remove_send_the_contract_commands(
        fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    d = fake(shared_daemon)
    rc, out, _ = run(capsys, "worker", "add", "--cpu", "3", "--control", d.path)
    assert rc == 0 and "added worker 2 on CPU 3" in out
    rc, out, _ = run(capsys, "worker", "add", "--control", d.path)
    assert rc == 0 and out.strip() == "added worker 2"
    rc, out, _ = run(capsys, "worker", "remove", "1", "--control", d.path)
    assert rc == 0 and "removed worker 1" in out
    assert d.requests == [{"cmd": "worker_add", "cpu": 3}, {"cmd": "worker_add", "cpu": None},
                          {"cmd": "worker_remove", "worker": 1}]


def test_migrate_sends_device_worker_and_queue(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    d = fake(shared_daemon)
    rc, out, _ = run(capsys, "migrate", "net0", "1", "--control", d.path)
    assert rc == 0 and "moved net0 to worker 1" in out
    rc, out, _ = run(capsys, "migrate", "net0", "0", "--queue", "net0.tx0", "--control", d.path)
    assert rc == 0 and "moved queue net0.tx0 of net0 to worker 0" in out
    assert d.requests == [{"cmd": "migrate", "device": "net0", "worker": 1},
                          {"cmd": "migrate", "device": "net0", "worker": 0, "queue": "net0.tx0"}]


@pytest.mark.parametrize("argv, words", [
    (["worker", "remove", "7"], ["refused 'worker_remove'", "no worker 7; workers: 0, 1"]),
    (["migrate", "net9", "0"], ["refused 'migrate'", "unknown device 'net9'"]),
])
def test_daemon_errors_exit_1_with_its_message(
        fake: Any, capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str]) -> None:
    d = fake(shared_daemon)
    rc, out, err = run(capsys, *argv, "--control", d.path)
    assert rc == 1 and out == ""
    for w in words:
        assert w in err


def test_old_daemon_without_the_commands(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    d = fake(lambda req: {"ok": False, "error": f"unknown command {req['cmd']!r}; known: ping, stats"})
    rc, _, err = run(capsys, "workers", "--control", d.path)
    assert rc == 1 and "the daemon refused 'workers': unknown command 'workers'" in err


def test_no_daemon_is_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "none.sock")
    rc, _, err = run(capsys, "workers", "--control", path)
    assert rc == 1
    assert f"no daemon is listening on the control socket {path}" in err
    assert "vhostx serve --control" in err
    # a stale socket file: it exists but nobody listens (the daemon was killed)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    rc, _, err = run(capsys, "stats", "--json", "--control", path)
    assert rc == 1 and "no daemon is listening" in err and "refused" in err.lower()


def test_hanging_daemon_times_out(fake: Any, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "CONTROL_TIMEOUT_S", 0.3)
    d = fake(lambda req: None)
    rc, _, err = run(capsys, "workers", "--control", d.path)
    assert rc == 1 and "did not answer 'workers' within 0.3 s" in err


@pytest.mark.parametrize("raw", [b"not json\n", b"[1, 2]\n", b'{"ok": tr'])
def test_malformed_answer(fake: Any, capsys: pytest.CaptureFixture[str], raw: bytes) -> None:
    d = fake(lambda req: raw)
    rc, _, err = run(capsys, "workers", "--control", d.path)
    assert rc == 1 and "malformed answer to 'workers'" in err


def test_stats_json_and_count(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    d = fake(shared_daemon)
    rc, out, _ = run(capsys, "stats", "--json", "--control", d.path)
    assert rc == 0 and json.loads(out)["mode"] == "shared"
    rc, out, _ = run(capsys, "stats", "--count", "1", "--interval", "0.05", "--control", d.path)
    assert rc == 0 and "workers" in out and "w0" in out
    assert [r["cmd"] for r in d.requests] == ["stats"] * 3


def test_stats_refused_by_daemon_exits_1(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    d = fake(lambda req: {"ok": False, "error": "shutting down"})
    rc, _, err = run(capsys, "stats", "--count", "1", "--control", d.path)
    assert rc == 1 and "shutting down" in err


@pytest.mark.parametrize("argv", [["--interval", "0"], ["--count", "-1"]])
def test_stats_bad_options_exit_2(fake: Any, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    d = fake(shared_daemon)
    rc, _, err = run(capsys, "stats", *argv, "--control", d.path)
    assert rc == 2 and "configuration error" in err


def test_worker_add_negative_cpu_is_refused_locally(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    d = fake(shared_daemon)
    rc, _, err = run(capsys, "worker", "add", "--cpu", "-1", "--control", d.path)
    assert rc == 2 and "--cpu=-1" in err and d.requests == []


def test_param_set_refused_value_exits_2(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    d = fake(lambda req: {"ok": False, "error": "turn_max_packets=0: out of range [1, 4096]"})
    rc, _, err = run(capsys, "param", "set", "turn_max_packets", "0", "--control", d.path)
    assert rc == 2 and "out of range" in err


def param_daemon() -> Handler:
    """Answers the param commands with a real (never started) daemon whose registry knows
    net0 (busy_poll_us = 0 of its own, from the config) and net1."""
    from vhostx.config import load_config
    from vhostx.daemon import Daemon, new_registry

    reg = new_registry(["net0", "net1"])
    reg.load_config({"busy_poll_us": 0}, device="net0")
    daemon = Daemon(load_config(None, ["name=net0,socket=/nonexistent/0",
                                       "name=net1,socket=/nonexistent/1"]), reg)

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        try:
            return daemon.control(req)
        except ConfigError as err:
            return {"ok": False, "error": str(err)}

    return handler


def test_param_set_get_reset_of_one_device(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    d = fake(param_daemon())
    rc, out, _ = run(capsys, "param", "set", "turn_max_packets", "8", "--device", "net1",
                     "--control", d.path)
    assert rc == 0 and out.strip() == "turn_max_packets@net1 = 8 (runtime, device net1: own value)"
    rc, out, _ = run(capsys, "param", "get", "busy_poll_us", "--device", "net1", "--control", d.path)
    assert rc == 0 and out.strip() == (
        "busy_poll_us@net1 = 50 (default, device net1: follows the global value)")
    rc, out, _ = run(capsys, "param", "reset", "busy_poll_us", "--control", d.path)
    assert rc == 0 and out.strip() == "busy_poll_us = 50 (default)"
    assert d.requests == [
        {"cmd": "param_set", "name": "turn_max_packets", "value": "8", "device": "net1"},
        {"cmd": "param_get", "name": "busy_poll_us", "device": "net1"},
        {"cmd": "param_reset", "name": "busy_poll_us"},
    ]


@pytest.mark.parametrize("argv, words", [
    (["set", "turn_max_packets", "0", "--device", "net0"],
     ["device net0: turn_max_packets='0': out of range, allowed [1, 65536] packets"]),
    (["set", "turn_max_packets", "8", "--device", "net7"], ["unknown device 'net7'", "net0, net1"]),
    (["set", "workers", "8", "--device", "net0"], ["workers@net0", "scope global"]),
    (["set", "placement", "somewhere"], ["placement='somewhere'", "first_fit, least_loaded"]),
])
def test_param_refused_for_a_device_exits_2(fake: Any, capsys: pytest.CaptureFixture[str],
                                             argv: list[str], words: list[str]) -> None:
    d = fake(param_daemon())
    rc, _, err = run(capsys, "param", *argv, "--control", d.path)
    assert rc == 2
    for w in words:
        assert w in err, err


def test_param_get_with_a_value_is_a_usage_error(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    d = fake(param_daemon())
    rc, _, err = run(capsys, "param", "get", "busy_poll_us", "3", "--control", d.path)
    assert rc == 2 and "takes NAME only" in err and d.requests == []


def test_params_without_a_daemon_lists_the_daemons_specs(capsys: pytest.CaptureFixture[str]) -> None:
    from vhostx.daemon import PARAM_SPECS

    rc, out, _ = run(capsys, "params", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rc == 0 and set(rows) == {p.name for p in PARAM_SPECS}
    assert rows["mode"]["default"] == "shared" and rows["busy_poll_us"]["scope"] == "device"
    rc, out, _ = run(capsys, "params")
    assert rc == 0 and out.splitlines()[0].split()[0] == "parameter"
    assert all(p.name in out for p in PARAM_SPECS)


def test_params_of_a_daemon_show_device_values_and_sources(
        fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    d = fake(param_daemon())
    rc, out, _ = run(capsys, "params", "--control", d.path)
    assert rc == 0
    lines = out.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("busy_poll_us@net0 "))
    row = " ".join(" ".join(ln.split()) for ln in lines[at:at + 2])  # the note may wrap once
    assert lines[at].split()[1] == "0" and "source config" in row and "global: 50" in row
    rc, out, _ = run(capsys, "params", "--json", "--control", d.path)
    row = next(r for r in json.loads(out) if r["name"] == "busy_poll_us")
    assert row["devices"] == {"net0": {"value": 0, "source": "config"}}


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["worker"], ["worker", "remove", "x", "--control", "c"], ["migrate", "net0"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    capsys.readouterr()


# ------------------------------------------------------------------------------------------------
# plugins: commands other packages add through the `vhostx.commands` entry points


def _subcommands(parser: Any) -> set[str]:
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)


def _fake_distribution(root: Path, module: str, source: str, entry_points: str) -> None:
    """A distribution on sys.path with `module.py` and the given entry_points.txt, found by
    importlib.metadata as an installed one would be."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def _only_these_plugins(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Discovery sees only the distributions under `root` (not the checkout's own install)."""
    from importlib import metadata

    monkeypatch.setattr(cli, "_plugin_entry_points", lambda: sorted(
        (ep for d in metadata.distributions(path=[str(root)]) for ep in d.entry_points
         if ep.group == cli.PLUGIN_GROUP), key=lambda ep: ep.name))
    monkeypatch.syspath_prepend(str(root))


def test_vhostx_does_not_import_bench() -> None:
    code = ("import sys; import vhostx.cli, vhostx.daemon, vhostx.config, vhostx.transport; "
            "vhostx.cli._plugin_entry_points = lambda: []; vhostx.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m == 'bench' or m.startswith('bench.')))")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=60,
                          check=True)
    assert done.stdout.strip() == "[]"
    for path in (root / "vhostx").glob("*.py"):
        text = path.read_text()
        assert "import bench" not in text and "from bench" not in text, path


def test_plugin_from_an_entry_point_adds_its_command(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _fake_distribution(tmp_path, "vxplug_ok", (
        "def register(sub):\n"
        "    p = sub.add_parser('hello', help='says hello')\n"
        "    p.add_argument('--who', default='world')\n"
        "    p.set_defaults(func=lambda a: print('hello', a.who) or 0)\n"),
        "[vhostx.commands]\nhello = vxplug_ok:register\n")
    _only_these_plugins(monkeypatch, tmp_path)
    assert "hello" in _subcommands(cli.build_parser())
    rc, out, _ = run(capsys, "hello", "--who", "qemu")
    assert rc == 0 and out == "hello qemu\n"


@pytest.mark.parametrize("source, reason", [
    (None, "ModuleNotFoundError: No module named 'vxplug_gone'"),
    ("import a_module_that_does_not_exist_xyz\n",
     "No module named 'a_module_that_does_not_exist_xyz'"),
    ("def register(sub):\n    raise RuntimeError('half-made\\nsecond line')\n",
     "RuntimeError: half-made"),
])
def test_missing_or_broken_plugin_says_so_in_one_line(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        source: str | None, reason: str) -> None:
    _fake_distribution(tmp_path, "vxplug_bad", source or "", "[vhostx.commands]\n"
                       f"bench = {'vxplug_gone' if source is None else 'vxplug_bad'}:register\n")
    if source is None:
        (tmp_path / "vxplug_bad.py").unlink()
    for name in ("vxplug_bad", "vxplug_gone"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    _only_these_plugins(monkeypatch, tmp_path)
    names = _subcommands(cli.build_parser())  # the daemon's own commands are all there
    assert {"serve", "stats", "params", "workers", "worker", "migrate", "bench"} <= names
    rc, out, err = run(capsys, "bench", "run", "shared8")
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("vhostx: the 'bench' command is unavailable")
    assert reason in err


def test_the_shipped_entry_points_resolve() -> None:
    """pyproject.toml's vhostx.commands name register functions that exist (bench and demo)."""
    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    eps = project["entry-points"][cli.PLUGIN_GROUP]
    assert set(eps) == {"bench", "demo"}
    for name, value in eps.items():
        module, func = value.split(":")
        register = getattr(importlib.import_module(module), func)
        sub = argparse.ArgumentParser().add_subparsers()
        register(sub)
        assert name in sub.choices
    assert project["scripts"]["vhostx-net"] == "vhostx.cli:backend_main"


def test_backend_main_is_serve(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.backend_main(["--print-capabilities", "--fd", "7", "--junk"]) == 0
    assert capsys.readouterr().out == '{"type": "net"}\n'
    assert cli.main(["serve", "--print-capabilities"]) == 0
    assert capsys.readouterr().out == '{"type": "net"}\n'
    assert cli.backend_main(["--port", "echo"]) == 2  # a device option without its device
    assert "give one of those" in capsys.readouterr().err


# ---- vhostx coalesce ----------------------------------------------------------------------


def test_coalesce_shows_and_sets_a_devices_moderation(fake: Any,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    d = fake(param_daemon())
    rc, out, _ = run(capsys, "coalesce", "net0", "--control", d.path)
    assert rc == 0 and out.splitlines()[0] == "Coalesce parameters for net0:"
    assert "Mode:               off" in out and "usecs:              100" in out
    rc, out, _ = run(capsys, "coalesce", "net0", "rx-usecs", "50", "rx-frames", "16",
                     "--control", d.path)
    assert rc == 0 and "Mode:               moderate" in out  # usecs on an off device: on
    assert "usecs:              50" in out and "frames:             16" in out
    rc, out, _ = run(capsys, "coalesce", "net0", "adaptive", "on", "--control", d.path)
    assert rc == 0 and "Mode:               adaptive" in out
    # the other device is untouched: device-scope values
    rc, out, _ = run(capsys, "coalesce", "net1", "--control", d.path)
    assert "Mode:               off" in out and "usecs:              100" in out
    rc, out, _ = run(capsys, "param", "get", "irq_coalesce_us", "--device", "net0",
                     "--control", d.path)
    assert out.strip() == "irq_coalesce_us@net0 = 50 (runtime, device net0: own value)"


@pytest.mark.parametrize("words, why", [
    (["rx-frames", "0"], "irq_coalesce_frames"),  # below min 1: the daemon refuses
    (["rx-usecs", "20000"], "irq_coalesce_us"),
    (["mode", "turbo"], "irq_mode"),
])
def test_coalesce_refused_values_exit_2(fake: Any, capsys: pytest.CaptureFixture[str],
                                        words: list[str], why: str) -> None:
    d = fake(param_daemon())
    rc, _, err = run(capsys, "coalesce", "net0", *words, "--control", d.path)
    assert rc == 2 and why in err and "refused" in err


@pytest.mark.parametrize("words, why", [
    (["rx-usecs"], "odd list"),
    (["rx-jiffies", "3"], "unknown key 'rx-jiffies'"),
    (["adaptive", "maybe"], "takes on or off"),
])
def test_coalesce_bad_usage_exits_2_before_any_set(fake: Any, capsys: pytest.CaptureFixture[str],
                                                   words: list[str], why: str) -> None:
    d = fake(param_daemon())
    rc, _, err = run(capsys, "coalesce", "net0", *words, "--control", d.path)
    assert rc == 2 and why in err
    assert all(r["cmd"] == "param_get" for r in d.requests)
