"""The `vhostx` command line: serve, stats, devices, params, param, workers, worker, migrate,
coalesce, vfio, and the commands of installed plugins (entry-point group `vhostx.commands`:
bench/ adds `bench`, `demo`).

Exit codes: 0 success, 1 runtime failure (no daemon, or the daemon refused a command), 2 bad
configuration or usage.
Threads: the main thread only.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from typing import Any

from virtio.errors import ConfigError

from . import coalesce_cmd, devices_cmd, vfio_cmd

__all__ = ["CAPABILITIES", "CommandFailed", "ask", "backend_main", "build_parser",
           "control_request", "main"]


CONTROL_TIMEOUT_S = 5.0  # how long a control command may take before the CLI gives up
# `--print-capabilities` (QEMU docs/interop/vhost-user.json, VHostUserBackendCapabilities): the
# union's base is the type; "net" has no member of its own, so no "features" list
CAPABILITIES: dict[str, Any] = {"type": "net"}


class CommandFailed(Exception):
    """A control command could not be delivered or the daemon refused it (exit code 1)."""


def control_request(path: str, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one JSON request to a daemon's control socket and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    answer: dict[str, Any] = json.loads(buf)
    return answer


def ask(control: str, req: dict[str, Any], timeout: float | None = None, *,
        check: bool = True) -> dict[str, Any]:
    """control_request with the CLI's error handling: CommandFailed with a message a user can act
    on when no daemon listens, it does not answer, or it answers {"ok": false}."""
    cmd = req.get("cmd")
    timeout = CONTROL_TIMEOUT_S if timeout is None else timeout
    try:
        answer = control_request(control, req, timeout)
    except (FileNotFoundError, ConnectionRefusedError) as err:
        raise CommandFailed(
            f"no daemon is listening on the control socket {control} ({err.strerror}); "
            f"is `vhostx serve --control {control}` running?"
        ) from err
    except TimeoutError as err:
        raise CommandFailed(f"the daemon at {control} did not answer {cmd!r} within {timeout:g} s") from err
    except (ConnectionError, OSError) as err:
        raise CommandFailed(f"control socket {control}: {err}") from err
    except ValueError as err:  # not JSON, or cut off
        raise CommandFailed(f"the daemon at {control} sent a malformed answer to {cmd!r}: {err}") from err
    if not isinstance(answer, dict):
        raise CommandFailed(f"the daemon at {control} sent a malformed answer to {cmd!r}: {answer!r}")
    if check and not answer.get("ok"):
        raise CommandFailed(f"the daemon refused {cmd!r}: {answer.get('error', 'no reason given')}")
    return answer


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.print_capabilities:  # the backend program conventions: print, ignore the rest, exit 0
        print(json.dumps(CAPABILITIES))
        return 0
    from .config import DeviceConfig, backend_device, load_config
    from .daemon import run_daemon

    extra: tuple[DeviceConfig, ...] = ()
    if args.socket_path is not None or args.fd is not None:
        extra = (backend_device(socket_path=args.socket_path, fd=args.fd, name=args.name,
                                port=args.port, options=args.device_option),)
    elif args.device_option or args.name != "net0" or args.port != "sink":
        raise ConfigError("--name, --port and --device-option describe the device of "
                          "--socket-path PATH or --fd N; give one of those")
    cfg = load_config(args.config, args.device, args.control, args.param, metrics=args.metrics,
                      extra_devices=extra, socket_group=args.socket_group,
                      socket_mode=args.socket_mode)
    return run_daemon(cfg, stats_file=args.stats_file, ready_file=args.ready_file)


def _cmd_stats(args: argparse.Namespace) -> int:
    from .live import render_stats_loop

    if args.json:
        print(json.dumps(ask(args.control, {"cmd": "stats"}), indent=1))
        return 0
    if args.interval <= 0:
        raise ConfigError(f"--interval={args.interval:g}: expected a number of seconds > 0")
    if args.count < 0:
        raise ConfigError(f"--count={args.count}: expected 0 (until Ctrl-C) or more")
    return render_stats_loop(args.control, interval=args.interval, count=args.count,
                             fetch=lambda: ask(args.control, {"cmd": "stats"}))


def _cmd_workers(args: argparse.Namespace) -> int:
    answer = ask(args.control, {"cmd": "workers"})
    rows = answer.get("workers", [])
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from .live import print_workers

    return print_workers(rows)


def _cmd_worker(args: argparse.Namespace) -> int:
    if args.action == "add":
        if args.cpu is not None and args.cpu < 0:
            raise ConfigError(f"--cpu={args.cpu}: expected a CPU number >= 0")
        answer = ask(args.control, {"cmd": "worker_add", "cpu": args.cpu})
        index = answer.get("worker", answer.get("index"))
        where = f" on CPU {args.cpu}" if args.cpu is not None else ""
        print(f"added worker {index}{where}" if index is not None else f"added a worker{where}")
    else:
        ask(args.control, {"cmd": "worker_remove", "worker": args.index})
        print(f"removed worker {args.index}")
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"cmd": "migrate", "device": args.device, "worker": args.worker}
    if args.queue:
        req["queue"] = args.queue
    ask(args.control, req, timeout=args.timeout)
    what = f"queue {args.queue} of {args.device}" if args.queue else args.device
    print(f"moved {what} to worker {args.worker}")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from .live import print_params

    if args.control:  # a running daemon's values, sources and per-device values
        rows = ask(args.control, {"cmd": "params"})["params"]
    else:  # the declarations every daemon starts from (the same specs, at their defaults)
        from .daemon import new_registry

        rows = [r.as_dict() for r in new_registry().describe()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    return print_params(rows)


def _cmd_param(args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"cmd": f"param_{args.action}", "name": args.name}
    if args.action == "set":
        if args.value is None:
            raise ConfigError("param set needs NAME VALUE")
        req["value"] = args.value
    elif args.value is not None:
        raise ConfigError(f"param {args.action} takes NAME only, got a value {args.value!r}")
    if args.device:
        req["device"] = args.device
    answer = ask(args.control, req, check=False)
    if not answer.get("ok"):
        # a refused value is a configuration error (exit 2), as for --param at start-up
        print(f"vhostx: the daemon refused {req['cmd']!r}: {answer.get('error')}", file=sys.stderr)
        return 2
    where = answer.get("source", "")
    if "device" in answer:
        whose = "own value" if answer.get("own") else "follows the global value"
        where = f"{where}, device {answer['device']}: {whose}" if where else whose
    target = f"{answer['name']}@{answer['device']}" if "device" in answer else answer["name"]
    print(f"{target} = {answer['value']!r}" + (f" ({where})" if where else ""))
    return 0


def _add_serve_options(s: argparse.ArgumentParser) -> None:
    one = s.add_argument_group(
        "one device, QEMU's backend program conventions",
        "--socket-path PATH or --fd N serves one net device (port sink unless --port says "
        "otherwise); --device-option KEY=VALUE sets any other device key (see README)")
    how = one.add_mutually_exclusive_group()
    how.add_argument("--socket-path", metavar="PATH", help="listen on this vhost-user socket")
    how.add_argument("--fd", type=int, metavar="N",
                     help="serve this inherited, already-connected vhost-user socket; the daemon "
                     "exits when the frontend hangs up")
    one.add_argument("--print-capabilities", action="store_true",
                     help='print {"type": "net"} and exit')
    one.add_argument("--name", default="net0", help="device name (default net0)")
    one.add_argument("--port", default="sink", choices=["sink", "echo", "source", "switch", "tap"],
                     help="what the device's queues connect to (default sink)")
    one.add_argument("-o", "--device-option", action="append", default=[], metavar="KEY=VALUE",
                     help="another device key, e.g. queues=2, tap_netns=vx (repeatable)")
    s.add_argument("--config", help="TOML file with [[device]] tables")
    s.add_argument("--device", action="append", default=[],
                   help="name=NAME,type=net,socket=PATH,port=sink|echo|source|switch|tap[,...] "
                   "(repeatable)")
    s.add_argument("--socket-group", metavar="GROUP",
                   help="group of every listening socket that sets none (e.g. kvm, so that a "
                   "QEMU of that group can connect)")
    s.add_argument("--socket-mode", metavar="MODE",
                   help="permission bits of every listening socket that sets none, e.g. 0660")
    s.add_argument("--control", help="control socket path (JSON lines)")
    s.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any)")
    s.add_argument("--param", action="append", default=[],
                   help="name=value, or name@DEVICE=value for one device's own value (repeatable)")
    s.add_argument("--stats-file", help="write final statistics as JSON here on exit")
    s.add_argument("--ready-file", help="write the pid here once every socket listens")
    s.add_argument("--log-level", default=argparse.SUPPRESS,
                   help="as before the command (vhostx-net has no other place for it)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostx", description="user-space vhost-user backend")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon (in the foreground, until SIGTERM)")
    _add_serve_options(s)
    s.set_defaults(func=_cmd_serve)


    st = sub.add_parser("stats", help="show a running daemon's statistics")
    st.add_argument("--control", required=True, help="the daemon's control socket")
    st.add_argument("--json", action="store_true", help="print one JSON snapshot and exit")
    st.add_argument("--interval", type=float, default=1.0, help="refresh period in seconds")
    st.add_argument("--count", type=int, default=0, help="stop after N refreshes (0: until Ctrl-C)")
    st.set_defaults(func=_cmd_stats)

    ps = sub.add_parser("params", help="list parameters like modinfo -p (a running daemon's with --control)")
    ps.add_argument("--control", help="the daemon's control socket")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=_cmd_params)

    pa = sub.add_parser("param", help="get, set or reset (drop the run-time value of) one "
                        "parameter of a running daemon")
    pa.add_argument("action", choices=["get", "set", "reset"])
    pa.add_argument("name")
    pa.add_argument("value", nargs="?")
    pa.add_argument("--device", help="this device's own value (device-scope parameters); "
                    "reset drops it, and the device follows the global value again")
    pa.add_argument("--control", required=True, help="the daemon's control socket")
    pa.set_defaults(func=_cmd_param)

    wl = sub.add_parser("workers", help="list a running daemon's workers")
    wl.add_argument("--control", required=True, help="the daemon's control socket")
    wl.add_argument("--json", action="store_true")
    wl.set_defaults(func=_cmd_workers)

    wk = sub.add_parser("worker", help="add or remove a worker of a running daemon (shared mode)")
    wsub = wk.add_subparsers(dest="action", required=True)
    wa = wsub.add_parser("add", help="start one more worker")
    wa.add_argument("--cpu", type=int, help="pin it to this CPU")
    wa.add_argument("--control", required=True, help="the daemon's control socket")
    wr = wsub.add_parser("remove", help="stop a worker; its queues move to the others first")
    wr.add_argument("index", type=int, help="the worker's index (see `vhostx workers`)")
    wr.add_argument("--control", required=True, help="the daemon's control socket")
    wk.set_defaults(func=_cmd_worker)

    mg = sub.add_parser("migrate", help="move a device (or one of its queues) to another worker")
    mg.add_argument("device", help="device name, e.g. net0")
    mg.add_argument("worker", type=int, help="index of the worker to move to")
    mg.add_argument("--queue", help="only this queue work, e.g. net0.tx0")
    mg.add_argument("--control", required=True, help="the daemon's control socket")
    mg.add_argument("--timeout", type=float, default=15.0,
                    help="seconds to wait for the daemon to finish the move")
    mg.set_defaults(func=_cmd_migrate)

    coalesce_cmd.add_parser(sub)
    _register_plugins(sub)
    vfio_cmd.add_parser(sub)
    devices_cmd.register(sub)
    return p


PLUGIN_GROUP = "vhostx.commands"  # entry points: name = "module:register", register(subparsers)


def _plugin_entry_points() -> list[Any]:
    """The installed distributions' `vhostx.commands` entry points, sorted by name."""
    from importlib.metadata import entry_points

    return sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name)


