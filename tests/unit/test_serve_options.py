"""The configuration of `vhostx serve`'s one device (--socket-path / --fd) and of the listening
sockets' group and mode: what is accepted, what is refused and how, and that the mode and group
are on the socket file before it listens."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from vhostx import transport
from vhostx.config import backend_device, load_config, parse_device_spec
from virtio.errors import ConfigError


def _a_group() -> grp.struct_group:
    return grp.getgrgid(os.getgid())


def test_backend_device_for_a_socket_path_and_an_fd() -> None:
    dev = backend_device(socket_path="/run/vhostx/n.sock")
    assert (dev.name, dev.port, dev.socket, dev.fd, dev.type) == ("net0", "sink",
                                                                  "/run/vhostx/n.sock", -1, "net")
    dev = backend_device(fd=5, name="g1", port="echo", options=["queues=2", "mtu=9000"])
    assert (dev.name, dev.port, dev.socket, dev.fd, dev.queues, dev.mtu) == ("g1", "echo", "", 5,
                                                                             2, 9000)


@pytest.mark.parametrize("kw, words", [
    ({"socket_path": "/s", "options": ["socket=/t"]}, "give the device's socket with --socket-path"),
    ({"socket_path": "/s", "options": ["port=echo"]}, "with --port"),
    ({"socket_path": "/s", "options": ["queues"]}, "'queues' is not key=value"),
    ({"socket_path": "/s", "options": ["color=red"]}, "unknown key 'color'"),
    ({"fd": -1}, "expected a file descriptor number >= 0"),
    ({"fd": 4, "options": ["socket_mode=0660"]}, "not to an inherited --fd"),
])
def test_backend_device_refusals(kw: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        backend_device(**kw)


@pytest.mark.parametrize("value, mode", [("0660", 0o660), ("660", 0o660), ("0o600", 0o600),
                                         ("0", 0), ("0777", 0o777)])
def test_socket_mode_takes_octal_strings(value: str, mode: int) -> None:
    assert parse_device_spec(f"name=a,socket=/s,socket_mode={value}").socket_mode == mode


@pytest.mark.parametrize("value", ["0999", "1777", "rw-rw----", "", "0o"])
def test_socket_mode_refuses_what_is_not_permission_bits(value: str) -> None:
    with pytest.raises(ConfigError, match="socket_mode=.*expected a string of octal permission"):
        parse_device_spec(f"name=a,socket=/s,socket_mode={value}")


def test_socket_keys_in_toml(tmp_path: Path) -> None:
    g = _a_group()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[daemon]
socket_mode = "0640"
socket_group = "{g.gr_name}"

[[device]]
name = "a"
socket = "/s/a"

[[device]]
name = "b"
socket = "/s/b"
socket_mode = "0600"
socket_group = "{g.gr_gid}"

[[device]]
name = "c"
socket = "/s/c"
client = true
""")
    a, b, c = load_config(str(cfg)).devices
    assert (a.socket_mode, a.socket_group) == (0o640, g.gr_name)
    assert (b.socket_mode, b.socket_group) == (0o600, str(g.gr_gid))
    assert (c.socket_mode, c.socket_group) == (-1, "")  # a client socket is not ours to chmod
    # the command line's defaults win over [daemon], a device's own keys over both
    a, b, _ = load_config(str(cfg), socket_mode="0660").devices
    assert (a.socket_mode, b.socket_mode) == (0o660, 0o600)

    cfg.write_text('[[device]]\nname = "a"\nsocket = "/s/a"\nsocket_mode = 0o660\n')
    with pytest.raises(ConfigError, match=r"socket_mode=432: expected a string"):
        load_config(str(cfg))
    cfg.write_text('[daemon]\nsocket_group = "no-such-group-x"\n'
                   '[[device]]\nname = "a"\nsocket = "/s/a"\n')
    with pytest.raises(ConfigError, match="socket_group='no-such-group-x': no such group"):
        load_config(str(cfg))
    cfg.write_text('[[device]]\nname = "a"\nsocket = "/s/a"\nclient = true\nsocket_mode = "0600"\n')
    with pytest.raises(ConfigError, match="not to client = true"):
        load_config(str(cfg))


def test_mode_and_group_are_set_before_the_socket_listens(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A frontend's connect() is refused until listen(): what the file looks like at that moment
    is what the first frontend meets."""
    seen: list[tuple[int, int]] = []
    path = tmp_path / "net0.sock"

    class Recording(socket.socket):
        def listen(self, *args: Any) -> None:
            st = os.stat(path)
            seen.append((stat.S_IMODE(st.st_mode), st.st_gid))
            super().listen(*args)

    monkeypatch.setattr(transport.socket, "socket", Recording)
    gid = os.getgid()

    async def main() -> None:
        started = asyncio.Event()

        async def serve(recv: Any, send: Any) -> None:
            return None

        task = asyncio.create_task(transport.listen_unix(str(path), serve, started,
                                                         group=str(gid), mode=0o604))
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == [(0o604, gid)]
    assert not path.exists()  # removed when the listener ends


def test_a_failure_to_set_the_mode_is_a_config_error_and_leaves_no_socket(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: str, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(transport.os, "chmod", refuse)
    path = tmp_path / "x.sock"
    with pytest.raises(ConfigError, match=r"socket .*x.sock: cannot set its mode 0660: "
                                          "Operation not permitted"):
        transport._bind(str(path), None, 0o660)
    assert not path.exists()
