"""The C-core unit tests again, against the ASan + UBSan build of the core (tools/build_sanitized.py).

The sanitized module is built once per source hash into $VHOSTX_CACHE/asan/ and the tests run in
a child process with the sanitizer runtime preloaded; any sanitizer report fails the test. The
canary proves the runtime is in force (a deliberate use-after-free must be reported).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "build_sanitized.py"

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def _tool(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *args], check=False, cwd=ROOT, capture_output=True,
                          text=True, errors="replace", timeout=timeout)


def test_sanitizer_runtime_reports_a_use_after_free() -> None:
    p = _tool("--check-canary", timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "heap-use-after-free" in p.stdout


def test_core_unit_tests_pass_under_asan_and_ubsan() -> None:
    p = _tool("--pytest", timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert " passed" in out and "ERROR: AddressSanitizer" not in out
    assert "runtime error:" not in out
