"""bench.vfio_guest.chroot_job: the guest job script that enters the host's root over 9p."""

from __future__ import annotations

import pytest

import bench.vfio_guest as vg


def test_checkout_under_tmp_was_hidden_by_the_guests_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout under /tmp (CI clones anywhere) vanished under the tmpfs the job mounts on the
    guest's /tmp ("cd: can't cd to /tmp/ci-check"): it is bound back over that tmpfs."""
    monkeypatch.setattr(vg, "_keep_under_tmp", lambda: ["/tmp/ci-check"])
    lines = vg.chroot_job("cd /tmp/ci-check && true").splitlines()
    tmpfs = lines.index("mount -t tmpfs tmpfs /host/tmp")
    saved = next(i for i, ln in enumerate(lines) if "mount -o bind /host/tmp/ci-check /keep0" in ln)
    restored = next(i for i, ln in enumerate(lines)
                    if ln.endswith("mount -o bind /keep0 /host/tmp/ci-check"))
    chroot = next(i for i, ln in enumerate(lines) if ln.startswith("chroot /host"))
    assert saved < tmpfs < restored < chroot


def test_nothing_to_keep_outside_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vg, "_keep_under_tmp", list)
    assert "/keep" not in vg.chroot_job("true")


def test_keep_under_tmp_names_only_directories_below_tmp() -> None:
    assert all(d.startswith("/tmp/") for d in vg._keep_under_tmp())