def _register_plugins(sub: Any) -> None:
    """Commands other packages add to `vhostx` (bench registers `bench` and `demo`).

    Each entry point names a `register(subparsers)` function. One that cannot be loaded or
    registered still appears as a command, which says in one line why it is unavailable (exit 1):
    the daemon's own commands never depend on a plugin."""
    for ep in _plugin_entry_points():
        if ep.name in sub.choices:
            continue  # a second distribution offering the same name: the first one wins
        try:
            ep.load()(sub)
        except Exception as err:  # noqa: BLE001 - any failure of a plugin is reported, not raised
            sub.choices.pop(ep.name, None)  # a plugin that failed half-way through
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            _add_broken_plugin(sub, ep.name, f"{ep.value}: {reason}")


def _add_broken_plugin(sub: Any, name: str, reason: str) -> None:
    message = f"the {name!r} command is unavailable ({reason})"

    def run(args: argparse.Namespace) -> int:
        print(f"vhostx: {message}", file=sys.stderr)
        return 1

    b = sub.add_parser(name, help=f"(unavailable: {reason})", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=run)


def backend_main(argv: list[str] | None = None) -> int:
    """`vhostx-net`: `vhostx serve` under the name a vhost-user descriptor gives as its binary
    (QEMU's backend program conventions: --socket-path, --fd, --print-capabilities)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--print-capabilities" in argv:  # "other options and arguments should be ignored"
        print(json.dumps(CAPABILITIES))
        return 0
    return main(["serve", *argv])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"] and "--print-capabilities" in argv:
        print(json.dumps(CAPABILITIES))  # before parsing: the other options are to be ignored
        return 0
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as err:
        print(f"vhostx: configuration error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `vhostx stats --json | head`: the reader left, nothing to say
        sys.stderr.close()
        return 0
    except CommandFailed as err:
        print(f"vhostx: {err}", file=sys.stderr)
        return 1
    except (ConnectionError, FileNotFoundError) as err:
        print(f"vhostx: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

