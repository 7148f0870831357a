"""`vhostx devices`: rows from a stats snapshot, the table, and --check's exit status."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from vhostx import cli, devices_cmd

STATS: dict[str, Any] = {
    "ok": True,
    "devices": [
        {"name": "net0", "broken": None, "needs_reset": False, "connected": True, "status": 15,
         "features": "0x150008000", "protocol_features": "0x10009",
         "queues": {"1": {"packets": 3}, "0": {"packets": 1}}},
        {"name": "net1", "broken": "net1.tx0: descriptor 0: address 0x10000000000 outside memory",
         "needs_reset": True, "connected": True, "status": 0x4F, "features": "0x150008000",
         "protocol_features": "0x10009", "queues": {}},
        {"name": "net2", "broken": None, "needs_reset": False, "connected": False, "status": 0,
         "features": "0x0", "protocol_features": "0x0", "queues": {}},
    ],
}


def test_rows_say_state_and_reason() -> None:
    rows = {r["name"]: r for r in devices_cmd.device_rows(STATS)}
    assert rows["net0"]["state"] == "ok" and rows["net0"]["queues"] == [0, 1]
    assert rows["net1"]["state"] == "NEEDS_RESET" and rows["net1"]["needs_reset"]
    assert rows["net1"]["reason"].startswith("net1.tx0: ")
    assert rows["net2"]["state"] == "idle" and rows["net2"]["connected"] is False


def test_table_names_every_device() -> None:
    out = io.StringIO()
    devices_cmd.render(devices_cmd.device_rows(STATS), out)
    text = out.getvalue()
    for word in ("net0", "net1", "net2", "NEEDS_RESET", "connected", "none", "0x4f", "0,1"):
        assert word in text, (word, text)
    empty = io.StringIO()
    devices_cmd.render([], empty)
    assert "no devices" in empty.getvalue()


@pytest.mark.parametrize(("broken", "code"), [(False, 0), (True, 1)])
def test_check_exit_status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                           broken: bool, code: int) -> None:
    stats = json.loads(json.dumps(STATS))
    if not broken:
        stats["devices"] = [d for d in stats["devices"] if not d["needs_reset"]]
    monkeypatch.setattr(cli, "ask", lambda control, req, *a, **k: stats)
    assert cli.main(["devices", "--control", "/nonexistent", "--check", "--json"]) == code
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [d["name"] for d in stats["devices"]]


def test_no_daemon_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["devices", "--control", "/nonexistent/control.sock"]) == 1
    assert "no daemon is listening" in capsys.readouterr().err
