"""The `vhostx` command line: serve, stats, demo.

Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.
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

__all__ = ["control_request", "main"]


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


def _cmd_serve(args: argparse.Namespace) -> int:
    from .config import load_config
    from .daemon import run_daemon

    cfg = load_config(args.config, args.device, args.control, args.param)
    return run_daemon(cfg, stats_file=args.stats_file, ready_file=args.ready_file)


def _cmd_stats(args: argparse.Namespace) -> int:
    from .live import render_stats_loop

    if args.json:
        print(json.dumps(control_request(args.control, {"cmd": "stats"}), indent=1))
        return 0
    return render_stats_loop(args.control, interval=args.interval, count=args.count)


def _cmd_params(args: argparse.Namespace) -> int:
    if args.control:
        answer = control_request(args.control, {"cmd": "params"})
        if args.json:
            print(json.dumps(answer["params"], indent=1))
            return 0
        for row in answer["params"]:
            rng = row.get("range", "")
            print(f"{row['name']}: {row['value']!r} ({row['source']}) [{rng}] {row.get('unit', '')}"
                  f" - {row['description']}")
        return 0
    from iosched.params import REGISTRY

    if args.json:
        print(json.dumps([r.as_dict() for r in REGISTRY.describe()], indent=1))
    else:
        print(REGISTRY.format_table())
    return 0


def _cmd_param(args: argparse.Namespace) -> int:
    if args.action == "get":
        req: dict[str, Any] = {"cmd": "param_get", "name": args.name}
    else:
        if args.value is None:
            raise ConfigError("param set needs NAME VALUE")
        req = {"cmd": "param_set", "name": args.name, "value": args.value}
    answer = control_request(args.control, req)
    if not answer.get("ok"):
        print(f"vhostx: {answer.get('error')}", file=sys.stderr)
        return 2
    print(f"{answer['name']} = {answer['value']!r}" + (f" ({answer['source']})" if "source" in answer else ""))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from bench.demo import (
        run_demo,  # the CLI is the top of the stack: demo and bench live in bench/
    )

    return run_demo(seconds=args.seconds, port=args.port, size=args.size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostx", description="user-space vhost-user backend")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help="TOML file with [[device]] tables")
    s.add_argument("--device", action="append", default=[],
                   help="name=NAME,type=net,socket=PATH,port=sink|echo|source|switch|tap[,...] (repeatable)")
    s.add_argument("--control", help="control socket path (JSON lines)")
    s.add_argument("--param", action="append", default=[], help="name=value (repeatable)")
    s.add_argument("--stats-file", help="write final statistics as JSON here on exit")
    s.add_argument("--ready-file", help="write the pid here once every socket listens")
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

    pa = sub.add_parser("param", help="get or set one parameter of a running daemon")
    pa.add_argument("action", choices=["get", "set"])
    pa.add_argument("name")
    pa.add_argument("value", nargs="?")
    pa.add_argument("--control", required=True, help="the daemon's control socket")
    pa.set_defaults(func=_cmd_param)

    d = sub.add_parser("demo", help="daemon + a DPDK virtio-user client, live figures on screen")
    d.add_argument("--seconds", type=float, default=20.0, help="how long traffic runs")
    d.add_argument("--port", default="sink", choices=["sink", "source", "echo"],
                   help="the daemon's port: guest TX into sink, RX from source, or echo")
    d.add_argument("--size", type=int, default=64, help="packet size in bytes")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
    except (ConnectionError, FileNotFoundError) as err:
        print(f"vhostx: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

