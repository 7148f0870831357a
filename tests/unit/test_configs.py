"""Every file under configs/ is loaded by what reads it, so that none can rot: the daemon's
configurations through vhostx.config (and their [params] through the parameter registry), the
benchmark scenarios (configs/bench/) through the scenario loader, the vhost-user descriptor
against QEMU's VhostUserBackend schema, the libvirt domain with libvirt's own validator."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest

from bench.harness.scenario import load_scenario
from vhostx.config import load_config
from vhostx.daemon import new_registry

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
DAEMON_CONFIGS = sorted(CONFIGS.glob("*.toml"))
# `kind = "passthrough"` files have their own loader (tests/unit/test_bench_passthrough.py)
SCENARIOS = sorted(p for p in (CONFIGS / "bench").glob("*.toml")
                   if tomllib.loads(p.read_text()).get("kind") != "passthrough")
PASSTHROUGH = sorted(set((CONFIGS / "bench").glob("*.toml")) - set(SCENARIOS))
DESCRIPTORS = sorted((CONFIGS / "qemu").glob("*.json"))
DOMAINS = sorted((CONFIGS / "libvirt").glob("*.xml"))


def _tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_file_in_configs_is_checked_here() -> None:
    checked = {*DAEMON_CONFIGS, *SCENARIOS, *PASSTHROUGH, *DESCRIPTORS, *DOMAINS}
    every = {p for p in CONFIGS.rglob("*") if p.is_file()}
    assert every - checked == set(), "files under configs/ that no test loads"
    names = {p.stem for p in DAEMON_CONFIGS}
    assert {"sink", "tap-netns", "switch", "shared-one-core"} <= names


@pytest.mark.parametrize("path", DAEMON_CONFIGS, ids=lambda p: p.name)
def test_daemon_config_loads(path: Path) -> None:
    cfg = load_config(str(path))
    assert cfg.devices and cfg.control
    registry = new_registry(d.name for d in cfg.devices)
    for name, value in cfg.param_table.items():
        registry.parse(name, value)  # checks without applying
    for dev in cfg.devices:
        for name, value in dev.params:
            registry.parse(name, value)
    ports = {d.port for d in cfg.devices}
    if path.stem == "tap-netns":
        assert ports == {"tap"} and cfg.devices[0].tap_netns
    if path.stem == "switch":
        assert ports == {"switch"} and len({d.switch for d in cfg.devices}) == 1
        assert len(cfg.devices) == 2
    if path.stem == "shared-one-core":
        assert cfg.param_table["mode"] == "shared" and cfg.param_table["workers"] == 1
        assert len(cfg.devices) >= 2
    for dev in cfg.devices:  # [daemon] socket defaults reach every listening device
        if "socket_mode" in tomllib.loads(path.read_text()).get("daemon", {}):
            assert dev.socket_mode == 0o660


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_bench_scenario_loads(path: Path) -> None:
    from bench.irq import scenario as irq_scenario

    if irq_scenario.is_interrupts_scenario(path):  # a scenario kind with its own runner
        assert irq_scenario.load(path)["name"] == path.stem
        return
    sc = load_scenario(path)
    assert sc.cases()


@pytest.mark.parametrize("path", PASSTHROUGH, ids=lambda p: p.name)
def test_passthrough_scenario_loads(path: Path) -> None:
    from bench.harness.passthrough import load

    assert load(path).backends


@pytest.mark.parametrize("path", DESCRIPTORS, ids=lambda p: p.name)
def test_vhost_user_descriptor_follows_the_schema(path: Path) -> None:
    tool = _tool("install_descriptor")
    doc = json.loads(path.read_text())
    tool.check_descriptor(doc)
    assert doc["type"] == "net" and path.name.startswith("50-")
    for bad in ({**doc, "type": "netx"}, {**doc, "binary": "vhostx-net"}, {**doc, "extra": 1},
                {k: v for k, v in doc.items() if k != "description"}):
        with pytest.raises(ValueError):
            tool.check_descriptor(bad)


def test_install_descriptor_writes_the_binary_path(tmp_path: Path) -> None:
    tool = _tool("install_descriptor")
    binary = tmp_path / "bin" / "vhostx-net"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    with pytest.raises(ValueError, match="not an executable"):
        tool.install(str(binary), tmp_path / "d")
    binary.chmod(0o755)
    written = tool.install(str(binary), tmp_path / "qemu" / "vhost-user")
    assert written == tmp_path / "qemu" / "vhost-user" / "50-vhostx-net.json"
    doc = json.loads(written.read_text())
    tool.check_descriptor(doc)
    assert doc["binary"] == str(binary) and doc["type"] == "net"


def test_descriptor_default_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tool = _tool("install_descriptor")
    if os.geteuid() == 0:
        assert tool.default_dir() == Path("/etc/qemu/vhost-user")
    else:
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
        assert tool.default_dir() == tmp_path / "qemu" / "vhost-user"


@pytest.mark.parametrize("path", DOMAINS, ids=lambda p: p.name)
def test_libvirt_domain_has_what_vhost_user_needs(path: Path) -> None:
    dom = ET.parse(path).getroot()
    assert dom.tag == "domain"
    mb = dom.find("memoryBacking")
    assert mb is not None
    assert mb.find("source").get("type") == "memfd"  # type: ignore[union-attr]
    assert mb.find("access").get("mode") == "shared"  # type: ignore[union-attr]
    cells = dom.findall("cpu/numa/cell")
    assert cells, "vhost-user with libvirt needs a NUMA cell for the shared memory"
    memory = int(dom.findtext("memory", "0"))
    assert sum(int(c.get("memory", "0")) for c in cells) == memory
    nic = dom.find("devices/interface[@type='vhostuser']")
    assert nic is not None
    src = nic.find("source")
    assert src is not None and src.get("type") == "unix" and src.get("mode") == "client"
    assert src.get("path", "").startswith("/run/vhostx/")
    assert len(src.get("path", "").encode()) <= 107


@pytest.mark.parametrize("path", DOMAINS, ids=lambda p: p.name)
def test_libvirt_domain_validates(path: Path, tmp_path: Path) -> None:
    tool = shutil.which("virt-xml-validate")
    if tool is None or shutil.which("xmllint") is None:
        pytest.skip("virt-xml-validate (Debian libvirt-clients) or xmllint (libxml2-utils) is "
                    "not installed; scripts/install.sh installs both")
    done = subprocess.run([tool, str(path), "domain"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "broken.xml"  # the control: the validator does reject a bad domain
    broken.write_text(path.read_text().replace("type='vhostuser'", "type='vhost-userx'"))
    done = subprocess.run([tool, str(broken), "domain"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0
