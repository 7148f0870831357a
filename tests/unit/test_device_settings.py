"""A device's own scheduling values reach the real worker loop: each queue's C batches get the
budget of its own device, and a queue of a device without its own values follows the global
ones, also after a live update."""

from __future__ import annotations

import os
import threading
import time

from iosched.params import Registry
from iosched.policy import PARAMS, SchedSettings
from iosched.worker import Worker, WorkStats


class BudgetWork:
    """A queue of `device` with `items` pending buffers that records each batch's budget."""

    def __init__(self, device: str) -> None:
        self.name = f"{device}.tx0"
        self.device = device
        self.stats = WorkStats()
        self.poll_only = False
        self.solo = True
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.lock = threading.Lock()
        self.items = 0
        self.budgets: list[int] = []

    def kick_fds(self) -> list[int]:
        return [self.kick]

    def data_fds(self) -> list[int]:
        return []

    def add(self, n: int) -> None:
        with self.lock:
            self.items += n
        os.eventfd_write(self.kick, 1)

    def run(self, budget_pkts: int, budget_bytes: int) -> int:
        with self.lock:
            n = min(self.items, budget_pkts)
            self.items -= n
            if n:
                self.budgets.append(budget_pkts)
        return n

    def pending(self) -> bool:
        with self.lock:
            return self.items > 0

    def set_notify(self, enable: bool) -> None:
        pass

    def broken(self, err: object) -> None:
        raise AssertionError(err)


def wait_until(cond, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def test_each_queue_gets_its_devices_budget_and_the_others_follow_the_global_one() -> None:
    reg = Registry(PARAMS)
    for d in ("net0", "net1"):
        reg.add_device(d)
    reg.set("turn_max_packets", 4, device="net0")
    w = Worker("w", settings=SchedSettings.from_registry(reg, mode="baseline"), policy="vhost")
    a, b = BudgetWork("net0"), BudgetWork("net1")
    try:
        w.attach(a).result(5)
        w.attach(b).result(5)
        a.add(10)
        b.add(10)
        assert wait_until(lambda: a.items == 0 and b.items == 0)
        assert set(a.budgets) == {4} and len(a.budgets) >= 3  # 10 items, 4 per batch
        assert set(b.budgets) == {256}
        reg.set("turn_max_packets", 2)  # global: net1 follows, net0 keeps its own 4
        w.update(SchedSettings.from_registry(reg, mode="baseline")).result(5)
        a.budgets.clear()
        b.budgets.clear()
        a.add(8)
        b.add(8)
        assert wait_until(lambda: a.items == 0 and b.items == 0)
        assert set(a.budgets) == {4} and set(b.budgets) == {2}
    finally:
        w.stop()
        for work in (a, b):
            os.close(work.kick)
