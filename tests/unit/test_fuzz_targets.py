"""Every fuzz target (scripts/fuzz.sh --list) runs for a short while from its committed seeds:
no crash, no sanitizer report, no broken harness invariant. The long runs are recorded in
docs/reliability.md; a crash found there becomes a named test in tests/unit/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "scripts" / "fuzz.sh"
SECONDS = int(os.environ.get("VHOSTX_FUZZ_SECONDS", "12"))
C_TARGETS = {"chain", "tx", "rx", "round", "iotlb", "drvpair"}


def _targets() -> list[str]:
    out = subprocess.run(["bash", str(FUZZ), "--list"], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout
    return out.split()


def test_every_target_has_seeds() -> None:
    names = _targets()
    assert set(names) >= C_TARGETS | {"vhost_user"}
    for t in names:
        seeds = list((ROOT / "fuzz" / "corpus" / t).glob("*"))
        assert seeds, f"fuzz/corpus/{t} is empty"
        assert sum(f.stat().st_size for f in seeds) < 512 << 10, f"{t}: seeds too big to commit"


@pytest.mark.parametrize("target", _targets())
def test_fuzz_target_short_run(target: str, tmp_path: Path) -> None:
    if target in C_TARGETS and shutil.which("clang") is None:
        pytest.skip("clang not installed (scripts/install.sh installs it)")
    if target not in C_TARGETS:
        pytest.importorskip("atheris")
    env = dict(os.environ, FUZZ_WORK=str(tmp_path / "work"))
    env.setdefault("PYTHON", sys.executable)  # the interpreter that has atheris
    p = subprocess.run(
        ["nice", "-n", "10", "bash", str(FUZZ), target, str(SECONDS)],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, errors="replace",
        timeout=SECONDS + 240,
    )
    out = p.stdout + p.stderr
    tail = out[-5000:]
    assert p.returncode == 0, f"{target}: exit {p.returncode}\n{tail}"
    for bad in ("ERROR: AddressSanitizer", "runtime error:", "invariant broken", "Traceback"):
        assert bad not in out, f"{target}: {bad}\n{tail}"
    runs = [int(line.split(":")[-1]) for line in out.splitlines()
            if line.startswith("stat::number_of_executed_units")]
    assert runs and runs[-1] > 100, f"{target}: the fuzzer hardly ran\n{tail}"
