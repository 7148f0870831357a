"""docs/features.md's "offered?" column is what NetDevice offers: the table and the masks in
vhostx/net.py change together. Also pins the offers QEMU 7.2 warned about (PROTOCOL_F_CONFIG)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vhostx.config import parse_device_spec
from vhostx.net import NetDevice, SwitchRegistry
from virtio import features as vf
from virtio.vhost_user import ProtocolFeature as PF

DOC = Path(__file__).resolve().parents[2] / "docs" / "features.md"


def _table(section: str) -> dict[int, tuple[str, str]]:
    """bit -> (name, offered) of the table under the heading `section`."""
    text = DOC.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows: dict[int, tuple[str, str]] = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|\s*(\w+)\s*\|\s*([^|]+?)\s*\|", line)
        if m:
            rows[int(m.group(1))] = (m.group(2), m.group(3))
    assert rows, f"no table rows under {section!r} in {DOC}"
    return rows


class _Binding:
    pass


def _device(spec: str) -> NetDevice:
    cfg = parse_device_spec(f"name=d,socket=/tmp/unused.sock,{spec}")
    return NetDevice(cfg, _Binding(), SwitchRegistry())  # type: ignore[arg-type]


def _expected(rows: dict[int, tuple[str, str]], conditions: set[str]) -> int:
    allowed = {"yes"} | conditions
    mask = 0
    for bit, (_name, offered) in rows.items():
        assert offered in {"yes", "no", "tap", "queues>1", "in_order", "iommu"}, (bit, offered)
        if offered in allowed:
            mask |= 1 << bit
    return mask


@pytest.mark.parametrize(
    ("spec", "conditions"),
    [
        ("port=sink", {"in_order"}),
        ("port=sink,queues=2,in_order=off", {"queues>1"}),
        ("port=echo,queues=4", {"queues>1", "in_order"}),
        ("port=tap,iommu=true", {"tap", "in_order", "iommu"}),
    ],
)
def test_offered_features_match_the_doc_table(spec: str, conditions: set[str]) -> None:
    dev = _device(spec)
    try:
        assert dev.offered_features() == _expected(_table("Virtio feature bits"), conditions)
        protocol = _expected(_table("Protocol feature bits"), conditions & {"iommu"})
        assert dev.protocol_features == protocol
    finally:
        dev.busy_poll.close()


def test_doc_names_are_the_bit_names() -> None:
    for bit, (name, _) in _table("Protocol feature bits").items():
        assert PF(bit).name == name
    for bit, (name, _) in _table("Virtio feature bits").items():
        assert vf.names(1 << bit, "net") == [name], bit


def test_qemu_config_warning_offer_is_gone() -> None:
    """QEMU 7.2 printed "vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does
    not" on every start of a net device: CONFIG (and INBAND_NOTIFICATIONS) are never offered."""
    dev = _device("port=sink,queues=2")
    try:
        assert not dev.protocol_features & (1 << PF.CONFIG)
        assert not dev.protocol_features & (1 << PF.INBAND_NOTIFICATIONS)
        never = (1 << vf.VIRTIO_NET_F_MAC) | (1 << vf.VIRTIO_NET_F_STATUS)
        assert not dev.offered_features() & never
    finally:
        dev.busy_poll.close()
