"""Interrupt moderation of a device's queues: its parameters and the cell its queues follow.

The C core decides per publication (virtio/_core/vx_used.c, vx_vq_notify_decide); this module
declares the device-scope parameters that configure it and keeps one virtio.irq.IrqConfig cell
per device in step with them (one subscription per parameter, like vhostx.net.BusyPoll).

irq_mode:
- off: write the call eventfd whenever the driver asks (EVENT_IDX / NO_INTERRUPT decide);
- moderate: hold the interrupt until irq_coalesce_frames completions are pending or
  irq_coalesce_us has passed since the first held one, whichever comes first (ethtool -C
  rx-frames / rx-usecs; VPP's coalesce_frames / coalesce_time);
- adaptive: moderate while the queue's completion rate, sampled over windows of
  irq_adaptive_window_us, is at least irq_adaptive_on_kpps; immediate again once a window's rate
  is below irq_adaptive_off_kpps (hysteresis; off <= on).
A held interrupt is never lost: the worker's wait and the poll rounds send it at its deadline,
a detach or migration sends it at once. Switch- and fwd-fed RX queues (written by other
workers) are never moderated.

Threads: the subscription callbacks run on whichever thread sets a parameter (the cell takes
aligned stores); construction and close on the control thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from iosched.params import Param, ParamHandle, Registry, Scope
from virtio.irq import IrqConfig, IrqMode

__all__ = [
    "IRQ_ADAPTIVE_OFF_KPPS",
    "IRQ_ADAPTIVE_ON_KPPS",
    "IRQ_ADAPTIVE_WINDOW_US",
    "IRQ_COALESCE_FRAMES",
    "IRQ_COALESCE_US",
    "IRQ_MODE",
    "IRQ_MODES",
    "PARAMS",
    "IrqModeration",
]

IRQ_MODES: dict[str, IrqMode] = {"off": IrqMode.IMMEDIATE, "moderate": IrqMode.MODERATE,
                                 "adaptive": IrqMode.ADAPTIVE}
IRQ_MODE = Param(
    "irq_mode", str, "off",
    "interrupt moderation of the device's queues: off (signal whenever the driver asks), "
    "moderate (hold until irq_coalesce_frames or irq_coalesce_us), adaptive (moderate while the "
    "queue's rate is at least irq_adaptive_on_kpps)",
    choices=tuple(IRQ_MODES), runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
IRQ_COALESCE_FRAMES = Param(
    "irq_coalesce_frames", int, 32,
    "moderation: send a held interrupt once this many completions are pending (ethtool "
    "rx-frames); 1 = no holding",
    unit="frames", min=1, max=4096, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
IRQ_COALESCE_US = Param(
    "irq_coalesce_us", int, 100,
    "moderation: send a held interrupt at the latest this long after the first held completion "
    "(ethtool rx-usecs); 0 = no holding",
    unit="us", min=0, max=10000, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
IRQ_ADAPTIVE_ON_KPPS = Param(
    "irq_adaptive_on_kpps", int, 20,
    "adaptive moderation: on when a queue completes at least this many thousand packets per "
    "second over one sampling window",
    unit="kpps", min=0, max=100000, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
IRQ_ADAPTIVE_OFF_KPPS = Param(
    "irq_adaptive_off_kpps", int, 10,
    "adaptive moderation: off again when a window's rate is below this (at most "
    "irq_adaptive_on_kpps; the gap is the hysteresis)",
    unit="kpps", min=0, max=100000, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
IRQ_ADAPTIVE_WINDOW_US = Param(
    "irq_adaptive_window_us", int, 2000,
    "adaptive moderation: the rate sampling window (the rule is re-decided once per window, at "
    "the first completion after it ends)",
    unit="us", min=100, max=1000000, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
PARAMS: tuple[Param, ...] = (IRQ_MODE, IRQ_COALESCE_FRAMES, IRQ_COALESCE_US, IRQ_ADAPTIVE_ON_KPPS,
                             IRQ_ADAPTIVE_OFF_KPPS, IRQ_ADAPTIVE_WINDOW_US)
"""The parameters this module reads."""

# parameter -> (cell field, scale from the parameter's unit)
_FIELDS: dict[str, tuple[str, int]] = {
    IRQ_COALESCE_FRAMES.name: ("frames", 1),
    IRQ_COALESCE_US.name: ("delay_ns", 1000),
    IRQ_ADAPTIVE_ON_KPPS.name: ("on_pps", 1000),
    IRQ_ADAPTIVE_OFF_KPPS.name: ("off_pps", 1000),
    IRQ_ADAPTIVE_WINDOW_US.name: ("window_ns", 1000),
}


class IrqModeration:
    """The interrupt-policy cell of one device (`cell`), following its parameters.

    `handles`: name -> ParamHandle of the device (registry.handle(name, device=...)); None: the
    defaults, fixed. The off <= on rule of the adaptive rates is kept by clamping off to on
    (both are settable one at a time).
    """

    def __init__(self, registry: Registry | None = None, device: str | None = None) -> None:
        reg = registry if registry is not None else Registry(PARAMS)
        self._handles: dict[str, ParamHandle] = {
            p.name: reg.handle(p.name, device=device) for p in PARAMS
        }
        self.cell = IrqConfig()
        self._apply()
        self._unsubscribe: list[Callable[[], None]] = [
            h.subscribe(self._changed) for h in self._handles.values()
        ]

    def _apply(self) -> None:
        values = {name: int(self._handles[name].get()) * scale
                  for name, (_, scale) in _FIELDS.items()}
        fields = {_FIELDS[name][0]: v for name, v in values.items()}
        fields["off_pps"] = min(fields["off_pps"], fields["on_pps"])
        self.cell.set(mode=int(IRQ_MODES[str(self._handles[IRQ_MODE.name].get())]), **fields)

    def _changed(self, name: str, old: Any, new: Any) -> None:
        self._apply()

    def values(self) -> dict[str, Any]:
        """The device's moderation parameters as they are now."""
        return {name: h.get() for name, h in self._handles.items()}

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
